"""Seeded synthetic batches in SGLang's paged KV layout, shared by tests and the benchmark.

Pages are handed out in a random order, so slot indices are page-structured (consecutive
inside a page) but scattered across the pool. Every group's prefix starts on a fresh page and
every request's suffix too (SGLang shares whole pages only). Slots no sequence owns are
filled with NaN, so a kernel that reads a wrong slot produces NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SyntheticBatch:
    q: torch.Tensor  # [T, Hq, D]
    k_buffer: torch.Tensor  # [num_slots, Hkv, D]
    v_buffer: torch.Tensor
    prefix_kv_indptr: torch.Tensor  # CPU int64 [G+1]
    prefix_kv_indices: torch.Tensor  # device int32
    suffix_kv_indptr: torch.Tensor  # CPU int64 [B+1]
    suffix_kv_indices: torch.Tensor  # device int32
    request_group: torch.Tensor  # CPU int64 [B], -1 = no group
    qo_indptr: torch.Tensor | None  # CPU int64 [B+1]; None for decode
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    def plan_kwargs(self) -> dict:
        kw = {
            "prefix_kv_indptr": self.prefix_kv_indptr,
            "prefix_kv_indices": self.prefix_kv_indices,
            "suffix_kv_indptr": self.suffix_kv_indptr,
            "suffix_kv_indices": self.suffix_kv_indices,
            "request_group": self.request_group,
            "num_q_heads": self.num_q_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }
        if self.qo_indptr is not None:
            kw["qo_indptr"] = self.qo_indptr
        return kw

    def reference_kwargs(self) -> dict:
        kw = self.plan_kwargs()
        for name in ("num_q_heads", "num_kv_heads", "head_dim"):
            kw.pop(name)
        kw.setdefault("qo_indptr", None)
        return kw

    def request_slots(self, b: int) -> torch.Tensor:
        """Request b's full sequence (prefix ++ suffix) as slot indices (int64, device)."""
        g = int(self.request_group[b])
        s0, s1 = int(self.suffix_kv_indptr[b]), int(self.suffix_kv_indptr[b + 1])
        suffix = self.suffix_kv_indices[s0:s1].long()
        if g < 0:
            return suffix
        p0, p1 = int(self.prefix_kv_indptr[g]), int(self.prefix_kv_indptr[g + 1])
        return torch.cat([self.prefix_kv_indices[p0:p1].long(), suffix])


def _cycle(values: Sequence[int], n: int) -> list[int]:
    return [int(values[i % len(values)]) for i in range(n)]


def make_batch(
    *,
    group_sizes: Sequence[int],
    prefix_lens: Sequence[int],
    suffix_lens: Sequence[int],
    num_ungrouped: int = 0,
    q_lens: Sequence[int] | None = None,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 64,
    page_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    poison_unused: bool = True,
) -> SyntheticBatch:
    """Groups of `group_sizes` members with prefixes `prefix_lens` (cycled), plus
    `num_ungrouped` requests without a group; request suffix lengths cycle through
    `suffix_lens`. `q_lens=None` makes a decode batch; otherwise query counts cycle through
    `q_lens` and are clipped to each suffix. Request order is shuffled."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = len(group_sizes)
    prefix = _cycle(prefix_lens, num_groups)
    groups = [g for g, size in enumerate(group_sizes) for _ in range(size)] + [-1] * num_ungrouped
    order = torch.randperm(len(groups), generator=gen).tolist()
    groups = [groups[i] for i in order]
    num_requests = len(groups)
    suffix = _cycle(suffix_lens, num_requests)
    lengths = prefix + suffix  # sequences that own pages: prefixes, then suffixes
    pages_each = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_each) + 1  # page 0 stays unused, as SGLang's padding slot
    page_perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    slots, pos = [], 0
    for n, p in zip(lengths, pages_each):
        pages = torch.tensor(page_perm[pos : pos + p], dtype=torch.int64)
        pos += p
        s = (pages[:, None] * page_size + torch.arange(page_size)[None, :]).reshape(-1)[:n]
        slots.append(s)
    num_slots = num_pages * page_size
    shape = (num_slots, num_kv_heads, head_dim)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(shape, generator=dev_gen, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(shape, generator=dev_gen, device=device, dtype=torch.float32).to(dtype)
    if poison_unused:
        unused = torch.ones(num_slots, dtype=torch.bool)
        if slots:
            unused[torch.cat(slots)] = False
        unused = unused.to(device)
        k[unused] = float("nan")
        v[unused] = float("nan")

    def indptr(ns):
        return torch.tensor([0] + list(ns), dtype=torch.int64).cumsum(0)

    def cat(ts):
        return torch.cat(ts) if ts else torch.zeros(0, dtype=torch.int64)

    if q_lens is None:
        qo = None
        num_tokens = num_requests
    else:
        ql = [min(a, s) for a, s in zip(_cycle(q_lens, num_requests), suffix)]
        qo = indptr(ql)
        num_tokens = int(qo[-1])
    q = torch.randn((num_tokens, num_q_heads, head_dim), generator=dev_gen, device=device)
    return SyntheticBatch(
        q=q.to(dtype),
        k_buffer=k,
        v_buffer=v,
        prefix_kv_indptr=indptr(prefix),
        prefix_kv_indices=cat(slots[:num_groups]).to(device=device, dtype=torch.int32),
        suffix_kv_indptr=indptr(suffix),
        suffix_kv_indices=cat(slots[num_groups:]).to(device=device, dtype=torch.int32),
        request_group=torch.tensor(groups, dtype=torch.int64),
        qo_indptr=qo,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )
