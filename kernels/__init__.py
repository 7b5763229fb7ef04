"""Attention kernels of sglang_batchllm (installed as `sglang_batchllm.kernels`).

Fused cascade (shared-prefix) attention for SGLang's paged KV layout, as the style guide's
triplet: Triton kernels + launchers (module `cascade_attention`), the per-step plan
(`cascade_plan`), the fp32 torch reference (`reference`), and the pure cost rule deciding
when it pays (`cost_model`). Importing this package does not import Triton: the kernel module
is loaded on first use, so the plan, reference and cost rule work without it.
"""

from __future__ import annotations

from typing import Any

from .cascade_plan import (
    CascadeLaunchConfig,
    CascadePlan,
    CascadePlanError,
    build_decode_plan,
    build_extend_plan,
)
from .cost_model import should_share_prefix, should_use_cascade

_KERNEL_NAMES = ("cascade_forward", "cascade_decode", "cascade_extend")

__all__ = [
    "CascadeLaunchConfig",
    "CascadePlan",
    "CascadePlanError",
    "build_decode_plan",
    "build_extend_plan",
    "cascade_decode",
    "cascade_extend",
    "cascade_forward",
    "should_share_prefix",
    "should_use_cascade",
]


def __getattr__(name: str) -> Any:
    if name in _KERNEL_NAMES:
        from . import cascade_attention as _kernels

        return getattr(_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
