"""Compile every launch configuration of the fused kernel before the first request.

Why: Triton compiles a kernel variant the first time a launch meets a new set of compile-time
arguments. `default_launch_config` picks the GROUP tile height from each step's largest group
(16, 32 or 64 rows for 4 query heads per KV head) and extend steps use their own tiles, so an
engine that only warmed up on small batches compiled the 64-row decode variant at the first
large step of a real job: measured on an H200, 1.5 s inside the timed window of the authors'
workload (bench step log, `compile` lines), more than the whole gap to SGLang's kernel on the
short-prefix workload. CUDA-graph decode is compiled at capture; this covers the eager plans.

`launch_configs` lists what `default_launch_config` can return (a test pins that down);
`compile_launch_configs` runs one tiny plan per configuration over the caller's KV buffers,
with a split prefix so the merge kernel compiles too. The runs only read KV; their outputs are
scratch tensors that are thrown away.
"""

from __future__ import annotations

import torch

from .cascade_plan import (
    CascadeLaunchConfig,
    build_decode_plan,
    build_extend_plan,
    default_launch_config,
)

# GROUP tiles never grow past this many rows (default_launch_config's cap)
_MAX_GROUP_ROWS = 64
# the tiny warm-up batch: one group of two members, a prefix split in two pieces (so tokens get
# two partials and the merge kernel runs), one query token per member in extend mode
_PREFIX, _CHUNK, _SUFFIX = 32, 16, 8


def launch_configs(heads_per_kv: int, head_dim: int = 128) -> list[tuple[str, CascadeLaunchConfig]]:
    """Every (mode, config) that `default_launch_config` returns for this head shape."""
    seen: list[tuple[str, CascadeLaunchConfig]] = []
    rows = 1
    while rows <= 2 * _MAX_GROUP_ROWS:  # one doubling past the cap proves the cap holds
        for mode in ("decode", "extend"):
            entry = (mode, default_launch_config(mode, heads_per_kv, rows, head_dim))
            if entry not in seen:
                seen.append(entry)
        rows *= 2
    return seen


def compile_launch_configs(k_buffer: torch.Tensor, v_buffer: torch.Tensor, *, num_q_heads: int,
                           dtype: torch.dtype) -> list[tuple[str, CascadeLaunchConfig]]:
    """Run one small plan per launch configuration over `k_buffer` / `v_buffer` ([slots,
    Hkv, D], the engine's own layer buffers: same strides, hence the same variants). Reads
    slots [1, 1 + 48) only. Returns the configurations run."""
    from .cascade_attention import cascade_forward

    num_kv_heads, head_dim = int(k_buffer.shape[-2]), int(k_buffer.shape[-1])
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not divide over {num_kv_heads} KV heads")
    device = k_buffer.device
    slots = torch.arange(1, 1 + _PREFIX + 2 * _SUFFIX, dtype=torch.int32, device=device)
    common = dict(
        prefix_kv_indptr=[0, _PREFIX], prefix_kv_indices=slots[:_PREFIX],
        suffix_kv_indptr=[0, _SUFFIX, 2 * _SUFFIX], suffix_kv_indices=slots[_PREFIX:],
        request_group=[0, 0], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, prefix_packing="always", max_kv_chunk=_CHUNK,
    )
    done = []
    for mode, config in launch_configs(num_q_heads // num_kv_heads, head_dim):
        if mode == "decode":
            plan = build_decode_plan(**common, config=config)
        else:
            plan = build_extend_plan(**common, qo_indptr=[0, 1, 2], config=config)
        q = torch.zeros(plan.num_tokens, num_q_heads, head_dim, dtype=dtype, device=device)
        cascade_forward(q, k_buffer, v_buffer, plan, head_dim**-0.5)
        done.append((mode, config))
    return done


__all__ = ["compile_launch_configs", "launch_configs"]
