"""The compute floor's arithmetic (floor.py)."""

import pytest

from sglang_batchllm.bench.floor import decode_matmul_flops, prefill_flops, workload_floor
from sglang_batchllm.bench.model import ModelShape, write_llama31_8b_dir
from sglang_batchllm.bench.workloads import Sharing


def tiny(**kw):
    base = dict(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=100,
                tie_embeddings=False, dtype_bytes=2, special_ids=())
    return ModelShape(**{**base, **kw})


def test_parameter_counts_by_hand():
    m = tiny()
    # per layer: q 8x8 + k,v 8x4 each + o 8x8 = 192; mlp 3 x 8 x 16 = 384
    assert m.layer_matmul_params == 2 * (192 + 384)
    assert m.lm_head_params == 800
    assert m.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2


def test_prefill_flops_by_hand():
    m = tiny()
    share = Sharing(logical_tokens=30, unique_tokens=10, unique_attention_pairs=55)
    expected = 2 * 1152 * 10 + 2 * 800 * 3 + 4 * 2 * 2 * 4 * 55
    assert prefill_flops(m, share, num_requests=3) == expected
    assert decode_matmul_flops(m, 7) == 2 * (1152 + 800) * 7


def test_floor_seconds_and_decode_tokens():
    m = tiny()
    share = Sharing(30, 10, 55)
    f = workload_floor(m, share, num_requests=3, output_tokens=12, matmul_tflops=1e-9)  # 1000 FLOP/s
    assert f.prefill_s == pytest.approx(prefill_flops(m, share, 3) / 1000)
    assert f.decode_matmul_flops == decode_matmul_flops(m, 12 - 3)  # first token comes from prefill
    assert f.to_dict()["prefill_floor_s"] == pytest.approx(f.prefill_s)
    with pytest.raises(ValueError):
        workload_floor(m, share, 3, 12, 0.0)


def test_authors_floor_matches_the_baseline_estimate(tmp_path):
    """docs/baseline.md: W2's prefill, each unique token once, is about 31 PFLOP, about 40 s at
    the H200's measured 790 TFLOP/s."""
    m = ModelShape.from_config_dir(write_llama31_8b_dir(tmp_path))
    assert 2 * (m.layer_matmul_params + m.lm_head_params) == pytest.approx(15e9, rel=0.03)  # ~15 GFLOP/token
    unique = 400 * 2000 + 6400 * 200
    pairs = 400 * 2000 * 2001 // 2 + 6400 * sum(range(2001, 2201))
    f = workload_floor(m, Sharing(6400 * 2200, unique, pairs), 6400, 6400 * 100, 790.0)
    assert f.prefill_flops == pytest.approx(31e15, rel=0.05)
    assert f.prefill_s == pytest.approx(40, rel=0.05)
    assert f.decode_matmul_s == pytest.approx(12, rel=0.1)  # baseline: decode matmuls about 11 s
