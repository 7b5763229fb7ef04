"""fp32 torch reference for cascade (shared-prefix) attention: the single source of truth.

Everything here is plain torch on any device, computed in float32, slow and obvious. The
Triton kernels in `cascade_attention.py` are tested against these functions, and the laws of
the math (cascade == full attention, any split point, merge commutative and associative) are
tested on these functions themselves.

LSE convention (the only one in this package): `lse_base2 = log2(sum_j exp(s_j))` where
`s_j = sm_scale * q . k_j` are the natural-unit scores. An empty key set has output 0 and
`lse_base2 = -inf`. Merging partial states with base-2 weights:

    m = max(lse_a, lse_b);  w_a = 2^(lse_a - m);  w_b = 2^(lse_b - m)
    o = (o_a * w_a + o_b * w_b) / (w_a + w_b);    lse = m + log2(w_a + w_b)

KV layout (SGLang's): per-layer buffers `[num_slots, num_kv_heads, head_dim]`; a sequence's
keys are `k_buffer[kv_indices[indptr[i] : indptr[i + 1]]]`. Queries `[num_tokens, num_q_heads,
head_dim]`; query head `h` reads KV head `h // (num_q_heads // num_kv_heads)`.

Suffix causality: request `b` has `q_len` query tokens which are the LAST `q_len` tokens of its
suffix (their KV is already in the cache, as SGLang writes KV before attention). Query `i`
sits at suffix position `S - q_len + i` and sees suffix keys `0 .. S - q_len + i` and the
whole group prefix. Decode is the case `q_len == 1`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

LOG2E = 1.0 / math.log(2.0)
NEG_INF = float("-inf")


def attention_with_lse_base2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of `q [M, Hq, D]` over `k, v [N, Hkv, D]` in fp32.

    `allowed [M, N]` (bool, True = may attend) masks keys per query. Returns
    `(out [M, Hq, D], lse_base2 [M, Hq])`; rows that see no key get 0 and -inf.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    heads_per_kv = hq // hkv
    qf = q.float()
    kf = k.float().repeat_interleave(heads_per_kv, dim=1)
    vf = v.float().repeat_interleave(heads_per_kv, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", qf, kf) * sm_scale  # [Hq, M, N]
    if allowed is not None:
        scores = scores.masked_fill(~allowed[None], NEG_INF)
    lse_nat = torch.logsumexp(scores, dim=-1)  # [Hq, M]; -inf for empty rows
    safe = torch.where(torch.isinf(lse_nat), torch.zeros_like(lse_nat), lse_nat)
    probs = torch.exp(scores - safe[..., None])  # exactly 0 where masked
    out = torch.einsum("hmn,nhd->mhd", probs, vf)
    return out, (lse_nat * LOG2E).transpose(0, 1).contiguous()


def merge_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention states (`o [..., D]`, `lse_base2 [...]`) in fp32."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w_a = torch.exp2(lse_a - m_safe)
    w_b = torch.exp2(lse_b - m_safe)
    total = w_a + w_b
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (o_a.float() * w_a[..., None] + o_b.float() * w_b[..., None]) / denom[..., None]
    return out, m_safe + torch.log2(total)  # log2(0) = -inf for two empty states


def _lengths(indptr: torch.Tensor) -> list[int]:
    return (indptr[1:] - indptr[:-1]).tolist()


def _suffix_causal_mask(q_len: int, suffix_len: int, device) -> torch.Tensor:
    q_pos = torch.arange(q_len, device=device) + (suffix_len - q_len)
    return torch.arange(suffix_len, device=device)[None, :] <= q_pos[:, None]


def _request_views(
    prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr, suffix_kv_indices, request_group,
    qo_indptr,
):
    """Yield (token_slice, prefix_slots, suffix_slots) per request."""
    prefix_kv_indptr = torch.as_tensor(prefix_kv_indptr).cpu()
    suffix_kv_indptr = torch.as_tensor(suffix_kv_indptr).cpu()
    groups = torch.as_tensor(request_group).cpu().tolist()
    num_requests = len(groups)
    if qo_indptr is None:
        qo = list(range(num_requests + 1))
    else:
        qo = torch.as_tensor(qo_indptr).cpu().tolist()
    for b, g in enumerate(groups):
        if g >= 0:
            p0, p1 = int(prefix_kv_indptr[g]), int(prefix_kv_indptr[g + 1])
            prefix_slots = prefix_kv_indices[p0:p1].long()
        else:
            prefix_slots = suffix_kv_indices[:0].long()
        s0, s1 = int(suffix_kv_indptr[b]), int(suffix_kv_indptr[b + 1])
        yield slice(qo[b], qo[b + 1]), prefix_slots, suffix_kv_indices[s0:s1].long()


def full_attention_reference(
    q, k_buffer, v_buffer, *, prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr,
    suffix_kv_indices, request_group, qo_indptr=None, sm_scale: float,
) -> torch.Tensor:
    """Each request attends to `prefix ++ suffix` in ONE softmax (no cascade). fp32 out."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for tokens, prefix_slots, suffix_slots in _request_views(
        prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr, suffix_kv_indices,
        request_group, qo_indptr,
    ):
        q_len = tokens.stop - tokens.start
        if q_len == 0:
            continue
        slots = torch.cat([prefix_slots, suffix_slots])
        allowed = torch.cat(
            [
                torch.ones(q_len, len(prefix_slots), dtype=torch.bool, device=q.device),
                _suffix_causal_mask(q_len, len(suffix_slots), q.device),
            ],
            dim=1,
        )
        out[tokens], _ = attention_with_lse_base2(
            q[tokens], k_buffer[slots], v_buffer[slots], sm_scale, allowed
        )
    return out


def cascade_attention_reference(
    q, k_buffer, v_buffer, *, prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr,
    suffix_kv_indices, request_group, qo_indptr=None, sm_scale: float,
    prefix_split_points: Sequence[int] = (),
) -> torch.Tensor:
    """The cascade: prefix part (unmasked) and suffix part (causal) as separate states,
    merged with `merge_states`. `prefix_split_points` cuts every prefix into more parts
    (points beyond a prefix's length are ignored), which must not change the result."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for tokens, prefix_slots, suffix_slots in _request_views(
        prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr, suffix_kv_indices,
        request_group, qo_indptr,
    ):
        q_len = tokens.stop - tokens.start
        if q_len == 0:
            continue
        qt = q[tokens]
        o, lse = attention_with_lse_base2(
            qt, k_buffer[suffix_slots], v_buffer[suffix_slots], sm_scale,
            _suffix_causal_mask(q_len, len(suffix_slots), q.device),
        )
        cuts = [0] + sorted(p for p in set(prefix_split_points) if 0 < p < len(prefix_slots))
        cuts.append(len(prefix_slots))
        for lo, hi in itertools.pairwise(cuts):
            part = prefix_slots[lo:hi]
            o_p, lse_p = attention_with_lse_base2(qt, k_buffer[part], v_buffer[part], sm_scale)
            o, lse = merge_states(o_p, lse_p, o, lse)
        out[tokens] = o
    return out
