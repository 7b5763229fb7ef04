"""Fused cascade (shared-prefix) attention in Triton, for SGLang's paged KV layout.

    plan = build_decode_plan(...)              # once per forward step (cascade_plan.py)
    out = cascade_decode(q, k_buf, v_buf, plan, sm_scale)   # per layer: 1 fused launch + 1 merge

One launch runs every work item of the plan (horizontal fusion): GROUP tiles, where all query
tokens of a group's members x the query heads of one KV head read the shared prefix once, and
REQUEST tiles, where the queries of one request (or of a run of consecutive requests, their
suffixes streamed back to back) read their own suffix causally and, for groups that are not
packed, the prefix too. Long items are split into pieces (cascade_plan.py has the layout).
Each tile writes either the final output (a token with one partial) or an fp32 partial
`(o, lse_base2)`; `_merge_kernel` then combines each token's partials in one small launch.
The math is `reference.py`'s.

Scores are kept in base 2 inside the kernels: `qk_scale = sm_scale * log2(e)`, so the running
max and `lse_base2 = m + log2(l)` follow the package's one LSE convention.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .cascade_plan import ITEM_FIELDS, CascadePlan

LOG2E = 1.0 / math.log(2.0)
_MERGE_BLOCK_H = 16


@triton.jit
def _attend_range(
    acc, m_i, l_i, q, k_base, v_base, slots, lo, hi, win_lo, win_hi,
    stride_kt, stride_vt, qk_scale, offs_d, mask_d,
    WINDOWED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online softmax of the tile's rows over KV positions [lo, hi) of `slots`.
    WINDOWED: row r sees position j only if win_lo[r] <= j <= win_hi[r] (its own request's
    suffix, causally); otherwise every row sees every position (a shared prefix)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        mask_n = n < hi
        slot = tl.load(slots + n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(
            k_base + slot[None, :] * stride_kt + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        if DOT_FP32:  # the interpreter (no bf16 dot in numpy) and fp32 inputs: exact fp32
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        qk = qk * qk_scale
        if WINDOWED:
            allowed = (n[None, :] >= win_lo[:, None]) & (n[None, :] <= win_hi[:, None])
            allowed = allowed & mask_n[None, :]
        else:
            allowed = mask_n[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + slot[:, None] * stride_vt + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DOT_FP32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tile(
    Q, Out, PartO, PartLse, PrefixSlots, SuffixSlots, GroupQTokens, TokPartStart,
    TokOwnPartStart, TokNumPart, TokSuffixStart, TokQpos, k_base, v_base, kv_head, lo, hi,
    piece, token_start, num_tokens, prefix_start, p_len, suffix_start, qk_scale, stride_qt,
    stride_qh, stride_kt, stride_vt, stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
    offs_d, mask_d,
    IS_GROUP: tl.constexpr, HPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """One tile piece. Rows = (query token, head of kv_head), token-major, whole tokens only.
    GROUP: tokens group_q_tokens[token_start:][:num_tokens], stream = prefix, no mask.
    REQUEST: tokens token_start.., stream = prefix ++ suffix(es), causal per row."""
    TOK_PER_TILE: tl.constexpr = BLOCK_M // HPK
    r = tl.arange(0, BLOCK_M)
    local = r // HPK
    valid = (r < TOK_PER_TILE * HPK) & (local < num_tokens)
    if IS_GROUP:
        token = tl.load(GroupQTokens + token_start + local, mask=valid, other=0)
        dest = tl.load(TokPartStart + token, mask=valid, other=0) + piece
        win_lo = local  # unused: no mask
        win_hi = local
    else:
        token = token_start + local
        dest = tl.load(TokOwnPartStart + token, mask=valid, other=0) + piece
        win_lo = tl.load(TokSuffixStart + token, mask=valid, other=0) - suffix_start
        win_hi = win_lo + tl.load(TokQpos + token, mask=valid, other=-1)
    n_part = tl.load(TokNumPart + token, mask=valid, other=0)
    head = kv_head * HPK + r % HPK
    q = tl.load(
        Q + token.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=valid[:, None] & mask_d[None, :],
        other=0.0,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # stream positions [0, p_len) are the prefix (no mask), [p_len, ...) the suffix(es)
    acc, m_i, l_i = _attend_range(
        acc, m_i, l_i, q, k_base, v_base, PrefixSlots + prefix_start, lo,
        tl.minimum(hi, p_len), win_lo, win_hi, stride_kt, stride_vt, qk_scale, offs_d, mask_d,
        WINDOWED=False, BLOCK_N=BLOCK_N, DOT_FP32=DOT_FP32,
    )
    if not IS_GROUP:
        acc, m_i, l_i = _attend_range(
            acc, m_i, l_i, q, k_base, v_base, SuffixSlots + suffix_start,
            tl.maximum(lo, p_len) - p_len, hi - p_len, win_lo, win_hi, stride_kt, stride_vt,
            qk_scale, offs_d, mask_d, WINDOWED=True, BLOCK_N=BLOCK_N, DOT_FP32=DOT_FP32,
        )
    # a token with one partial gets its final output here; others an fp32 partial state
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    o = acc / l_safe[:, None]
    lse_base2 = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    direct = valid & (n_part == 1)
    tl.store(
        Out + token.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        o.to(Out.dtype.element_ty),
        mask=direct[:, None] & mask_d[None, :],
    )
    partial = valid & (n_part > 1)
    row = dest.to(tl.int64)
    tl.store(
        PartO + row[:, None] * stride_pp + head[:, None] * stride_ph + offs_d[None, :],
        o,
        mask=partial[:, None] & mask_d[None, :],
    )
    tl.store(PartLse + row * stride_lp + head, lse_base2, mask=partial)


@triton.jit
def _cascade_fwd_kernel(
    Q, K, V, Out, PartO, PartLse, Items, NumItems, PrefixSlots, SuffixSlots, GroupQTokens,
    TokPartStart, TokOwnPartStart, TokNumPart, TokSuffixStart, TokQpos, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pp, stride_ph, stride_lp,
    NUM_KV_HEADS: tl.constexpr, HPK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M_GROUP: tl.constexpr, BLOCK_N_GROUP: tl.constexpr,
    BLOCK_M_REQUEST: tl.constexpr, BLOCK_N_REQUEST: tl.constexpr, ITEM_STRIDE: tl.constexpr,
    DOT_FP32: tl.constexpr, LIVE_COUNT: tl.constexpr,
):
    """1-D grid over (item, KV head), KV head fastest: the KV heads of one item run side by
    side and read neighbouring bytes of the same token rows. The item row holds everything
    the program needs, so one round trip precedes the slot-index loads."""
    pid = tl.program_id(0)
    if LIVE_COUNT:  # fixed grid (CUDA graphs): this step's plan may use fewer items
        if pid // NUM_KV_HEADS >= tl.load(NumItems):
            return
    kv_head = pid % NUM_KV_HEADS
    item = Items + (pid // NUM_KV_HEADS).to(tl.int64) * ITEM_STRIDE
    kind = tl.load(item + 0)
    lo = tl.load(item + 1)
    hi = tl.load(item + 2)
    piece = tl.load(item + 3)
    token_start = tl.load(item + 4)
    num_tokens = tl.load(item + 5)
    prefix_start = tl.load(item + 6)
    p_len = tl.load(item + 7)
    suffix_start = tl.load(item + 8)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    k_base = K + kv_head.to(tl.int64) * stride_kh
    v_base = V + kv_head.to(tl.int64) * stride_vh
    if kind == 0:
        _tile(
            Q, Out, PartO, PartLse, PrefixSlots, SuffixSlots, GroupQTokens, TokPartStart,
            TokOwnPartStart, TokNumPart, TokSuffixStart, TokQpos, k_base, v_base, kv_head,
            lo, hi, piece, token_start, num_tokens, prefix_start, p_len, suffix_start,
            qk_scale, stride_qt, stride_qh, stride_kt, stride_vt, stride_ot, stride_oh,
            stride_pp, stride_ph, stride_lp, offs_d, mask_d,
            IS_GROUP=True, HPK=HPK, BLOCK_M=BLOCK_M_GROUP, BLOCK_D=BLOCK_D,
            BLOCK_N=BLOCK_N_GROUP, DOT_FP32=DOT_FP32,
        )
    else:
        _tile(
            Q, Out, PartO, PartLse, PrefixSlots, SuffixSlots, GroupQTokens, TokPartStart,
            TokOwnPartStart, TokNumPart, TokSuffixStart, TokQpos, k_base, v_base, kv_head,
            lo, hi, piece, token_start, num_tokens, prefix_start, p_len, suffix_start,
            qk_scale, stride_qt, stride_qh, stride_kt, stride_vt, stride_ot, stride_oh,
            stride_pp, stride_ph, stride_lp, offs_d, mask_d,
            IS_GROUP=False, HPK=HPK, BLOCK_M=BLOCK_M_REQUEST, BLOCK_D=BLOCK_D,
            BLOCK_N=BLOCK_N_REQUEST, DOT_FP32=DOT_FP32,
        )


@triton.jit
def _merge_kernel(
    Out, PartO, PartLse, TokPartStart, TokNumPart, num_heads,
    stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Out[t] = merge of token t's partials (base-2 LSE weights); zeros when it has none."""
    token = tl.program_id(0)
    n_part = tl.load(TokNumPart + token)
    if n_part != 1:  # one partial was written straight to Out by the fused kernel
        start = tl.load(TokPartStart + token)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = heads < num_heads
        offs_d = tl.arange(0, BLOCK_D)
        mask = mask_h[:, None] & (offs_d < HEAD_DIM)[None, :]
        m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for i in range(n_part):
            row = (start + i).to(tl.int64)
            lse = tl.load(PartLse + row * stride_lp + heads, mask=mask_h, other=float("-inf"))
            o = tl.load(
                PartO + row * stride_pp + heads[:, None] * stride_ph + offs_d[None, :],
                mask=mask,
                other=0.0,
            )
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            acc = acc * alpha[:, None] + o * w[:, None]
            l = l * alpha + w
            m = m_new
        out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(
            Out + token.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=mask,
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_inputs(q, k_buffer, v_buffer, plan: CascadePlan, out):
    if not isinstance(plan, CascadePlan):
        raise TypeError(f"plan must be a CascadePlan from build_*_plan, got {type(plan).__name__}")
    hq, hkv, d = plan.num_q_heads, plan.num_kv_heads, plan.head_dim
    if q.dim() != 3 or tuple(q.shape) != (plan.num_tokens, hq, d):
        raise ValueError(
            f"q must be [num_tokens={plan.num_tokens}, num_q_heads={hq}, head_dim={d}] as planned, "
            f"got {tuple(q.shape)}"
        )
    bufs = []
    for name, buf in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if buf.dim() == 4:  # [num_pages, page_size, H, D]: the same slots, if viewable
            try:
                buf = buf.view(-1, *buf.shape[2:])
            except RuntimeError:
                raise ValueError(f"{name} [pages, page_size, H, D] must be viewable as [slots, H, D]")
        if buf.dim() != 3 or tuple(buf.shape[1:]) != (hkv, d):
            raise ValueError(f"{name} must be [num_slots, {hkv}, {d}], got {tuple(buf.shape)}")
        if buf.dtype != q.dtype:
            raise ValueError(f"{name} is {buf.dtype} but q is {q.dtype}; cast q to the KV dtype")
        if buf.stride(-1) != 1 or buf.device != q.device:
            raise ValueError(f"{name} must have a contiguous head_dim and live on q's device")
        bufs.append(buf)
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}: use bfloat16 or float16")
    if q.stride(-1) != 1:
        raise ValueError("q must have a contiguous head_dim")
    if out is None:
        out = torch.empty_like(q)
    elif tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with contiguous head_dim")
    if plan.items.device != q.device:
        raise ValueError(f"plan is on {plan.items.device} but q is on {q.device}")
    return bufs[0], bufs[1], out


def cascade_forward(q, k_buffer, v_buffer, plan: CascadePlan, sm_scale: float, out=None):
    """Run the planned cascade attention for one layer; returns `out [T, Hq, D]` (q's dtype)."""
    k_buffer, v_buffer, out = _check_inputs(q, k_buffer, v_buffer, plan, out)
    if plan.num_tokens == 0:
        return out
    cfg = plan.config
    block_d = triton.next_power_of_2(plan.head_dim)
    part_o, part_lse = plan.partial_out, plan.partial_lse_base2
    live = plan.num_items_dev is not None
    grid_items = plan.grid_items if live else plan.num_items
    if grid_items:
        _cascade_fwd_kernel[(grid_items * plan.num_kv_heads,)](
            q, k_buffer, v_buffer, out, part_o, part_lse, plan.items,
            plan.num_items_dev if live else plan.items, plan.prefix_kv_indices,
            plan.suffix_kv_indices, plan.group_q_tokens, plan.token_partial_start,
            plan.token_own_partial_start, plan.token_num_partials, plan.token_suffix_start,
            plan.token_qpos, sm_scale * LOG2E,
            q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            v_buffer.stride(0), v_buffer.stride(1), out.stride(0), out.stride(1),
            part_o.stride(0), part_o.stride(1), part_lse.stride(0),
            NUM_KV_HEADS=plan.num_kv_heads, HPK=plan.heads_per_kv, HEAD_DIM=plan.head_dim,
            BLOCK_D=block_d, BLOCK_M_GROUP=cfg.block_m_group, BLOCK_N_GROUP=cfg.block_n_group,
            BLOCK_M_REQUEST=cfg.block_m_request, BLOCK_N_REQUEST=cfg.block_n_request,
            ITEM_STRIDE=ITEM_FIELDS, DOT_FP32=_interpreting() or q.dtype == torch.float32,
            LIVE_COUNT=live,
            # fp32 KV tiles are twice as large: keep them within shared memory
            num_warps=cfg.num_warps, num_stages=cfg.num_stages if q.element_size() == 2 else 1,
        )
    if plan.needs_merge:
        _merge_kernel[(plan.num_tokens, triton.cdiv(plan.num_q_heads, _MERGE_BLOCK_H))](
            out, part_o, part_lse, plan.token_partial_start, plan.token_num_partials,
            plan.num_q_heads, out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1),
            part_lse.stride(0), HEAD_DIM=plan.head_dim, BLOCK_D=block_d, BLOCK_H=_MERGE_BLOCK_H,
            num_warps=4,
        )
    return out


def cascade_decode(q, k_buffer, v_buffer, plan: CascadePlan, sm_scale: float, out=None):
    """Decode step: `q [B, Hq, D]`, one query per request, planned by `build_decode_plan`."""
    if plan.mode != "decode":
        raise ValueError("cascade_decode needs a plan from build_decode_plan")
    return cascade_forward(q, k_buffer, v_buffer, plan, sm_scale, out)


def cascade_extend(q, k_buffer, v_buffer, plan: CascadePlan, sm_scale: float, out=None):
    """Extend/prefill step: `q [T, Hq, D]` laid out by the plan's `qo_indptr`; the new tokens'
    KV must already be in the buffers (SGLang writes it before attention)."""
    if plan.mode != "extend":
        raise ValueError("cascade_extend needs a plan from build_extend_plan")
    return cascade_forward(q, k_buffer, v_buffer, plan, sm_scale, out)


__all__ = ["cascade_decode", "cascade_extend", "cascade_forward"]
