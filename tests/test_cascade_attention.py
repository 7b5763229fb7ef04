"""Cascade attention: the laws of the reference, and the Triton kernel against it.

Without CUDA the kernels run under TRITON_INTERPRET=1 on the CPU (set below, before the kernel
module is imported), on small odd shapes. With CUDA the same tests run natively, and the
`gpu`-marked ones add realistic shapes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import given, settings
from hypothesis import strategies as st


def _import_kernels():
    """`sglang_batchllm.kernels`, also from a checkout that is not pip-installed."""
    try:
        from sglang_batchllm import kernels

        return kernels
    except ImportError:
        pass
    repo = Path(__file__).resolve().parents[1]
    if "sglang_batchllm" not in sys.modules:
        parent = types.ModuleType("sglang_batchllm")
        parent.__path__ = [str(repo / "sglang_batchllm")]
        sys.modules["sglang_batchllm"] = parent
    spec = importlib.util.spec_from_file_location(
        "sglang_batchllm.kernels",
        repo / "kernels" / "__init__.py",
        submodule_search_locations=[str(repo / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kernels = _import_kernels()
from sglang_batchllm.kernels import reference, synthetic
from sglang_batchllm.kernels.cascade_attention import cascade_decode, cascade_extend
from sglang_batchllm.kernels.cascade_plan import (
    F_NUM_TOKENS,
    CascadeWorkspace,
    default_launch_config,
    CascadePlanError,
    build_decode_plan,
    build_extend_plan,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SM_SCALE = 0.17
gpu = pytest.mark.gpu
# the Triton interpreter itself trips a numpy deprecation warning on every scalar index
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tolerance(dtype) -> float:
    if dtype == torch.float32:  # fp32 inputs run fp32 ("ieee") dots, also on the GPU
        return 2e-5
    return 1e-2  # bf16 / fp16 operands and output (METHOD.md: 1e-3 .. 1e-2)


def _rel_err(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _run(batch, **plan_options):
    """Kernel output (out poisoned with NaN first) and the plan that produced it."""
    build = build_decode_plan if batch.qo_indptr is None else build_extend_plan
    plan = build(**batch.plan_kwargs(), **plan_options)
    out = torch.full_like(batch.q, float("nan"))
    run = cascade_decode if batch.qo_indptr is None else cascade_extend
    result = run(batch.q, batch.k_buffer, batch.v_buffer, plan, SM_SCALE, out=out)
    assert result is out
    return out, plan


def _reference(batch, **kw):
    return reference.cascade_attention_reference(
        batch.q, batch.k_buffer, batch.v_buffer, **batch.reference_kwargs(), sm_scale=SM_SCALE, **kw
    )


def _check(batch, **plan_options):
    out, plan = _run(batch, **plan_options)
    assert not out.isnan().any(), "an output element was not written (or a bad slot was read)"
    err = _rel_err(out, _reference(batch))
    assert err < _tolerance(batch.q.dtype), f"relative error {err:.2e} with {plan_options}"
    return out, plan


# ---------------------------------------------------------------------------------------------
# Laws of the reference (plain torch, fast)


@settings(max_examples=25, deadline=None)
@given(
    group_sizes=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    prefix=st.integers(0, 12),
    suffixes=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    ungrouped=st.integers(0, 2),
    q_lens=st.one_of(st.none(), st.lists(st.integers(1, 5), min_size=1, max_size=3)),
    heads_per_kv=st.sampled_from([1, 2, 3]),
    split=st.integers(0, 14),
    seed=st.integers(0, 2**16),
)
def test_reference_cascade_equals_full_attention(
    group_sizes, prefix, suffixes, ungrouped, q_lens, heads_per_kv, split, seed
):
    batch = synthetic.make_batch(
        group_sizes=group_sizes, prefix_lens=[prefix], suffix_lens=suffixes,
        num_ungrouped=ungrouped, q_lens=q_lens, num_q_heads=2 * heads_per_kv, num_kv_heads=2,
        head_dim=16, dtype=torch.float32, seed=seed,
    )
    kw = dict(**batch.reference_kwargs(), sm_scale=SM_SCALE)
    full = reference.full_attention_reference(batch.q, batch.k_buffer, batch.v_buffer, **kw)
    cascade = reference.cascade_attention_reference(
        batch.q, batch.k_buffer, batch.v_buffer, **kw, prefix_split_points=[split]
    )
    torch.testing.assert_close(cascade, full, rtol=1e-5, atol=1e-5)


def _state(draw_lse, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(n, d, generator=gen, dtype=torch.float64)
    lse = torch.tensor(draw_lse, dtype=torch.float64)
    o[torch.isinf(lse)] = 0.0  # an empty state has output 0
    return o, lse


_lse = st.lists(
    st.one_of(st.floats(-30, 30), st.just(float("-inf"))), min_size=3, max_size=3
)


@settings(max_examples=40, deadline=None)
@given(a=_lse, b=_lse, c=_lse, seed=st.integers(0, 2**16))
def test_merge_is_commutative_and_associative(a, b, c, seed):
    sa, sb, sc = _state(a, 3, 4, seed), _state(b, 3, 4, seed + 1), _state(c, 3, 4, seed + 2)
    merge = reference.merge_states
    ab = merge(*sa, *sb)
    ba = merge(*sb, *sa)
    torch.testing.assert_close(ab, ba)
    left = merge(*ab, *sc)
    right = merge(*sa, *merge(*sb, *sc))
    torch.testing.assert_close(left[0], right[0])
    torch.testing.assert_close(left[1], right[1])


def test_merge_with_empty_state_is_identity():
    o, lse = _state([1.5, -2.0, 0.0], 3, 4, 0)
    empty = (torch.zeros_like(o), torch.full_like(lse, float("-inf")))
    torch.testing.assert_close(reference.merge_states(o, lse, *empty), (o, lse))
    both = reference.merge_states(*empty, *empty)
    assert (both[0] == 0).all() and torch.isinf(both[1]).all()


# ---------------------------------------------------------------------------------------------
# Kernel == reference on odd shapes (interpreter on the CPU, native on the GPU)

_ODD = {"group_sizes": [1, 5, 17], "prefix_lens": [37], "num_ungrouped": 2}


@pytest.mark.parametrize(
    "page_size,packing,num_q_heads,num_kv_heads,head_dim,dtype",
    [
        (1, "auto", 6, 2, 64, torch.float32),  # 3 q heads per KV head
        (16, "always", 4, 4, 64, torch.float32),  # MHA, every group packed
        (16, "never", 8, 1, 128, torch.float32),  # 8 per KV head, head_dim 128, no packing
        (16, "auto", 4, 2, 64, torch.bfloat16),
        (1, "auto", 4, 1, 64, torch.float16),
    ],
)
def test_decode_matches_reference(page_size, packing, num_q_heads, num_kv_heads, head_dim, dtype):
    batch = synthetic.make_batch(
        **_ODD, suffix_lens=[0, 1, 19], num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, page_size=page_size, dtype=dtype, device=DEVICE, seed=page_size,
    )
    _, plan = _check(batch, prefix_packing=packing)
    assert plan.packed_groups.tolist() == {
        "auto": [False, True, True], "always": [True] * 3, "never": [False] * 3
    }[packing]


@pytest.mark.parametrize(
    "page_size,packing,num_q_heads,num_kv_heads,dtype",
    [
        (16, "auto", 4, 2, torch.float32),
        (1, "always", 6, 2, torch.float32),
        (16, "never", 2, 2, torch.bfloat16),
    ],
)
def test_extend_matches_reference(page_size, packing, num_q_heads, num_kv_heads, dtype):
    batch = synthetic.make_batch(
        **_ODD, suffix_lens=[1, 19, 40], q_lens=[1, 3, 17], num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=64, page_size=page_size, dtype=dtype,
        device=DEVICE, seed=7 + page_size,
    )
    _check(batch, prefix_packing=packing)


@pytest.mark.parametrize("mode", ["decode", "extend"])
def test_any_split_point_gives_the_same_output(mode):
    batch = synthetic.make_batch(
        group_sizes=[3, 1], prefix_lens=[45, 20], suffix_lens=[30, 0, 9] if mode == "decode" else [30, 9],
        num_ungrouped=1, q_lens=None if mode == "decode" else [4, 9], num_q_heads=4,
        num_kv_heads=2, head_dim=64, page_size=16, dtype=torch.float32, device=DEVICE, seed=3,
    )
    base, _ = _check(batch, max_kv_chunk=None)
    for chunk in (5, 16, 33):
        out, plan = _check(batch, max_kv_chunk=chunk, prefix_packing="always")
        assert plan.group_num_splits.max() > 1
        torch.testing.assert_close(out, base, rtol=1e-4, atol=1e-4)


def test_empty_parts():
    # group 0 has an empty prefix; every decode suffix is empty except the ungrouped one's
    batch = synthetic.make_batch(
        group_sizes=[2, 3], prefix_lens=[0, 21], suffix_lens=[0], num_ungrouped=1,
        num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=DEVICE, seed=5,
    )
    out, _ = _run(batch, prefix_packing="always")
    ref = _reference(batch)
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-4, atol=1e-4)
    nothing = [b for b in range(len(batch.request_group)) if batch.request_slots(b).numel() == 0]
    assert nothing and (out[nothing] == 0).all()  # attention over no key is 0


def test_plan_streams_short_requests_back_to_back():
    # 10 ungrouped decode requests, 4 query heads per KV head, 16-row tiles: 4 requests a tile
    batch = synthetic.make_batch(
        group_sizes=[], prefix_lens=[0], suffix_lens=[5, 0, 9], num_ungrouped=10,
        num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=DEVICE, seed=2,
    )
    out, plan = _check(batch)
    items = plan.items.cpu()
    assert items.shape[0] == 3 and items[:, F_NUM_TOKENS].tolist() == [4, 4, 2]
    assert not plan.needs_merge  # one partial per token: written straight to the output
    nothing = [b for b in range(10) if batch.request_slots(b).numel() == 0]
    assert (out[nothing] == 0).all()


def test_empty_batch():
    empty = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    plan = build_decode_plan(
        prefix_kv_indptr=[0], prefix_kv_indices=empty, suffix_kv_indptr=[0],
        suffix_kv_indices=empty, request_group=[], num_q_heads=4, num_kv_heads=2, head_dim=64,
    )
    q = torch.zeros(0, 4, 64, device=DEVICE)
    kv = torch.zeros(8, 2, 64, device=DEVICE)
    assert cascade_decode(q, kv, kv, plan, SM_SCALE).shape == (0, 4, 64)


def test_plan_rejects_bad_inputs():
    idx = torch.arange(10, dtype=torch.int32, device=DEVICE)
    good = {
        "prefix_kv_indptr": [0, 4], "prefix_kv_indices": idx[:4], "suffix_kv_indptr": [0, 3, 6],
        "suffix_kv_indices": idx[4:], "request_group": [0, -1], "num_q_heads": 4, "num_kv_heads": 2,
        "head_dim": 64,
    }
    build_decode_plan(**good)
    for change, words in [
        ({"prefix_kv_indptr": [0, 5]}, "holds 4 slots"),
        ({"suffix_kv_indptr": [0, 4, 3]}, "non-decreasing"),
        ({"request_group": [0, 1]}, "-1 or in [0, 1)"),
        ({"request_group": [0]}, "2 entries"),
        ({"num_q_heads": 3}, "multiple"),
        ({"prefix_kv_indices": idx[:4].float()}, "int32 or int64"),
    ]:
        with pytest.raises(CascadePlanError, match=re.escape(words)):
            build_decode_plan(**{**good, **change})
    with pytest.raises(CascadePlanError, match="suffix slots"):
        build_extend_plan(**good, qo_indptr=[0, 4, 5])
    plan = build_decode_plan(**good)
    q = torch.zeros(2, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    kv = torch.zeros(16, 2, 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="cast q"):
        cascade_decode(q, kv, kv, plan, SM_SCALE)
    with pytest.raises(ValueError, match="build_extend_plan"):
        cascade_extend(q, kv.bfloat16(), kv.bfloat16(), plan, SM_SCALE)


def _into_workspace(batch, workspace, **plan_options):
    """Plan `batch` into `workspace`, its prefix and suffix slots in one buffer (slot_base)."""
    kw = batch.plan_kwargs()
    slots = torch.cat([kw["prefix_kv_indices"], kw["suffix_kv_indices"]])
    base = torch.zeros(slots.numel() + 7, dtype=slots.dtype, device=slots.device)
    base[: slots.numel()] = slots
    n = kw["prefix_kv_indices"].numel()
    kw["prefix_kv_indices"], kw["suffix_kv_indices"] = base[:n], base[n : slots.numel()]
    build = build_decode_plan if batch.qo_indptr is None else build_extend_plan
    return build(**kw, workspace=workspace, slot_base=base, **plan_options), base


def test_workspace_plans_replay_at_fixed_addresses():
    """One workspace serves a sequence of different steps (as a captured CUDA graph replays):
    same tensor addresses and launch grid every time, stale items of a larger earlier plan never
    run, and each output matches the reference."""
    shapes = [
        dict(group_sizes=[5, 3], prefix_lens=[40, 17], suffix_lens=[3, 11, 0], num_ungrouped=2),
        dict(group_sizes=[2], prefix_lens=[9], suffix_lens=[1], num_ungrouped=1),
        dict(group_sizes=[], prefix_lens=[0], suffix_lens=[7, 30], num_ungrouped=6),
    ]
    batches = [
        synthetic.make_batch(**shape, num_q_heads=4, num_kv_heads=2, head_dim=64,
                             dtype=torch.float32, device=DEVICE, seed=11 + i)
        for i, shape in enumerate(shapes)
    ]
    config = default_launch_config("decode", 2, 64)
    ws = CascadeWorkspace(max_tokens=16, num_q_heads=4, head_dim=64, device=DEVICE, config=config)
    addresses = None
    for batch in batches:
        plan, base = _into_workspace(batch, ws, max_kv_chunk=8)  # many pieces, many partials
        assert plan.grid_items == ws.max_items and plan.config == config
        here = [t.data_ptr() for t in (plan.items, plan.token_num_partials, plan.partial_out,
                                        plan.num_items_dev)]
        assert addresses in (None, here)
        addresses = here
        assert int(plan.num_items_dev.item()) == plan.num_items < ws.max_items
        out = cascade_decode(batch.q, batch.k_buffer, batch.v_buffer, plan, SM_SCALE,
                             out=torch.full_like(batch.q, float("nan")))
        assert not out.isnan().any()
        assert _rel_err(out, _reference(batch)) < _tolerance(batch.q.dtype)


def _int_arrays(plan):
    return {name: getattr(plan, name) for name in (
        "items", "prefix_kv_indices", "suffix_kv_indices", "group_q_tokens", "token_partial_start",
        "token_own_partial_start", "token_num_partials", "token_suffix_start", "token_qpos",
    )} | ({"num_items_dev": plan.num_items_dev} if plan.num_items_dev is not None else {})


@pytest.mark.parametrize("num_ungrouped", [1, 2, 3])
@pytest.mark.parametrize("suffix", [[1], [3, 6], [5, 2, 9]])
def test_every_array_a_kernel_reads_starts_on_16_bytes(num_ungrouped, suffix):
    """Triton specializes pointer arguments on 16-byte alignment: arrays at step-dependent
    offsets would compile a kernel variant per alignment pattern. Eager and workspace plans of
    odd sizes keep every array aligned."""
    batch = synthetic.make_batch(group_sizes=[3, 2], prefix_lens=[13, 7], suffix_lens=suffix,
                                 num_ungrouped=num_ungrouped, num_q_heads=4, num_kv_heads=2,
                                 head_dim=64, dtype=torch.float32, device=DEVICE, seed=5)
    config = default_launch_config("decode", 2, 64)
    ws = CascadeWorkspace(max_tokens=13, num_q_heads=4, head_dim=64, device=DEVICE, config=config)
    eager = build_decode_plan(**batch.plan_kwargs(), max_kv_chunk=8)
    fixed, _ = _into_workspace(batch, ws, max_kv_chunk=8)
    for plan in (eager, fixed):
        arrays = _int_arrays(plan)
        assert {n: t.data_ptr() % 16 for n, t in arrays.items() if t.numel()} == {n: 0 for n, t in arrays.items() if t.numel()}
        out = cascade_decode(batch.q, batch.k_buffer, batch.v_buffer, plan, SM_SCALE)
        assert _rel_err(out, _reference(batch)) < _tolerance(batch.q.dtype)


def test_a_slot_base_suffix_may_start_at_the_next_aligned_offset():
    batch = synthetic.make_batch(group_sizes=[3], prefix_lens=[13], suffix_lens=[2, 5],
                                 num_ungrouped=1, num_q_heads=4, num_kv_heads=2, head_dim=64,
                                 dtype=torch.float32, device=DEVICE, seed=6)
    kw = batch.plan_kwargs()
    n, m = kw["prefix_kv_indices"].numel(), kw["suffix_kv_indices"].numel()
    config = default_launch_config("decode", 2, 64)
    ws = CascadeWorkspace(max_tokens=8, num_q_heads=4, head_dim=64, device=DEVICE, config=config)
    for gap in (0, 1, 3, 4):
        base = torch.zeros(n + gap + m, dtype=kw["prefix_kv_indices"].dtype, device=DEVICE)
        base[:n], base[n + gap:] = kw["prefix_kv_indices"], kw["suffix_kv_indices"]
        args = {**kw, "prefix_kv_indices": base[:n], "suffix_kv_indices": base[n + gap:]}
        if gap >= 4:  # not "following" any more: a caller's mistake, refused
            with pytest.raises(CascadePlanError, match="must follow"):
                build_decode_plan(**args, workspace=ws, slot_base=base)
            continue
        plan = build_decode_plan(**args, workspace=ws, slot_base=base)
        out = cascade_decode(batch.q, batch.k_buffer, batch.v_buffer, plan, SM_SCALE)
        assert _rel_err(out, _reference(batch)) < _tolerance(batch.q.dtype)


def test_workspace_capacity_lengthens_pieces_until_the_plan_fits():
    batch = synthetic.make_batch(
        group_sizes=[4], prefix_lens=[200], suffix_lens=[50], num_ungrouped=1, num_q_heads=4,
        num_kv_heads=2, head_dim=64, dtype=torch.float32, device=DEVICE, seed=4,
    )
    config = default_launch_config("decode", 2, 64)
    roomy = CascadeWorkspace(max_tokens=5, num_q_heads=4, head_dim=64, device=DEVICE, config=config)
    tight = CascadeWorkspace(max_tokens=5, num_q_heads=4, head_dim=64, device=DEVICE, config=config,
                             max_items=4, max_partials=10)
    wide, _ = _into_workspace(batch, roomy, max_kv_chunk=16)
    narrow, _ = _into_workspace(batch, tight, max_kv_chunk=16)
    assert wide.num_items > 4 >= narrow.num_items
    out = cascade_decode(batch.q, batch.k_buffer, batch.v_buffer, narrow, SM_SCALE)
    assert _rel_err(out, _reference(batch)) < _tolerance(batch.q.dtype)
    with pytest.raises(CascadePlanError, match="exceed the workspace"):
        _into_workspace(batch, CascadeWorkspace(max_tokens=4, num_q_heads=4, head_dim=64,
                                                device=DEVICE, config=config))


# ---------------------------------------------------------------------------------------------
# Realistic shapes on the GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(32, 8, 128), (8, 8, 64), (64, 8, 128)])
def test_gpu_decode_realistic(dtype, num_q_heads, num_kv_heads, head_dim):
    batch = synthetic.make_batch(
        group_sizes=[16] * 6 + [1, 3], prefix_lens=[2000, 1024], suffix_lens=range(200, 301, 7),
        num_ungrouped=5, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=16, dtype=dtype, device="cuda", seed=11,
    )
    _check(batch)
    _check(batch, max_kv_chunk=300)


@gpu
@needs_cuda
@pytest.mark.parametrize("q_lens,packing", [([256, 100], "auto"), ([16, 3], "auto"), ([40], "always")])
def test_gpu_extend_realistic(q_lens, packing):
    batch = synthetic.make_batch(
        group_sizes=[4, 8, 1], prefix_lens=[2000, 512], suffix_lens=[300, 256, 100],
        num_ungrouped=3, q_lens=q_lens, num_q_heads=32, num_kv_heads=8, head_dim=128,
        page_size=16, dtype=torch.bfloat16, device="cuda", seed=12,
    )
    _check(batch, prefix_packing=packing)
