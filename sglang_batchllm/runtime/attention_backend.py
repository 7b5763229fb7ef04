"""`batchllm` attention backend: SGLang's Triton backend, plus two things it lacks for batched
jobs: the fused cascade kernel for rows that share a cached prefix, and decode rows of mixed
steps on a decode kernel instead of prefill-sized tiles.

The fused cascade kernel (`sglang_batchllm.kernels`, docs/kernel.md). Rows whose cached
prefix is the same radix path hold the same KV slots for it (`runtime/row_prefixes.py` says
which: facts recorded at each request's first extend, published per step by
`patches/forward_groups.py`). Per step the pure rule `kernels/step_groups.py` groups them and
decides; the plan is built once (slot lists on the GPU from `req_to_token`), the kernel
launched per layer and reads each group's prefix once:

- DECODE steps, eager (`init_forward_metadata`) when the cost rule says sharing pays, and under
  CUDA graphs always (`init_cuda_graph_state` allocates a fixed `CascadeWorkspace`; capture
  records the kernel over it, each replay's preparation writes that step's plan into it);
- the decode rows of MIXED steps (below), when the rule says it pays;
- EXTEND steps and the prefill rows of MIXED steps, when some rows share a cached prefix and no
  request brings more new tokens than the extend sweep measured; otherwise SGLang's extend
  kernel, bit for bit.

What the kernel does not compute keeps SGLang's kernels, said once at start
(`cascade_fallback_reason`), or, for a layer the model config did not announce, is refused at
the first step (`_check_cascade_layer`).

Mixed steps. With `--enable-mixed-chunk` the scheduler folds every running decode request (one
new token each) into the prefill batch as `ForwardMode.MIXED`, and the Triton backend's
`forward_extend` runs *all* rows through `extend_attention_fwd`. That kernel's grid is (rows,
query heads, cdiv(longest extend, BLOCK_M)) with no split-KV and no packing of the query heads
that share a KV head, so a decode row streams its whole context once per query head (4x the KV
bytes for GQA 32/8) inside a prefill-sized tile that holds one useful row. On an H200 the
authors' workload ran 2x slower with mixed chunk on. Here decode rows go through the fused
decode plan or `decode_attention_fwd` (split-KV, GQA heads packed) instead::

    rows     [0, P)  prefill rows            [P, B)  decode rows (extend_len 1)
    tokens   q[0, T) T = sum(extend_lens[:P]) q[T, T + B - P)
    kernel   fused extend plan, or            fused decode plan, or
             extend_attention_fwd over the    decode_attention_fwd over `DecodeRows`: each
             parent's metadata for [0, P)     row's whole context, this step's token included

- `init_forward_metadata` plans once per step (plan/run split, no per-layer host work).
- `forward_extend` writes the KV of *all* new tokens exactly once (the parent does it when its
  extend kernel serves the prefill rows), runs the prefill rows, then fills the decode rows'
  slice of the same output, reading the new tokens' KV from the pool.

Which rows are decode rows. `ForwardBatch` does not say how many rows came from the running
batch (`ScheduleBatch.decoding_reqs` is not copied into it), so the plan takes the trailing run
of rows with extend_len 1 (`count_decode_rows`). That run can also hold a prefill row of one
token (a prompt cached up to its last token is common), which is fine: its only query sits at
position prefix_len and, causal or not, sees exactly keys [0, prefix_len], which after the KV
write are `req_to_token[row, :prefix_len + 1]`, i.e. decode attention over seq_len =
prefix_len + 1. So no `prefix_len > 0` test is needed (a one-token prompt with no prefix is
decode over one key). One row always stays on the extend path, so the parent's metadata code
never sees an empty batch.

Not planned for mixed steps (MIXED falls back to the parent, one warning at init names the
reason): MLA, sliding window / SWA pools, encoder-decoder, speculative decoding, decode context
parallelism, deterministic inference. On SGLang's decode kernel, kept: logit cap, xai
temperature, attention sinks, k/v scales, page size > 1, unified-pool slot translation,
`score_mod` (the per-token `aux_tensors` are sliced to the decode tokens). Custom masks never
occur in MIXED (the Triton backend builds one only for TARGET_VERIFY). Under the breakable
prefill CUDA graph (SGLang's default) attention runs outside the captured segments with the
live batch's metadata; the layers may see the batch as EXTEND (`prefill_cuda_graph_runner`
renames MIXED), so `forward_extend` keys on the plan made from the real batch, never on
`forward_mode`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend, logit_capping_mod

from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_batchllm.kernels import CascadePlan, build_decode_plan, build_extend_plan
from sglang_batchllm.kernels.cost_model import EXTEND_MAX_MEASURED_NEW_TOKENS
from sglang_batchllm.kernels.cascade_plan import (
    CascadeWorkspace, aligned, default_launch_config, pack_aligned, split_aligned,
)
from sglang_batchllm.kernels.step_groups import NO_KEY, StepGroups, cascade_pays, group_rows
from sglang_batchllm.kernels.warmup import compile_launch_configs

from . import row_prefixes
from .stats import STATS

logger = logging.getLogger(__name__)

BACKEND_NAME = "batchllm"


def split_count_warm_up_sizes(max_rows: int) -> list[int]:
    """Batch sizes that compile every variant of SGLang's `get_num_kv_splits_triton` a run
    with up to `max_rows` rows can meet: it rounds the batch to a power of two (at least 256,
    a compile-time argument) and Triton specializes the row count itself on being 1 or a
    multiple of 16. So per bucket, one size of each kind in it, within max_rows."""
    sizes = [1] if max_rows >= 1 else []
    low, bucket = 1, 256  # sizes in (low, bucket] share the bucket
    while low < max_rows:
        top = min(bucket, max_rows)
        for n in (top - top % 16, top if top % 16 else top - 1):
            if n > low and n not in sizes:
                sizes.append(n)
        low, bucket = bucket, bucket * 2
    return sizes


def count_decode_rows(extend_seq_lens: Sequence[int]) -> int:
    """Rows at the end of a MIXED batch that take the decode path: the trailing run of one-token
    rows, leaving at least one row (the first) for the extend kernel."""
    count = 0
    for length in reversed(extend_seq_lens):
        if int(length) != 1:
            break
        count += 1
    return min(count, len(extend_seq_lens) - 1)


def mixed_fallback_reason(
    *,
    use_mla: bool,
    sliding_window: bool,
    encoder_decoder: bool,
    speculative: bool,
    dcp_size: int,
    deterministic: bool,
) -> Optional[str]:
    """Why MIXED steps must stay on the parent's path, or None when the split path applies."""
    if use_mla:
        return "MLA (the Triton backend's MLA decode path is not planned here)"
    if sliding_window:
        return "sliding-window attention (window metadata is not planned here)"
    if encoder_decoder:
        return "encoder-decoder / cross attention"
    if speculative:
        return "speculative decoding"
    if dcp_size > 1:
        return "decode context parallelism"
    if deterministic:
        return "deterministic inference (its batch-invariant kernels must serve every row)"
    return None


def cascade_fallback_reason(
    *,
    mixed_reason: Optional[str],
    kv_dtype,
    q_dtype,
    qk_head_dim: int,
    v_head_dim: int,
    unified_pool: bool,
    logit_cap: float,
) -> Optional[str]:
    """Why decode attention must stay on SGLang's Triton kernel (the fused cascade kernel
    computes plain softmax attention over bf16/fp16 KV of one head size), or None."""
    if mixed_reason is not None:
        return mixed_reason
    if kv_dtype != q_dtype:
        return f"KV cache dtype {kv_dtype} differs from the model's {q_dtype} (quantized KV)"
    if qk_head_dim != v_head_dim:
        return f"key head dim {qk_head_dim} != value head dim {v_head_dim}"
    if unified_pool:
        return "a unified (virtual-to-physical) KV pool"
    if logit_cap and logit_cap > 0:
        return f"attention logit soft-capping ({logit_cap})"
    return None


def _model_logit_cap(model_config) -> float:
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    return float(getattr(hf, "attn_logit_softcapping", None) or 0.0)


@dataclass(frozen=True)
class DecodeRows:
    """This step's decode rows: batch rows [first_row, first_row + num_rows), query tokens
    [first_token, first_token + num_rows), one each. Tensors live on the device."""

    first_row: int
    first_token: int
    num_rows: int
    kv_indptr: torch.Tensor  # [num_rows + 1] int32: row r reads kv_indices[indptr[r]:indptr[r+1]]
    kv_indices: torch.Tensor  # int64 KV slots, whole context, this step's token last
    num_kv_splits: torch.Tensor  # [num_rows] int32
    attn_logits: torch.Tensor  # [num_rows, H, max_kv_splits, Dv] fp32 split partials
    attn_lse: torch.Tensor  # [num_rows, H, max_kv_splits] fp32
    cascade: Optional[CascadePlan] = None  # when set, the rows run the fused cascade kernel


class BatchLLMAttnBackend(TritonAttnBackend):
    """The Triton backend; in a MIXED step its decode rows run the decode kernel (module doc).
    `decode_rows` is this step's plan, None whenever the parent's path serves the whole step."""

    def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf=None):
        super().__init__(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
        server_args = model_runner.server_args
        self.mixed_fallback_reason = mixed_fallback_reason(
            use_mla=self.use_mla,
            sliding_window=bool(self.sliding_window_size and self.sliding_window_size > 0)
            or self.use_sliding_window_kv_pool,
            encoder_decoder=bool(model_runner.model_config.is_encoder_decoder),
            speculative=skip_prefill
            or bool(model_runner.is_draft_worker)
            or getattr(server_args, "speculative_algorithm", None) is not None,
            dcp_size=self.dcp_size,
            deterministic=bool(self.enable_deterministic),
        )
        if self.mixed_fallback_reason is not None:
            logger.warning(
                "batchllm attention: SGLang's Triton kernels serve every step (decode, and the "
                "decode rows of mixed steps on its extend kernel): %s", self.mixed_fallback_reason,
            )
        # Small per-row buffers, allocated once; a batch never has more rows than request slots.
        max_rows = model_runner.req_to_token_pool.size
        int32 = dict(dtype=torch.int32, device=self.device)
        self._decode_kv_indptr = torch.zeros(max_rows + 1, **int32)
        self._decode_kv_lens = torch.zeros(max_rows, **int32)
        self._decode_num_kv_splits = torch.zeros(max_rows, **int32)
        self.decode_rows: Optional[DecodeRows] = None

        # The fused cascade kernel for decode rows (DECODE steps and MIXED decode rows).
        key_buffer = model_runner.token_to_kv_pool.get_key_buffer(0)
        self.head_dim = int(key_buffer.shape[-1])
        self.cascade_fallback_reason = cascade_fallback_reason(
            mixed_reason=self.mixed_fallback_reason,
            kv_dtype=key_buffer.dtype,
            q_dtype=model_runner.dtype,
            qk_head_dim=self.head_dim,
            v_head_dim=int(self.v_head_dim),
            unified_pool=self._translate_kv_loc is not None,
            logit_cap=_model_logit_cap(model_runner.model_config),
        )
        if self.cascade_fallback_reason is not None and self.mixed_fallback_reason is None:
            logger.warning(
                "batchllm attention: decode runs SGLang's Triton decode kernel, not the fused "
                "cascade kernel (%s)", self.cascade_fallback_reason,
            )
        self.cascade: Optional[CascadePlan] = None  # this DECODE step's plan
        # this EXTEND step's (or MIXED step's prefill rows') fused plan; off for models whose
        # prefill attention is not causal self-attention
        self.cascade_extend: Optional[CascadePlan] = None
        self.cascade_extend_on = (
            self.cascade_fallback_reason is None
            and bool(getattr(model_runner.model_config, "is_generation", True))
            and not getattr(self, "allow_bidirectional_attention_in_extend", False)
        )
        self._cascade_workspace: Optional[CascadeWorkspace] = None  # CUDA-graph decode
        if torch.device(self.device).type == "cuda":
            self.warm_up_kernels()

    def warm_up_kernels(self) -> None:
        """Compile, before the first request, the kernel variants that eager steps of a large
        job would otherwise compile mid-run (each costs 0.1-1.5 s on an H200; the bench step
        log's `compile` lines found them in the timed window): every fused-kernel launch
        config (`kernels/warmup.py`) and SGLang's split-count kernel at each batch-size bucket
        it rounds to (a power of two from 256 up to the request slots)."""
        t0 = time.perf_counter()
        configs = []
        if self.cascade_fallback_reason is None:
            k_buffer = self.token_to_kv_pool.get_key_buffer(0)
            configs = compile_launch_configs(
                k_buffer, self.token_to_kv_pool.get_value_buffer(0), num_q_heads=self.num_head,
                dtype=k_buffer.dtype,
            )
        lens = torch.ones_like(self._decode_kv_lens)
        sizes = split_count_warm_up_sizes(lens.numel())
        for rows in sizes:
            self.get_num_kv_splits(self._decode_num_kv_splits[:rows], lens[:rows])
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        logger.info(
            "batchllm attention: compiled %d fused-kernel launch configs and the split-count "
            "kernel for %d batch sizes in %.1f s", len(configs), len(sizes), time.perf_counter() - t0,
        )

    # -- plan (once per step) ------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch):
        self.decode_rows = None
        self.cascade = None
        self.cascade_extend = None
        if self._cascade_on(forward_batch):
            self.cascade = self._plan_cascade_decode(forward_batch)
            if self.cascade is not None:
                return  # the parent's decode metadata would go unused
        num_decode = self._num_decode_rows(forward_batch)
        num_prefill = forward_batch.batch_size - num_decode
        if self._extend_on(forward_batch):
            self.cascade_extend = self._plan_cascade_extend(forward_batch, num_prefill)
        if num_decode == 0:
            if self.cascade_extend is not None:
                return  # the whole step runs the fused kernel
            return super().init_forward_metadata(forward_batch)
        if self.cascade_extend is None:
            super().init_forward_metadata(_leading_rows(forward_batch, num_prefill))
        self.decode_rows = self._plan_decode_rows(forward_batch, num_prefill)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None,
                              cuda_graph_num_kv_splits_buf=None):
        super().init_cuda_graph_state(
            max_bs, max_num_tokens, kv_indices_buf=kv_indices_buf,
            cuda_graph_num_kv_splits_buf=cuda_graph_num_kv_splits_buf,
        )
        if self.cascade_fallback_reason is None:
            hpk = self.num_head // self.num_kv_head
            self._cascade_workspace = CascadeWorkspace(
                max_tokens=max_num_tokens, num_q_heads=self.num_head, head_dim=self.head_dim,
                device=self.device, config=default_launch_config("decode", hpk, 64, self.head_dim),
            )

    def _extend_on(self, forward_batch) -> bool:
        mode = forward_batch.forward_mode
        return (
            self.cascade_extend_on
            and (mode == ForwardMode.EXTEND or mode.is_mixed())
            and getattr(forward_batch, "spec_info", None) is None
            and getattr(forward_batch, "encoder_lens", None) is None
            and forward_batch.extend_seq_lens_cpu is not None
            and forward_batch.extend_prefix_lens_cpu is not None
            and len(forward_batch.extend_seq_lens_cpu) == forward_batch.batch_size
        )

    def _plan_cascade_extend(self, forward_batch, num_rows: int) -> Optional[CascadePlan]:
        """The fused extend plan of rows [0, num_rows), or None when the cost rule keeps
        SGLang's extend kernel: requests with more new tokens than the extend sweep measured,
        or a step whose sharing saves too little."""
        if num_rows == 0:
            return None
        new = [int(x) for x in forward_batch.extend_seq_lens_cpu[:num_rows]]
        cached = [int(x) for x in forward_batch.extend_prefix_lens_cpu[:num_rows]]
        if max(new) > EXTEND_MAX_MEASURED_NEW_TOKENS:
            return None
        seq = [c + n for c, n in zip(cached, new)]
        keys, lens = _row_facts(forward_batch, 0, num_rows)
        for row, (plen, c) in enumerate(zip(lens, cached)):
            if plen > c:  # the shared prefix must be cached already: never the case, be sure
                keys[row], lens[row] = NO_KEY, 0
        groups = group_rows(keys, lens, seq, mode="extend")
        if not cascade_pays(groups, seq, mode="extend"):
            return None
        STATS.extend_rows += num_rows
        STATS.extend_shared_rows += sum(1 for g in groups.request_group if g >= 0)
        return self._build_cascade(
            groups, seq, forward_batch.req_pool_indices[:num_rows], qo_indptr=_cumsum(new)
        )

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Decode graphs run the fused kernel: at capture over a plan of the capture batch, at
        each replay over this step's plan written into the same workspace (fixed addresses
        and grid; the kernel reads the live item count), with the slots in the parent's
        graph kv-index buffer, which only the parent's decode kernel would otherwise read.
        Other captured modes (a full prefill graph) plan through the parent: no fused plan of
        an earlier eager step may survive into them."""
        self.decode_rows = None
        self.cascade = None
        self.cascade_extend = None
        ws = self._cascade_workspace
        if (
            ws is not None
            and forward_batch.forward_mode.is_decode_or_idle()
            and getattr(forward_batch, "spec_info", None) is None
        ):
            if in_capture:  # the parent's capture-time metadata keeps its own state whole
                super().init_forward_metadata_out_graph(forward_batch, in_capture=True)
            self.cascade = self._plan_cascade_decode(
                forward_batch, workspace=ws, slot_base=self.cuda_graph_kv_indices, always=True
            )
            return None
        return super().init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)

    # -- the fused cascade decode plan ---------------------------------------------------------

    def _cascade_on(self, forward_batch) -> bool:
        return (
            self.cascade_fallback_reason is None
            and forward_batch.forward_mode.is_decode()
            and getattr(forward_batch, "spec_info", None) is None
            and forward_batch.batch_size > 0
        )

    def _plan_cascade_decode(self, forward_batch, *, workspace=None, slot_base=None,
                             always: bool = False) -> Optional[CascadePlan]:
        bs = forward_batch.batch_size
        seq_lens = forward_batch.seq_lens_cpu
        if seq_lens is None:  # a batch without a host mirror: one small copy
            seq_lens = forward_batch.seq_lens.cpu()
        seq = [int(x) for x in seq_lens[:bs].tolist()]
        keys, lens = _row_facts(forward_batch, 0, bs)
        groups = group_rows(keys, lens, seq)
        STATS.decode_rows += bs
        if not always and not cascade_pays(groups, seq):
            return None
        _count_cascade(groups)
        return self._build_cascade(groups, seq, forward_batch.req_pool_indices[:bs],
                                   workspace=workspace, slot_base=slot_base)

    def _build_cascade(self, groups: StepGroups, seq: list[int], pool_indices: torch.Tensor,
                       *, qo_indptr: Optional[list[int]] = None, workspace=None,
                       slot_base=None) -> CascadePlan:
        """Slots from `req_to_token` on the device (one launch for the groups' prefixes, one
        for every row's own part), lengths from the host, then the plan."""
        num_rows, num_groups = len(seq), groups.num_groups
        prefix_len = groups.group_prefix_len
        suffix_len = [s - start for s, start in zip(seq, groups.suffix_start)]
        prefix_indptr = _cumsum(prefix_len)
        suffix_indptr = _cumsum(suffix_len)
        num_prefix, num_suffix = prefix_indptr[-1], suffix_indptr[-1]
        # every array and the suffix slots on 16-byte boundaries (cascade_plan.ALIGN says why)
        lists = [groups.group_rows, prefix_len, prefix_indptr, groups.suffix_start, suffix_len,
                 suffix_indptr]
        host = pack_aligned([torch.tensor(x, dtype=torch.int32) for x in lists])
        on_cuda = torch.device(self.device).type == "cuda"
        dev = host.pin_memory().to(self.device, non_blocking=True) if on_cuda else host.to(self.device)
        g_rows, g_len, g_indptr, s_start, s_len, s_indptr = split_aligned(dev, [len(x) for x in lists])
        suffix_at = aligned(num_prefix)
        if slot_base is None:
            slots = torch.empty(suffix_at + num_suffix, dtype=torch.int32, device=self.device)
        else:
            if suffix_at + num_suffix > slot_base.numel():
                raise RuntimeError(
                    f"batchllm attention: a decode step of {num_rows} rows reads "
                    f"{num_prefix + num_suffix} KV slots, more than the graph buffer's "
                    f"{slot_base.numel()}"
                )
            slots = slot_base
        stride = self.req_to_token.stride(0)
        pool_indices = _aligned(pool_indices)
        if num_groups:
            create_flashinfer_kv_indices_triton[(num_groups,)](
                self.req_to_token, pool_indices[g_rows.long()], g_len, g_indptr, None, slots,
                stride,
            )
        if num_rows:
            create_flashinfer_kv_indices_triton[(num_rows,)](
                self.req_to_token, pool_indices, s_len, s_indptr, s_start, slots[suffix_at:],
                stride,
            )
        kwargs = dict(
            prefix_kv_indptr=prefix_indptr,
            prefix_kv_indices=slots[:num_prefix],
            suffix_kv_indptr=suffix_indptr,
            suffix_kv_indices=slots[suffix_at:suffix_at + num_suffix],
            request_group=groups.request_group,
            num_q_heads=self.num_head,
            num_kv_heads=self.num_kv_head,
            head_dim=self.head_dim,
            workspace=workspace,
            slot_base=slot_base,
        )
        if qo_indptr is None:
            return build_decode_plan(**kwargs)
        return build_extend_plan(qo_indptr=qo_indptr, **kwargs)

    def _num_decode_rows(self, forward_batch) -> int:
        if self.mixed_fallback_reason is not None or not forward_batch.forward_mode.is_mixed():
            return 0
        extend_lens = forward_batch.extend_seq_lens_cpu
        if extend_lens is None or forward_batch.extend_prefix_lens_cpu is None:
            return 0  # planning would need a device sync; the parent's path is still correct
        if len(extend_lens) != forward_batch.batch_size:
            return 0  # rows padded or regrouped by someone else: do not guess
        return count_decode_rows(extend_lens)

    def _plan_decode_rows(self, forward_batch, first_row: int) -> DecodeRows:
        batch_size = forward_batch.batch_size
        num_rows = batch_size - first_row
        first_token = int(sum(forward_batch.extend_seq_lens_cpu[:first_row]))
        if self.cascade_fallback_reason is None:
            seq = [int(p) + 1 for p in forward_batch.extend_prefix_lens_cpu[first_row:batch_size]]
            keys, lens = _row_facts(forward_batch, first_row, batch_size)
            groups = group_rows(keys, lens, seq)
            STATS.decode_rows += num_rows
            if cascade_pays(groups, seq):
                _count_cascade(groups)
                plan = self._build_cascade(
                    groups, seq, forward_batch.req_pool_indices[first_row:batch_size]
                )
                return DecodeRows(first_row, first_token, num_rows, None, None, None, None, None,
                                  cascade=plan)
        # Row r's context is its prefix plus this step's token: prefix_len + 1 keys, sized on the
        # host from the same lists that drive the device lengths (no sync, no overflow).
        kv_lens = self._decode_kv_lens[:num_rows]
        torch.add(forward_batch.extend_prefix_lens[first_row:batch_size], 1, out=kv_lens)
        kv_indptr = self._decode_kv_indptr[: num_rows + 1]
        torch.cumsum(kv_lens, dim=0, dtype=torch.int32, out=kv_indptr[1:])
        num_keys = int(sum(forward_batch.extend_prefix_lens_cpu[first_row:batch_size])) + num_rows
        kv_indices = self._scratch("cuda_graph_kv_indices", (num_keys,), torch.int64)
        create_flashinfer_kv_indices_triton[(num_rows,)](
            self.req_to_token,
            _aligned(forward_batch.req_pool_indices[first_row:batch_size]),
            kv_lens,
            kv_indptr,
            None,
            kv_indices,
            self.req_to_token.stride(0),
        )
        if self._translate_kv_loc is not None:
            kv_indices = self._translate_kv_loc(kv_indices)
        num_kv_splits = self._decode_num_kv_splits[:num_rows]
        self.get_num_kv_splits(num_kv_splits, kv_lens)
        splits = (num_rows, self.num_head, self.max_kv_splits)
        logits = splits + (self.v_head_dim,)
        return DecodeRows(
            first_row=first_row,
            first_token=first_token,
            num_rows=num_rows,
            kv_indptr=kv_indptr,
            kv_indices=kv_indices,
            num_kv_splits=num_kv_splits,
            attn_logits=self._scratch("cuda_graph_attn_logits", logits, torch.float32),
            attn_lse=self._scratch("cuda_graph_attn_lse", splits, torch.float32),
        )

    def _scratch(self, graph_buffer: str, shape: tuple[int, ...], dtype) -> torch.Tensor:
        """A prefix of the parent's decode CUDA-graph buffer when it exists and is big enough,
        else a fresh tensor. Sharing is safe: a graph replay refills these before it reads them,
        and eager steps and replays are ordered on one stream."""
        buffer = getattr(self, graph_buffer, None)
        if (
            buffer is not None
            and buffer.dtype == dtype
            and buffer.shape[1:] == shape[1:]
            and buffer.shape[0] >= shape[0]
        ):
            return buffer[: shape[0]]
        return torch.empty(shape, dtype=dtype, device=self.device)

    # -- run (per layer) -----------------------------------------------------------------------

    def forward_extend(
        self,
        q,
        k,
        v,
        layer,
        forward_batch,
        save_kv_cache=True,
        sinks=None,
        score_mod=None,
        aux_tensors=None,
    ):
        rows = self.decode_rows
        extend = self.cascade_extend
        if extend is not None:
            # The fused kernel serves the prefill rows; every new token's KV (decode rows'
            # too) is written first, as the parent does.
            _check_cascade_layer(layer, sinks, score_mod)
            q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
            o = getattr(forward_batch, "_attn_output", None)
            if o is None:
                o = torch.empty_like(q)
            if save_kv_cache and k is not None and v is not None:
                self._set_kv_buffer(
                    forward_batch, layer, forward_batch.out_cache_loc, k, v,
                    layer.k_scale, layer.v_scale,
                )
            self._run_cascade(extend, q, o, layer, 0, extend.num_tokens)
        else:
            # The parent writes every new token's KV (decode rows' too) and runs the extend
            # kernel over the prefill rows of its metadata; decode rows of `o` are left for us.
            o = super().forward_extend(
                q, k, v, layer, forward_batch, save_kv_cache,
                sinks=sinks, score_mod=score_mod, aux_tensors=aux_tensors,
            )
        if rows is None:
            return o
        start, end = rows.first_token, rows.first_token + rows.num_rows
        if q.shape[0] < end:
            raise RuntimeError(
                f"batchllm attention: the step was planned for {end} query tokens "
                f"({rows.num_rows} decode rows from token {start}) but this layer got "
                f"{q.shape[0]}; init_forward_metadata was not called for this batch"
            )
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise RuntimeError(
                f"batchllm attention: layer {layer.layer_id} has a sliding window but the model "
                "declared none; mixed decode rows cannot be planned for it"
            )
        if layer.k_scale is not None and layer.v_scale is not None:
            k_descale, v_descale = layer.k_scale_float, layer.v_scale_float
        else:
            k_descale, v_descale = 1.0, 1.0
        if rows.cascade is not None:
            _check_cascade_layer(layer, sinks, score_mod)
            self._run_cascade(rows.cascade, q, o, layer, start, end)
            return o
        if aux_tensors is not None:
            aux_tensors = [t[start:end] for t in aux_tensors]  # per query token, like q
        self.decode_attention_fwd(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)[start:end],
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            o.view(-1, layer.tp_q_head_num, layer.v_head_dim)[start:end],
            rows.kv_indptr,
            rows.kv_indices,
            rows.attn_logits,
            rows.attn_lse,
            rows.num_kv_splits,
            self.max_kv_splits,
            layer.scaling,
            k_descale,
            v_descale,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            sinks=sinks,
            xai_temperature_len=layer.xai_temperature_len,
            has_mla=False,
            use_pdl=self.use_pdl,
            page_size=self.page_size,
            score_mod=score_mod,
            aux_tensors=aux_tensors,
        )
        return o


    def forward_decode(
        self,
        q,
        k,
        v,
        layer,
        forward_batch,
        save_kv_cache=True,
        sinks=None,
        score_mod=None,
        aux_tensors=None,
    ):
        plan = self.cascade
        if plan is None:
            return super().forward_decode(
                q, k, v, layer, forward_batch, save_kv_cache,
                sinks=sinks, score_mod=score_mod, aux_tensors=aux_tensors,
            )
        _check_cascade_layer(layer, sinks, score_mod)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = torch.empty_like(q)
        if save_kv_cache:
            self._set_kv_buffer(
                forward_batch, layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale
            )
        self._run_cascade(plan, q, o, layer, 0, q.shape[0])
        return o

    def _run_cascade(self, plan: CascadePlan, q, o, layer, start: int, end: int) -> None:
        from sglang_batchllm.kernels.cascade_attention import cascade_forward

        heads, dim = layer.tp_q_head_num, layer.qk_head_dim
        cascade_forward(
            q.view(-1, heads, dim)[start:end],
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            plan,
            layer.scaling,
            out=o.view(-1, heads, dim)[start:end],
        )


def _check_cascade_layer(layer, sinks, score_mod) -> None:
    """What the fused kernel does not compute; the init-time check covers the model config,
    this one each layer (raised at the first step, i.e. at CUDA-graph capture)."""
    unsupported = []
    if sinks is not None:
        unsupported.append("attention sinks")
    if score_mod is not None:
        unsupported.append("a score_mod")
    if layer.logit_cap and layer.logit_cap > 0:
        unsupported.append(f"logit cap {layer.logit_cap}")
    if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
        unsupported.append(f"sliding window {layer.sliding_window_size}")
    if getattr(layer, "xai_temperature_len", None) and layer.xai_temperature_len > 0:
        unsupported.append("xai temperature")
    if layer.qk_head_dim != layer.v_head_dim:
        unsupported.append("different key and value head dims")
    if getattr(layer, "is_cross_attention", False):
        unsupported.append("cross attention")
    attn_type = getattr(layer, "attn_type", None)
    if attn_type is not None and attn_type.name != "DECODER":
        unsupported.append(f"{attn_type.name.lower()} attention (not causal)")
    if unsupported:
        raise RuntimeError(
            f"batchllm attention: layer {layer.layer_id} uses {', '.join(unsupported)}, which "
            "the fused cascade kernel does not compute; run with --attention-backend triton"
        )


def _row_facts(forward_batch, first: int, end: int) -> tuple[list[int], list[int]]:
    """Rows [first, end) of the step's published prefix facts; rows without facts (padding,
    a batch built elsewhere) run as plain requests."""
    facts = row_prefixes.lookup(getattr(forward_batch, "out_cache_loc", None))
    n = end - first
    if facts is None:
        return [NO_KEY] * n, [0] * n
    keys = list(facts.keys[first:end])
    lens = list(facts.lens[first:end])
    pad = n - len(keys)
    return keys + [NO_KEY] * pad, lens + [0] * pad


def _count_cascade(groups: StepGroups) -> None:
    STATS.cascade_rows += len(groups.request_group)
    STATS.cascade_shared_rows += sum(1 for g in groups.request_group if g >= 0)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when it does not start on 16 bytes (the rows of a mixed step's decode part
    start at any row): Triton specializes pointers on 16-byte alignment, so a misaligned view
    would compile a second variant of the kernel that reads it, mid-run."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _cumsum(values: list[int]) -> list[int]:
    out, total = [0], 0
    for v in values:
        total += v
        out.append(total)
    return out


def _leading_rows(forward_batch, num_rows: int):
    """A shallow view of the batch's first `num_rows` rows for the parent's extend planner.
    `out_cache_loc` stays whole: the parent derives the KV-write targets of all tokens from it."""
    view = copy.copy(forward_batch)
    view.batch_size = num_rows
    view.req_pool_indices = forward_batch.req_pool_indices[:num_rows]
    view.seq_lens = forward_batch.seq_lens[:num_rows]
    if forward_batch.seq_lens_cpu is not None:
        view.seq_lens_cpu = forward_batch.seq_lens_cpu[:num_rows]
        view.seq_lens_sum = int(view.seq_lens_cpu.sum())
    else:
        view.seq_lens_sum = None
    view.extend_prefix_lens = forward_batch.extend_prefix_lens[:num_rows]
    view.extend_seq_lens = forward_batch.extend_seq_lens[:num_rows]
    view.extend_prefix_lens_cpu = forward_batch.extend_prefix_lens_cpu[:num_rows]
    view.extend_seq_lens_cpu = forward_batch.extend_seq_lens_cpu[:num_rows]
    return view


def create_batchllm_backend(runner):
    """Attention-registry factory (`--attention-backend batchllm`)."""
    if runner.model_config.is_encoder_decoder:
        raise ValueError(
            "the batchllm attention backend extends the Triton backend, which has no cross "
            "attention; use --attention-backend flashinfer for encoder-decoder models"
        )
    return BatchLLMAttnBackend(runner)


def register() -> None:
    """Make `batchllm` an attention backend: in the registry (needed in the scheduler process)
    and among the CLI choices (needed before argparse builds its parser). Idempotent:
    `add_attention_backend_choices` itself appends blindly, so membership is checked first."""
    from sglang.srt import server_args
    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )

    if ATTENTION_BACKENDS.get(BACKEND_NAME) is not create_batchllm_backend:
        register_attention_backend(BACKEND_NAME)(create_batchllm_backend)
    if BACKEND_NAME not in server_args.ATTENTION_BACKEND_CHOICES:
        server_args.add_attention_backend_choices([BACKEND_NAME])
