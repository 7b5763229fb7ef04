"""`batchllm` attention backend: MIXED steps with decode rows on the decode kernel.

Each synthetic step is checked against a plain fp32 torch reference (causal attention over each
request's full context) and against SGLang's own Triton backend on the same step. Without CUDA,
SGLang's Triton kernels run under TRITON_INTERPRET=1 on the CPU in fp32; the variable has to be
set before `triton.jit` decorates them, so this module sets it before importing SGLang, and when
an earlier test module already imported them compiled, `test_cpu_suite_in_fresh_interpreter`
reruns this file in a fresh interpreter. With CUDA the same tests run natively in bf16, and the
`gpu`-marked test adds a realistic size and prints a timing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime.interpreter import InterpretedFunction

from sglang.kernels.ops.attention import decode_attention, extend_attention
from sglang.kernels.ops.kvcache import kv_indices
from sglang.srt.configs.model_config import AttentionArch
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.cuda_graph_config import Backend, CudaGraphConfig, PhaseConfig
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.runtime_context import get_context, get_parallel

from sglang_batchllm.runtime import attention_backend as batchllm
from sglang_batchllm.runtime import row_prefixes
from sglang_batchllm.runtime.row_prefixes import RowPrefixes
from sglang_batchllm.runtime.stats import STATS
from sglang_batchllm.runtime.attention_backend import (
    BatchLLMAttnBackend,
    split_count_warm_up_sizes,
    count_decode_rows,
    mixed_fallback_reason,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # numpy (the interpreter) has no bf16 dot
TOLERANCE = 1e-2 if CUDA else 2e-5  # relative error (norm); fp32 interpreter dots are exact fp32
SM_SCALE = 0.21
gpu = pytest.mark.gpu

# Compiled kernels on a CPU-only machine: an earlier test module imported SGLang's kernels
# before TRITON_INTERPRET was set, so they cannot run here (see the fresh-interpreter test).
_KERNELS = (
    decode_attention._fwd_grouped_kernel_stage1,
    decode_attention._fwd_kernel_stage2,
    extend_attention._fwd_kernel,
    kv_indices.create_flashinfer_kv_indices_triton,
)
_STALE_KERNELS = not CUDA and not all(isinstance(k, InterpretedFunction) for k in _KERNELS)
needs_kernels = pytest.mark.skipif(
    _STALE_KERNELS, reason="SGLang's kernels were imported compiled; rerun in a fresh interpreter"
)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.skipif(not _STALE_KERNELS, reason="this interpreter runs the kernels itself")
def test_cpu_suite_in_fresh_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Pure rules


@pytest.mark.parametrize(
    "extend_lens, expected",
    [
        ([37, 19, 1, 1, 1], 3),  # mix_with_running appends one-token decode rows
        ([37, 1], 1),
        ([37, 19], 0),  # no decode rows: the parent's path
        ([23, 1, 1, 5, 1, 1], 2),  # only the trailing run counts
        ([1, 1, 1], 2),  # a one-token prefill row first: one row stays on the extend path
        ([1], 0),
    ],
)
def test_count_decode_rows(extend_lens, expected):
    assert count_decode_rows(extend_lens) == expected
    assert count_decode_rows(torch.tensor(extend_lens)) == expected


def test_mixed_fallback_reason_names_each_feature():
    base = dict(use_mla=False, sliding_window=False, encoder_decoder=False, speculative=False,
                dcp_size=1, deterministic=False)
    assert mixed_fallback_reason(**base) is None
    for key, value, word in [
        ("use_mla", True, "MLA"), ("sliding_window", True, "sliding"),
        ("encoder_decoder", True, "encoder"), ("speculative", True, "speculative"),
        ("dcp_size", 2, "context parallel"), ("deterministic", True, "deterministic"),
    ]:
        assert word in mixed_fallback_reason(**{**base, key: value})


def test_register_is_idempotent_and_the_cli_accepts_the_name():
    from sglang.srt import server_args

    batchllm.register()
    batchllm.register()
    assert ATTENTION_BACKENDS["batchllm"] is batchllm.create_batchllm_backend
    assert server_args.ATTENTION_BACKEND_CHOICES.count("batchllm") == 1
    import argparse

    parser = argparse.ArgumentParser()
    server_args.ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", "m", "--attention-backend", "batchllm"])
    assert args.attention_backend == "batchllm"


# ---------------------------------------------------------------------------------------------
# Synthetic steps


class _TinyModelConfig:
    attention_arch = AttentionArch.MHA
    swa_v_head_dim = None
    is_encoder_decoder = False
    linear_attn_registry_result = None

    def __init__(self, num_q_heads, num_kv_heads, head_dim, context_len):
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.v_head_dim = head_dim
        self.context_len = context_len
        self.hf_config = SimpleNamespace(architectures=["TinyForCausalLM"])
        self.hf_config.get_text_config = lambda: self.hf_config
        self.hf_text_config = self.hf_config

    def get_max_num_attention_heads(self):
        return self.num_q_heads

    def get_num_kv_heads(self, tp_size):
        return self.num_kv_heads // tp_size


@pytest.fixture
def published_config():
    """The process-wide config the Triton backend reads (spec bag, CUDA-graph phases)."""
    graphs = CudaGraphConfig(
        decode=PhaseConfig(backend=Backend.DISABLED), prefill=PhaseConfig(backend=Backend.DISABLED)
    )
    with get_parallel().override(attn_tp_size=1), get_context().override_server_args(
        attention_backend="batchllm", chunked_prefill_size=8192, enable_mixed_chunk=True,
        cuda_graph_config=graphs, enable_deterministic_inference=False,
        speculative_algorithm=None, speculative_eagle_topk=0, speculative_num_draft_tokens=0,
        speculative_num_steps=0, triton_attention_num_kv_splits=8,
        triton_attention_split_tile_size=None, tp_size=1, dp_size=1, pp_size=1,
    ) as server_args:
        yield server_args


def _runner(server_args, *, num_q_heads=8, num_kv_heads=2, head_dim=16, max_reqs=8,
            context_len=256, pool_size=2048, page_size=1, is_draft_worker=False):
    pool = MHATokenToKVPool(
        size=pool_size, page_size=page_size, dtype=DTYPE, head_num=num_kv_heads,
        head_dim=head_dim, layer_num=1, device=DEVICE, enable_memory_saver=False,
        enable_alt_stream=False,
    )
    pool.get_key_buffer(0).fill_(float("nan"))  # unowned slots: a stray read shows
    pool.get_value_buffer(0).fill_(float("nan"))
    return SimpleNamespace(
        model_config=_TinyModelConfig(num_q_heads, num_kv_heads, head_dim, context_len),
        server_args=server_args,
        req_to_token_pool=ReqToTokenPool(max_reqs, context_len, DEVICE, False),
        token_to_kv_pool=pool,
        token_to_kv_pool_allocator=SimpleNamespace(page_size=page_size),
        sliding_window_size=None, page_size=page_size, device=DEVICE, gpu_id=0,
        is_draft_worker=is_draft_worker, dtype=DTYPE,
    )


@dataclass
class Step:
    batch: ForwardBatch
    q: torch.Tensor  # [T, Hq * D], this step's query tokens
    k: torch.Tensor  # [T, Hkv, D], their keys and values (written by the backend)
    v: torch.Tensor
    reference: torch.Tensor  # [T, Hq * D] fp32
    layer: RadixAttention


def _make_step(runner, rows, *, mode=ForwardMode.MIXED, seed=0, logit_cap=0.0, sinks=None):
    """rows: (prefix_len, extend_len) per request; a decode row is (context - 1, 1). Prefix KV
    goes to random slots of the pool; requests sit in shuffled req_to_token rows."""
    config = runner.model_config
    hq, hkv, d = config.num_q_heads, config.num_kv_heads, config.v_head_dim
    gen = torch.Generator().manual_seed(seed)
    total = sum(p + e for p, e in rows)
    pool = runner.token_to_kv_pool
    slots = (torch.randperm(pool.size - 1, generator=gen)[:total] + 1).tolist()
    pool_rows = (torch.randperm(runner.req_to_token_pool.size, generator=gen)[: len(rows)] + 1)
    k_buf, v_buf = pool.get_key_buffer(0), pool.get_value_buffer(0)
    qs, ks, vs, refs, out_loc = [], [], [], [], []
    for (prefix, extend), pool_row in zip(rows, pool_rows.tolist()):
        length = prefix + extend
        row_slots = slots[:length]
        del slots[:length]
        keys = torch.randn(length, hkv, d, generator=gen)
        values = torch.randn(length, hkv, d, generator=gen)
        query = torch.randn(extend, hq, d, generator=gen)
        keys, values, query = (t.to(DTYPE).float() for t in (keys, values, query))
        runner.req_to_token_pool.req_to_token[pool_row, :length] = torch.tensor(row_slots)
        k_buf[row_slots[:prefix]] = keys[:prefix].to(DEVICE, DTYPE)
        v_buf[row_slots[:prefix]] = values[:prefix].to(DEVICE, DTYPE)
        refs.append(_reference(query, keys, values, prefix, logit_cap, sinks))
        qs.append(query)
        ks.append(keys[prefix:])
        vs.append(values[prefix:])
        out_loc += row_slots[prefix:]
    batch = _forward_batch(mode, [p for p, _ in rows], [e for _, e in rows], pool_rows, out_loc)
    return _step(batch, qs, ks, vs, refs, RadixAttention(hq, d, SM_SCALE, hkv, layer_id=0, logit_cap=logit_cap))


def _step(batch, qs, ks, vs, refs, layer) -> Step:
    """Per-row queries, new keys/values and fp32 references, concatenated in token order."""
    hq, d = layer.tp_q_head_num, layer.qk_head_dim
    return Step(
        batch=batch,
        q=torch.cat(qs).reshape(-1, hq * d).to(DEVICE, DTYPE),
        k=torch.cat(ks).to(DEVICE, DTYPE),
        v=torch.cat(vs).to(DEVICE, DTYPE),
        reference=torch.cat(refs).reshape(-1, hq * d),
        layer=layer,
    )


def _forward_batch(mode, prefix_lens, extend_lens, pool_rows, out_loc) -> ForwardBatch:
    """A step's ForwardBatch: row r has prefix_lens[r] cached tokens and extend_lens[r] new ones,
    whose KV goes to `out_loc` (in row order)."""
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    on = dict(device=DEVICE)
    batch = ForwardBatch(
        forward_mode=mode, batch_size=len(seq_lens),
        input_ids=torch.zeros(sum(extend_lens), dtype=torch.int64, **on),
        req_pool_indices=pool_rows.to(DEVICE), seq_lens=torch.tensor(seq_lens, **on),
        seq_lens_cpu=torch.tensor(seq_lens), seq_lens_sum=sum(seq_lens),
        out_cache_loc=torch.tensor(out_loc, dtype=torch.int64, **on),
        positions=torch.cat([torch.arange(p, p + e) for p, e in zip(prefix_lens, extend_lens)]).to(DEVICE),
    )
    if not mode.is_decode():
        batch.extend_prefix_lens = torch.tensor(prefix_lens, dtype=torch.int32, **on)
        batch.extend_seq_lens = torch.tensor(extend_lens, dtype=torch.int32, **on)
        batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu = list(prefix_lens), list(extend_lens)
        batch.extend_num_tokens = sum(extend_lens)
    return batch


def _reference(query, keys, values, prefix, logit_cap=0.0, sinks=None):
    """fp32 causal attention of `query` (the last tokens of the context) over `keys`/`values`."""
    query, keys, values = (t.to(DEVICE) for t in (query, keys, values))
    extend, hq, _ = query.shape
    group = hq // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query, k) * SM_SCALE
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    positions = torch.arange(prefix, prefix + extend, device=DEVICE)
    visible = torch.arange(keys.shape[0], device=DEVICE)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # one extra logit per head with value 0
        sink = sinks.float()[:, None, None].expand(hq, extend, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).cpu()


def _run(backend, step, **kwargs):
    backend.init_forward_metadata(step.batch)
    return backend.forward(step.q, step.k, step.v, step.layer, step.batch, **kwargs)


def _rel_err(out, ref):
    return ((out.float().cpu() - ref).norm() / ref.norm()).item()


def _check_mixed(runner, rows, *, num_decode_rows, **step_kwargs):
    """Ours against the reference and against the parent on one MIXED step."""
    kwargs = {k: v for k, v in step_kwargs.items() if k == "sinks" and v is not None}
    step = _make_step(runner, rows, **step_kwargs)
    ours = BatchLLMAttnBackend(runner)
    out = _run(ours, step, **kwargs)
    plan = ours.decode_rows
    assert plan is not None and plan.num_rows == num_decode_rows
    first_token = sum(e for _, e in rows[: len(rows) - num_decode_rows])
    assert plan.first_token == first_token
    assert torch.isfinite(out).all(), "an output element was not written (or a bad slot read)"
    assert _rel_err(out, step.reference) < TOLERANCE

    parent = _run(TritonAttnBackend(runner), step, **kwargs)
    # prefill rows: the same kernel over the same metadata, bit for bit
    assert torch.equal(out[:first_token], parent[:first_token])
    # decode rows: split-KV vs one pass, equal up to rounding
    assert _rel_err(out[first_token:], parent[first_token:].float().cpu()) < TOLERANCE
    return out


@needs_kernels
def test_mixed_step_matches_reference_and_parent(published_config):
    runner = _runner(published_config)
    # one prefill row without a prefix, one with a cached prefix, 3 decode rows (5..133 keys:
    # 133 is split 5 ways by the decode kernel)
    rows = [(0, 37), (21, 19), (4, 1), (69, 1), (132, 1)]
    _check_mixed(runner, rows, num_decode_rows=3)


@needs_kernels
def test_one_prefill_row_one_decode_row(published_config):
    _check_mixed(_runner(published_config), [(10, 17), (45, 1)], num_decode_rows=1, seed=1)


@needs_kernels
@pytest.mark.parametrize(
    "rows, num_decode_rows",
    [
        # one-token prefill rows (a prompt cached up to its last token, a one-token prompt)
        # right before the decode rows are served by the decode kernel too
        ([(0, 23), (30, 1), (0, 1), (39, 1), (8, 1)], 4),
        ([(12, 1), (39, 1)], 1),  # only one-token rows: the first stays on the extend path
    ],
)
def test_one_token_prefill_rows_take_the_decode_path(published_config, rows, num_decode_rows):
    _check_mixed(_runner(published_config), rows, num_decode_rows=num_decode_rows, seed=2)


@needs_kernels
def test_logit_cap_and_sinks(published_config):
    sinks = torch.linspace(-1.0, 2.0, 8, device=DEVICE, dtype=torch.float32)
    rows = [(0, 21), (7, 9), (50, 1), (3, 1)]
    _check_mixed(_runner(published_config), rows, num_decode_rows=2, seed=3, logit_cap=3.0,
                 sinks=sinks)


@needs_kernels
def test_page_size_16(published_config):
    runner = _runner(published_config, page_size=16)
    _check_mixed(runner, [(16, 20), (47, 1), (80, 1)], num_decode_rows=2, seed=4)


@needs_kernels
def test_score_mod_sees_each_tokens_aux_row(published_config):
    from sglang.kernels.ops.attention.score_mod import relative_bias_score_mod

    runner = _runner(published_config)
    step = _make_step(runner, [(5, 12), (30, 1), (70, 1)], seed=5)
    gen = torch.Generator().manual_seed(6)
    aux = torch.randn(step.q.shape[0], 8, 16, generator=gen).to(DEVICE)  # [tokens, Hq, window]
    kwargs = dict(score_mod=relative_bias_score_mod, aux_tensors=[aux])
    out = _run(BatchLLMAttnBackend(runner), step, **kwargs)
    parent = _run(TritonAttnBackend(runner), step, **kwargs)
    assert torch.isfinite(out).all()
    assert _rel_err(out, parent.float().cpu()) < TOLERANCE
    assert _rel_err(out, step.reference) > 10 * TOLERANCE  # the bias did change the result


@needs_kernels
def test_decode_graph_buffers_serve_as_scratch(published_config):
    runner = _runner(published_config)
    ours = BatchLLMAttnBackend(runner)
    ours.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    step = _make_step(runner, [(0, 30), (40, 1), (9, 1)], seed=11)
    out = _run(ours, step)
    plan = ours.decode_rows
    assert plan.attn_logits.data_ptr() == ours.cuda_graph_attn_logits.data_ptr()
    assert plan.attn_lse.data_ptr() == ours.cuda_graph_attn_lse.data_ptr()
    assert plan.kv_indices.data_ptr() == ours.cuda_graph_kv_indices.data_ptr()
    assert _rel_err(out, step.reference) < TOLERANCE
    # a graph replay plans through the parent only: no stale plan survives it
    decode = _make_step(runner, [(40, 1), (9, 1)], mode=ForwardMode.DECODE, seed=12)
    ours.init_forward_metadata_out_graph(decode.batch)
    assert ours.decode_rows is None


@needs_kernels
@pytest.mark.parametrize("mode", [ForwardMode.EXTEND, ForwardMode.DECODE])
def test_other_modes_are_the_parents_bit_for_bit(published_config, mode):
    runner = _runner(published_config)
    rows = [(0, 37), (21, 19), (9, 1)] if mode == ForwardMode.EXTEND else [(4, 1), (69, 1)]
    step = _make_step(runner, rows, mode=mode, seed=7)
    ours = BatchLLMAttnBackend(runner)
    out = _run(ours, step)
    assert ours.decode_rows is None
    assert torch.equal(out, _run(TritonAttnBackend(runner), step))
    assert _rel_err(out, step.reference) < TOLERANCE


@needs_kernels
def test_unsupported_feature_falls_back_with_one_warning(published_config, caplog):
    runner = _runner(published_config, is_draft_worker=True)  # a speculative draft runner
    with caplog.at_level(logging.WARNING, logger=batchllm.__name__):
        ours = BatchLLMAttnBackend(runner)
    lines = [r.getMessage() for r in caplog.records if r.name == batchllm.__name__]
    assert len(lines) == 1 and "speculative" in lines[0]
    step = _make_step(runner, [(0, 20), (30, 1)], seed=8)
    out = _run(ours, step)
    assert ours.decode_rows is None
    assert torch.equal(out, _run(TritonAttnBackend(runner), step))


# ---------------------------------------------------------------------------------------------
# The fused cascade kernel: rows that start from one cached prefix read it once


def _make_shared_step(runner, rows, *, prefixes, mode=ForwardMode.DECODE, seed=0, publish=True):
    """rows: (prefix id or None, own_len, extend_len): a row's context is its group's prefix
    (shared slots, as radix matching leaves them) then `own_len` tokens of its own, the last
    `extend_len` of which are this step's. prefixes: {id: length}. The rows' radix facts are
    published for the step as `patches/forward_groups.py` does."""
    config = runner.model_config
    hq, hkv, d = config.num_q_heads, config.num_kv_heads, config.v_head_dim
    gen = torch.Generator().manual_seed(seed)
    pool = runner.token_to_kv_pool
    k_buf, v_buf = pool.get_key_buffer(0), pool.get_value_buffer(0)
    free = (torch.randperm(pool.size - 1, generator=gen) + 1).tolist()
    shared = {}
    for pid, length in prefixes.items():
        slots, free[:] = free[:length], free[length:]
        keys, values = (torch.randn(length, hkv, d, generator=gen).to(DTYPE).float() for _ in "kv")
        k_buf[slots] = keys.to(DEVICE, DTYPE)
        v_buf[slots] = values.to(DEVICE, DTYPE)
        shared[pid] = (slots, keys, values)
    pool_rows = torch.randperm(runner.req_to_token_pool.size, generator=gen)[: len(rows)]
    qs, ks, vs, refs, out_loc, prefix_lens, extend_lens = ([] for _ in range(7))
    keys_of_rows, lens_of_rows = [], []
    for (pid, own, extend), pool_row in zip(rows, pool_rows.tolist()):
        p_slots, p_keys, p_values = shared[pid] if pid is not None else ([], torch.zeros(0, hkv, d), torch.zeros(0, hkv, d))
        own_slots, free[:] = free[:own], free[own:]
        own_keys, own_values = (torch.randn(own, hkv, d, generator=gen).to(DTYPE).float() for _ in "kv")
        cached = own - extend  # own tokens already in the pool
        k_buf[own_slots[:cached]] = own_keys[:cached].to(DEVICE, DTYPE)
        v_buf[own_slots[:cached]] = own_values[:cached].to(DEVICE, DTYPE)
        row_slots = p_slots + own_slots
        runner.req_to_token_pool.req_to_token[pool_row, : len(row_slots)] = torch.tensor(row_slots)
        keys, values = torch.cat([p_keys, own_keys]), torch.cat([p_values, own_values])
        query = torch.randn(extend, hq, d, generator=gen).to(DTYPE).float()
        before = len(row_slots) - extend
        refs.append(_reference(query, keys, values, before))
        qs.append(query)
        ks.append(keys[before:])
        vs.append(values[before:])
        out_loc += row_slots[before:]
        prefix_lens.append(before)
        extend_lens.append(extend)
        keys_of_rows.append(1000 + pid if pid is not None else -1)
        lens_of_rows.append(len(p_slots))
    batch = _forward_batch(mode, prefix_lens, extend_lens, pool_rows, out_loc)
    if publish:
        row_prefixes.publish(batch.out_cache_loc, RowPrefixes(tuple(keys_of_rows), tuple(lens_of_rows)))
    return _step(batch, qs, ks, vs, refs, RadixAttention(hq, d, SM_SCALE, hkv, layer_id=0))


_DECODE_ROWS = [(0, 5, 1), (0, 1, 1), (None, 40, 1), (1, 9, 1), (0, 17, 1), (1, 2, 1)]
_PREFIXES = {0: 90, 1: 33}


@needs_kernels
def test_decode_rows_sharing_a_prefix_run_the_cascade_kernel(published_config):
    runner = _runner(published_config)
    step = _make_shared_step(runner, _DECODE_ROWS, prefixes=_PREFIXES, seed=21)
    ours = BatchLLMAttnBackend(runner)
    before = (STATS.decode_rows, STATS.cascade_rows, STATS.cascade_shared_rows)
    out = _run(ours, step)
    plan = ours.cascade
    assert plan is not None and plan.num_groups == 2 and plan.num_requests == 6
    # every array the kernels read starts on 16 bytes (cascade_plan.ALIGN: one compiled variant)
    odd = [t for t in (plan.items, plan.prefix_kv_indices, plan.suffix_kv_indices, plan.token_qpos,
                       plan.token_suffix_start, plan.token_num_partials) if t.data_ptr() % 16]
    assert not odd
    after = (STATS.decode_rows, STATS.cascade_rows, STATS.cascade_shared_rows)
    assert [a - b for a, b in zip(after, before)] == [6, 6, 5]  # one row has no shared prefix
    assert torch.isfinite(out).all()
    assert _rel_err(out, step.reference) < TOLERANCE
    parent = _run(TritonAttnBackend(runner), step)
    assert _rel_err(out, parent.float().cpu()) < TOLERANCE
    # without the rows' radix facts nothing is known to be shared: the parent's kernel runs
    bare = _make_shared_step(runner, _DECODE_ROWS, prefixes=_PREFIXES, seed=21, publish=False)
    assert torch.equal(_run(ours, bare), _run(TritonAttnBackend(runner), bare))
    assert ours.cascade is None


@needs_kernels
def test_warm_up_compiles_each_launch_config_and_changes_no_result(published_config, caplog):
    runner = _runner(published_config)
    step = _make_shared_step(runner, _DECODE_ROWS, prefixes=_PREFIXES, seed=21)
    ours = BatchLLMAttnBackend(runner)
    cold = _run(ours, step)
    with caplog.at_level(logging.INFO, logger="sglang_batchllm.runtime.attention_backend"):
        ours.warm_up_kernels()
    # 8 query / 2 KV heads: GROUP tiles of 16, 32 and 64 rows, one extend config; 8 request slots: sizes 1 and 8
    assert "compiled 4 fused-kernel launch configs and the split-count kernel for 2 batch sizes" in caplog.text
    assert torch.equal(_run(ours, step), cold)


def test_misaligned_row_slices_are_copied_to_a_16_byte_boundary():
    from sglang_batchllm.runtime.attention_backend import _aligned

    rows = torch.arange(9, dtype=torch.int64)  # a mixed step's decode rows start at any row
    assert _aligned(rows) is rows
    odd = rows[1:]
    assert odd.data_ptr() % 16 and _aligned(odd).data_ptr() % 16 == 0
    assert torch.equal(_aligned(odd), odd)


@pytest.mark.parametrize("max_rows", [1, 2, 15, 16, 17, 255, 256, 257, 300, 512, 1000, 1024, 4097])
def test_split_count_warm_up_sizes_meet_every_variant(max_rows):
    def variant(n):  # what get_num_kv_splits_triton compiles for: bucket, and n's specialization
        bucket = 256 if n < 256 else 1 << (n - 1).bit_length()
        return bucket, n == 1, n % 16 == 0

    sizes = split_count_warm_up_sizes(max_rows)
    assert all(1 <= n <= max_rows for n in sizes) and len(sizes) == len(set(sizes))
    assert {variant(n) for n in range(1, max_rows + 1)} == {variant(n) for n in sizes}


@needs_kernels
def test_mixed_decode_rows_sharing_a_prefix_run_the_cascade_kernel(published_config):
    runner = _runner(published_config)
    rows = [(None, 30, 30), (0, 12, 12)] + _DECODE_ROWS  # two prefill rows, then decode rows
    step = _make_shared_step(runner, rows, prefixes=_PREFIXES, mode=ForwardMode.MIXED, seed=22)
    ours = BatchLLMAttnBackend(runner)
    out = _run(ours, step)
    rows_plan = ours.decode_rows
    assert rows_plan is not None and rows_plan.cascade is not None
    assert rows_plan.num_rows == len(_DECODE_ROWS) and rows_plan.cascade.num_groups == 2
    assert torch.isfinite(out).all()
    assert _rel_err(out, step.reference) < TOLERANCE
    parent = _run(TritonAttnBackend(runner), step)
    assert torch.equal(out[:42], parent[:42])  # prefill rows: the parent's kernel, bit for bit


_PREFILL_ROWS = [(0, 20, 12), (0, 9, 9), (1, 30, 5), (None, 25, 25), (0, 3, 3)]


@needs_kernels
def test_prefill_rows_sharing_a_cached_prefix_run_the_fused_extend_path(published_config):
    runner = _runner(published_config)
    step = _make_shared_step(runner, _PREFILL_ROWS, prefixes=_PREFIXES, mode=ForwardMode.EXTEND, seed=25)
    ours = BatchLLMAttnBackend(runner)
    before = (STATS.extend_rows, STATS.extend_shared_rows)
    out = _run(ours, step)
    plan = ours.cascade_extend
    assert plan is not None and plan.mode == "extend" and plan.num_groups == 1  # prefix 1: one row
    assert (STATS.extend_rows - before[0], STATS.extend_shared_rows - before[1]) == (5, 3)
    assert torch.isfinite(out).all()
    assert _rel_err(out, step.reference) < TOLERANCE
    assert _rel_err(out, _run(TritonAttnBackend(runner), step).float().cpu()) < TOLERANCE


@needs_kernels
def test_mixed_step_with_both_fused_paths(published_config):
    runner = _runner(published_config, max_reqs=16)
    rows = _PREFILL_ROWS + _DECODE_ROWS
    step = _make_shared_step(runner, rows, prefixes=_PREFIXES, mode=ForwardMode.MIXED, seed=26)
    ours = BatchLLMAttnBackend(runner)
    out = _run(ours, step)
    assert ours.cascade_extend is not None and ours.cascade_extend.num_requests == len(_PREFILL_ROWS)
    assert ours.decode_rows.cascade is not None and ours.decode_rows.num_rows == len(_DECODE_ROWS)
    assert torch.isfinite(out).all()
    assert _rel_err(out, step.reference) < TOLERANCE


@needs_kernels
def test_unshared_or_long_prefill_stays_on_sglangs_extend_kernel(published_config):
    runner = _runner(published_config, context_len=512)
    ours = BatchLLMAttnBackend(runner)
    # nothing shared: bit for bit the parent's
    alone = _make_shared_step(runner, [(None, 20, 12), (None, 9, 9)], prefixes={},
                              mode=ForwardMode.EXTEND, seed=27)
    assert torch.equal(_run(ours, alone), _run(TritonAttnBackend(runner), alone))
    assert ours.cascade_extend is None
    # shared, but one request brings more new tokens than the extend sweep measured
    long = _make_shared_step(runner, [(0, 20, 12), (0, 300, 300)], prefixes={0: 40},
                             mode=ForwardMode.EXTEND, seed=28)
    assert torch.equal(_run(ours, long), _run(TritonAttnBackend(runner), long))
    assert ours.cascade_extend is None


@needs_kernels
def test_decode_graph_path_replays_any_step_at_fixed_addresses(published_config):
    """What a captured decode graph relies on: the capture-time plan and every replay-time plan
    use the same buffers and grid, and each replay's outputs are right for its own batch."""
    runner = _runner(published_config, max_reqs=12)
    ours = BatchLLMAttnBackend(runner)
    ours.init_cuda_graph_state(max_bs=8, max_num_tokens=8)
    eager = _make_shared_step(runner, _PREFILL_ROWS, prefixes=_PREFIXES, mode=ForwardMode.EXTEND, seed=29)
    ours.init_forward_metadata(eager.batch)
    assert ours.cascade_extend is not None  # an eager fused prefill plan ...
    capture = _make_shared_step(runner, [(None, 1, 1)] * 8, prefixes={}, seed=30, publish=False)
    ours.init_forward_metadata_out_graph(capture.batch, in_capture=True)
    assert ours.cascade_extend is None  # ... never survives into a captured step
    captured = ours.cascade
    assert captured is not None and captured.grid_items == ours._cascade_workspace.max_items
    for seed, rows in [(31, _DECODE_ROWS + [(None, 3, 1), (0, 4, 1)]),
                       (32, [(1, 3, 1)] * 5 + [(None, 60, 1)] * 3)]:
        step = _make_shared_step(runner, rows, prefixes=_PREFIXES, seed=seed)
        ours.init_forward_metadata_out_graph(step.batch)  # replay preparation
        plan = ours.cascade
        assert plan.items.data_ptr() == captured.items.data_ptr()
        assert plan.prefix_kv_indices.data_ptr() == ours.cuda_graph_kv_indices.data_ptr()
        assert plan.grid_items == captured.grid_items
        out = ours.forward(step.q, step.k, step.v, step.layer, step.batch)
        assert torch.isfinite(out).all()
        assert _rel_err(out, step.reference) < TOLERANCE


@needs_kernels
def test_cascade_off_for_what_the_kernel_does_not_compute(published_config, caplog):
    runner = _runner(published_config)
    runner.model_config.hf_text_config.attn_logit_softcapping = 30.0
    with caplog.at_level(logging.WARNING, logger=batchllm.__name__):
        ours = BatchLLMAttnBackend(runner)
    assert "soft-capping" in ours.cascade_fallback_reason
    assert any("soft-capping" in r.getMessage() for r in caplog.records)
    step = _make_shared_step(runner, _DECODE_ROWS, prefixes=_PREFIXES, seed=23)
    out = _run(ours, step)
    assert ours.cascade is None and torch.equal(out, _run(TritonAttnBackend(runner), step))
    # a layer the model config did not announce is refused, never computed wrong
    runner = _runner(published_config)
    ours = BatchLLMAttnBackend(runner)
    step = _make_shared_step(runner, _DECODE_ROWS, prefixes=_PREFIXES, seed=24)
    step.layer.logit_cap = 5.0
    ours.init_forward_metadata(step.batch)
    with pytest.raises(RuntimeError, match="--attention-backend triton"):
        ours.forward(step.q, step.k, step.v, step.layer, step.batch)


# ---------------------------------------------------------------------------------------------
# GPU: realistic size, and a timing (printed, not asserted)


@gpu
def test_gpu_realistic_mixed_step(published_config):
    import triton.testing

    runner = _runner(
        published_config, num_q_heads=32, num_kv_heads=8, head_dim=128, max_reqs=300,
        context_len=4096, pool_size=600_000,
    )
    gen = torch.Generator().manual_seed(9)
    prefill = [(0, 2048), (512, 2000), (1024, 2100), (0, 2304)]
    decode = [(int(c) - 1, 1) for c in torch.randint(2100, 2300, (256,), generator=gen)]
    step = _make_step(runner, prefill + decode, seed=10)
    ours, parent = BatchLLMAttnBackend(runner), TritonAttnBackend(runner)
    out = _run(ours, step)
    reference_out = _run(parent, step)
    first_token = sum(e for _, e in prefill)
    assert ours.decode_rows.num_rows == 256 and ours.decode_rows.first_token == first_token
    assert torch.isfinite(out).all()
    assert _rel_err(out, step.reference) < TOLERANCE
    assert torch.equal(out[:first_token], reference_out[:first_token])
    assert _rel_err(out[first_token:], reference_out[first_token:].float().cpu()) < TOLERANCE

    def layer(backend):
        return lambda: backend.forward(step.q, step.k, step.v, step.layer, step.batch)

    results = {}
    for name, backend in [("triton (parent)", parent), ("batchllm", ours)]:
        plan_ms = triton.testing.do_bench(lambda: backend.init_forward_metadata(step.batch))
        backend.init_forward_metadata(step.batch)
        results[name] = (plan_ms, triton.testing.do_bench(layer(backend)))
    print(f"\nMIXED step: 4 prefill rows ({first_token} tokens) + 256 decode rows (~2200 keys), "
          "32/8 heads, head_dim 128, bf16, one layer (KV write + attention)")
    for name, (plan_ms, layer_ms) in results.items():
        print(f"  {name:16s} per layer {layer_ms:.3f} ms   plan per step {plan_ms:.3f} ms")
    speedup = results["triton (parent)"][1] / results["batchllm"][1]
    print(f"  per-layer speedup {speedup:.2f}x")
