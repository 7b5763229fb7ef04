"""Start-up compilation of the fused kernel: `kernels/warmup.py` covers every launch config."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sglang_batchllm.kernels import synthetic
from sglang_batchllm.kernels.cascade_plan import build_decode_plan, default_launch_config
from sglang_batchllm.kernels.warmup import compile_launch_configs, launch_configs


@pytest.mark.parametrize("hpk", [1, 2, 4, 7, 8, 16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_launch_configs_cover_every_default(hpk, head_dim):
    listed = launch_configs(hpk, head_dim)
    assert len(listed) == len(set(listed))
    for rows in range(0, 1200):
        for mode in ("decode", "extend"):
            assert (mode, default_launch_config(mode, hpk, rows, head_dim)) in listed, (mode, rows)
    assert {mode for mode, _ in listed} == {"decode", "extend"}


def test_wide_heads_keep_the_shorter_request_step():
    # three stages of 128-position K and V tiles need 148 KB of shared memory at head_dim 128
    assert default_launch_config("decode", 4, 64, 128).block_n_request == 128
    assert default_launch_config("decode", 4, 64, 256).block_n_request == 64


def test_four_query_heads_per_kv_head_compile_three_decode_tiles_and_one_extend():
    heights = sorted(c.block_m_group for mode, c in launch_configs(4) if mode == "decode")
    assert heights == [16, 32, 64]
    assert [m for m, _ in launch_configs(4)].count("extend") == 1


def test_compile_launch_configs_runs_each_config_over_the_callers_buffers():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k = torch.randn(64, 2, 16, dtype=dtype, device=device)
    v = torch.randn_like(k)
    before = (k.clone(), v.clone())
    done = compile_launch_configs(k, v, num_q_heads=8, dtype=dtype)
    assert done == launch_configs(4, head_dim=16)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])  # it only reads the pool


def test_compile_launch_configs_refuses_uneven_heads():
    k = torch.zeros(64, 3, 16)
    with pytest.raises(ValueError, match="do not divide"):
        compile_launch_configs(k, k, num_q_heads=8, dtype=torch.float32)


@pytest.mark.gpu
def test_after_warm_up_a_large_group_step_compiles_nothing():
    import triton

    from sglang_batchllm.kernels.cascade_attention import cascade_decode

    batch = synthetic.make_batch(
        group_sizes=[16] * 8, prefix_lens=[300], suffix_lens=[40, 77], num_q_heads=32,
        num_kv_heads=8, head_dim=128, page_size=1, dtype=torch.bfloat16, device="cuda",
    )
    compile_launch_configs(batch.k_buffer, batch.v_buffer, num_q_heads=32, dtype=torch.bfloat16)
    compiled = []
    saved = triton.knobs.runtime.jit_post_compile_hook
    triton.knobs.runtime.jit_post_compile_hook = lambda *a, **kw: compiled.append(kw.get("fn"))
    try:
        plan = build_decode_plan(**batch.plan_kwargs())
        cascade_decode(batch.q, batch.k_buffer, batch.v_buffer, plan, 128**-0.5)
        torch.cuda.synchronize()
    finally:
        triton.knobs.runtime.jit_post_compile_hook = saved
    assert plan.config.block_m_group == 64
    assert compiled == []
