"""The scheduling policy (pure): which requests run next and what memory they may use.

`admission.plan_admission` decides, from the planning session and a view of the KV pool, which
waiting requests SGLang may prefill now; `sim.SimulatedEngine` drives it against a simulated KV
pool in the tests. No torch or SGLang imports.
"""

from .admission import Admission, AdmissionConfig, PoolView, mixes, plan_admission, running_need

__all__ = ["Admission", "AdmissionConfig", "PoolView", "mixes", "plan_admission", "running_need"]
