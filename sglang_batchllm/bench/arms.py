"""The benchmark's arms: an engine (vanilla `sglang.Engine` or `sglang_batchllm.Engine`) and a
driver (drivers.py: how the workload is split into `generate` calls). Each arm runs in a child
process of its own and leaves its result in OUT/raw/<arm>.json; a report combines every arm
found there whose settings match the command's (launch.py), so arms may run in separate
commands (a full authors' run of all arms takes longer than one 10-minute GPU command).

Ratios: every arm against each baseline arm that comes before it in `ARMS`'s order, so
BatchLLM is measured against plain vanilla AND against vanilla driven by hand. Outputs: every
arm is compared with vanilla's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Arm:
    name: str
    engine: str  # "vanilla" | "batchllm": the engine class, its keywords and environment
    driver: str  # drivers.DRIVERS key
    description: str
    attention_backend: str | None = None  # fixed for this arm; None: --vanilla/--batchllm-backend

    @property
    def plugin_active(self) -> bool:
        """What the arm's scheduler must report: a BatchLLM arm that silently ran as plain
        SGLang (or a vanilla arm with our plugin loaded) would measure nothing."""
        return self.engine == "batchllm"


ARMS: dict[str, Arm] = {a.name: a for a in (
    Arm("vanilla", "vanilla", "one-call", "sglang.Engine, the whole workload in one generate call"),
    Arm("vanilla-waves", "vanilla", "waves",
        "sglang.Engine driven by hand: per wave of W prefix groups, one call with a leader per group, then one with the rest"),
    Arm("batchllm-triton", "batchllm", "one-call",
        "sglang_batchllm.Engine on SGLang's Triton attention: BatchLLM's scheduling alone", "triton"),
    Arm("batchllm", "batchllm", "one-call", "sglang_batchllm.Engine, the whole workload in one generate call"),
    Arm("vanilla-again", "vanilla", "one-call", "vanilla a second time: an A/A run that measures the noise"),
)}
DEFAULT_ARMS = ("vanilla", "vanilla-waves", "batchllm")
REFERENCE = "vanilla"  # the outputs every arm is compared with
# the arms every later arm gets a ratio to (batchllm-triton: what the attention backend adds)
BASELINES = ("vanilla", "vanilla-waves", "batchllm-triton")


def parse_arms(text: str) -> tuple[str, ...]:
    """`--arms a,b,c`: known names, each once, in the order given (the order they run in)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise ValueError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"arm(s) {', '.join(repeated)} given twice; name each once")
    return tuple(names)


def in_report_order(names: Sequence[str]) -> list[str]:
    return [n for n in ARMS if n in names]


def ratio_pairs(present: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, baseline) for every present arm and every present baseline listed before it."""
    order = in_report_order(present)
    return [(arm, base) for i, arm in enumerate(order) for base in order[:i] if base in BASELINES]


def plugin_problems(results: dict[str, dict]) -> list[str]:
    """BatchLLM's plugin must be active in the BatchLLM arm's scheduler and absent from the
    vanilla arms'; otherwise the comparison measures nothing (e.g. the package is not
    installed, so SGLang never finds its entry point)."""
    problems = []
    for arm in in_report_order(results):
        active = results[arm].get("scheduler", {}).get("batchllm_active")
        want = ARMS[arm].plugin_active
        if active != want:
            hint = (" Install the package with this interpreter (python -m pip install --no-deps -e .) so SGLang's load_plugins() finds the "
                    "'batchllm' entry point." if want else "")
            problems.append(f"the BatchLLM plugin should be {'active' if want else 'inactive'} in the {arm} run's scheduler, "
                            f"but the scheduler reported batchllm_active={active}.{hint}")
    return problems
