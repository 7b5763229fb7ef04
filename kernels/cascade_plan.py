"""Per-step plan for the fused cascade attention kernel (FlashInfer-style plan/run split).

`build_decode_plan` / `build_extend_plan` run ONCE per forward step, on host-side lengths,
and produce a `CascadePlan` of device tensors that every layer's `cascade_decode` /
`cascade_extend` call reuses. All work partitioning (tiles, prefix splits, where each
partial result goes) is decided here, never per layer.

Inputs (SGLang's conventions; "slot" = token index into the per-layer KV buffers):

    prefix_kv_indptr  [G+1]  group g's shared prefix is prefix_kv_indices[indptr[g]:indptr[g+1]]
    suffix_kv_indptr  [B+1]  request b's own tokens (everything after its group's prefix,
                             INCLUDING this step's new tokens, whose KV is already written)
    request_group     [B]    group of request b, or -1 for a request with no shared prefix
    qo_indptr         [B+1]  extend only: request b's queries are q[qo_indptr[b]:qo_indptr[b+1]],
                             the last q_len tokens of its suffix (decode: one query each)

Tiles (one program per tile piece and KV head, all in ONE launch). A tile's rows are
`(query token, query head of the KV head)`, token-major, whole tokens only, so GQA heads
share every K/V load. Each tile streams a range [lo, hi) of a virtual KV sequence:

    GROUP tile    query tokens of all members of a packed group; stream = the group prefix,
                  no mask. The prefix is read once per tile instead of once per member.
    REQUEST tile  a run of consecutive requests; stream = prefix ++ suffix of ONE request
                  (p_len > 0: its group is not packed), or the back-to-back suffixes of
                  several requests (p_len = 0), which keeps short decode suffixes streaming
                  in long loops. Row r sees the prefix part and, in the suffix part, only its
                  own request's positions up to its own token (causal).

Long tiles are split into pieces. A token with exactly one partial result is written straight
to the output; others write fp32 partials (o, lse_base2) that one merge launch combines:

    token t's partials: [partial_start[t], partial_start[t] + num_partials[t])
                        = [ its group's prefix pieces | its REQUEST tile's pieces ]
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from .plan_inputs import CascadePlanError, read_step_batch

# Tiles with more KV positions than `chunk` are split into pieces; `chunk` is chosen so the
# launch has about this many (piece, KV head) programs per SM, but never shorter than
# MIN_SPLIT_CHUNK positions: a piece must stream enough KV to amortize its partial write.
PROGRAMS_PER_SM_TARGET = 4
MIN_SPLIT_CHUNK = 256
DEFAULT_NUM_SMS = 132  # H100/H200 SXM; used when the plan is built for a non-CUDA device

# One work item (tile piece) = one int32 row; the kernel needs nothing else to start loading.
ITEM_FIELDS = 10
# Every int32 array handed to a kernel starts on a 16-byte boundary (ALIGN elements): Triton
# specializes a pointer argument on its 16-byte alignment, so arrays packed at offsets that
# vary with each step's sizes would compile a new kernel variant for each alignment pattern
# met (measured: eager decode steps of a 1,600-request run spent tens of seconds compiling).
ALIGN = 4


def aligned(n: int) -> int:
    """`n` int32 elements rounded up to the next 16-byte boundary."""
    return -(-int(n) // ALIGN) * ALIGN


def split_aligned(buffer: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Views of `buffer` of these sizes, each starting at an aligned offset (`aligned` regions)."""
    views, offset = [], 0
    for n in sizes:
        views.append(buffer[offset:offset + n])
        offset += aligned(n)
    return views


def pack_aligned(arrays: list[torch.Tensor], dtype=torch.int32) -> torch.Tensor:
    """One host tensor holding `arrays` back to back, each in its own aligned region (zero
    padding between), for `split_aligned` on the device copy."""
    out = torch.zeros(sum(aligned(a.numel()) for a in arrays), dtype=dtype)
    offset = 0
    for a in arrays:
        out[offset:offset + a.numel()] = a.reshape(-1)
        offset += aligned(a.numel())
    return out
(F_KIND, F_LO, F_HI, F_PIECE, F_TOKEN_START, F_NUM_TOKENS, F_PREFIX_START, F_PREFIX_LEN,
 F_SUFFIX_START) = range(9)  # field 9 is padding
KIND_GROUP, KIND_REQUEST = 0, 1

PackingPolicy = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class CascadeLaunchConfig:
    """Compile-time tile shapes of the fused kernel. Rows = query tokens x heads per KV."""

    block_m_group: int  # rows of a GROUP tile
    block_n_group: int  # KV positions per inner-loop step of a GROUP tile
    block_m_request: int  # rows of a REQUEST tile
    block_n_request: int
    num_warps: int
    num_stages: int


def default_launch_config(mode: str, heads_per_kv: int, max_group_rows: int,
                          head_dim: int = 128) -> CascadeLaunchConfig:
    """Tile shapes per mode: the fastest of the configurations scripts/bench_cascade.py
    sweeps on an H200 (docs/kernel.md has the table). Decode is memory-bound: 64-row GROUP
    tiles (16 members x 4 heads fill one wgmma), 16-row REQUEST tiles streaming 128 KV
    positions per step (`--tune`, the engine's largest decode step: 0.588 ms against 0.646 ms
    with 64, 88% of the HBM floor), 4 warps, 3 stages. That tile's three stages of K and V
    take 148 KB of shared memory at head_dim 128; wider heads keep the 64-position step (half
    of it), which the sweeps before measured and which fits.
    Extend is compute-bound: 64-row tiles on 4 warps beat 128-row tiles on 8."""
    min_rows = max(16, _next_pow2(heads_per_kv))
    if mode == "decode":
        group_rows = min(64, max(min_rows, _next_pow2(max(1, max_group_rows))))
        return CascadeLaunchConfig(group_rows, 64, min_rows, 128 if head_dim <= 128 else 64, 4, 3)
    rows = max(64, min_rows)
    return CascadeLaunchConfig(rows, 32, rows, 32, 4, 3)


@dataclass(frozen=True)
class CascadePlan:
    """Everything the kernels need for one forward step; built by `build_*_plan`."""

    mode: str  # "decode" or "extend"
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_tokens: int
    num_requests: int
    num_groups: int
    num_items: int
    needs_merge: bool  # some token has != 1 partials
    config: CascadeLaunchConfig
    # device tensors (int32 unless noted)
    items: torch.Tensor  # [num_items, ITEM_FIELDS], costliest first
    prefix_kv_indices: torch.Tensor  # the caller's slots (int32 or int64)
    suffix_kv_indices: torch.Tensor
    group_q_tokens: torch.Tensor  # query token ids of packed groups' members, by group
    token_partial_start: torch.Tensor  # [T] first partial (its group's prefix pieces)
    token_own_partial_start: torch.Tensor  # [T] first partial of its REQUEST tile's pieces
    token_num_partials: torch.Tensor  # [T]
    token_suffix_start: torch.Tensor  # [T] its request's suffix offset in suffix_kv_indices
    token_qpos: torch.Tensor  # [T] its position in its request's suffix (causal bound)
    partial_out: torch.Tensor  # [max(P, 1), Hq, D] float32 workspace
    partial_lse_base2: torch.Tensor  # [max(P, 1), Hq] float32 workspace
    # host-side summaries (for tests, benchmarks and logs)
    packed_groups: torch.Tensor  # [G] bool, CPU
    group_num_splits: torch.Tensor  # [G] int64, CPU: prefix pieces of packed groups
    # Fixed-shape launch (a plan written into a `CascadeWorkspace`): the fused kernel runs
    # `grid_items` programs per KV head and those past `num_items_dev` exit at once; the merge
    # always runs. None: the launch is sized to this plan.
    num_items_dev: torch.Tensor | None = None  # [1] int32 on the device
    grid_items: int | None = None

    @property
    def heads_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def with_config(self, config: CascadeLaunchConfig) -> CascadePlan:
        """Same plan, other loop shapes; the row tiling (block_m_*) must stay the same."""
        if (config.block_m_group, config.block_m_request) != (
            self.config.block_m_group,
            self.config.block_m_request,
        ):
            raise CascadePlanError("block_m_* decide the tiling: build a new plan instead")
        return replace(self, config=config)


class CascadeWorkspace:
    """Device buffers that every plan of up to `max_tokens` query tokens is written into.

    Why: a CUDA graph records kernel arguments (pointers, grid) once, at capture. A plan built
    with `workspace=` keeps all its tensors at the same addresses, a launch grid fixed by the
    capacities below, and its live item count on the device, so a graph captured over one plan
    replays correctly over any later one written into the same workspace (outside the graph).

    Capacities: at most `max_items` tile pieces (the planner raises the split length until the
    plan fits, see `_split_pieces`) and `max_partials` partial rows (with no split at all a
    token has at most two partials, so `max_partials >= 2 * max_tokens` always fits). The one
    host-to-device copy per step goes through a pinned staging buffer.
    """

    def __init__(self, *, max_tokens: int, num_q_heads: int, head_dim: int, device,
                 config: CascadeLaunchConfig, max_items: int | None = None,
                 max_partials: int | None = None, num_sms: int | None = None):
        device = torch.device(device)
        if num_sms is None:
            num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else DEFAULT_NUM_SMS
            )
        self.max_tokens = int(max_tokens)
        self.num_q_heads, self.head_dim, self.device, self.config = num_q_heads, head_dim, device, config
        self.num_sms = num_sms
        # one GROUP and one REQUEST tile per token at worst, plus the pieces of the split target
        self.max_items = int(max_items or 2 * self.max_tokens + num_sms * PROGRAMS_PER_SM_TARGET + 16)
        self.max_partials = int(max_partials or 4 * self.max_tokens + 1024)
        if self.max_partials < 2 * self.max_tokens:
            raise CascadePlanError("max_partials must be at least 2 * max_tokens")
        # int32 metadata regions, in the order the planner fills them
        t = self.max_tokens
        self.sizes = [self.max_items * ITEM_FIELDS, t, t, t, t, t, t, 1]
        total = sum(aligned(n) for n in self.sizes)
        self.meta = torch.zeros(total, dtype=torch.int32, device=device)
        # Two pinned staging buffers, taken in turn: the copy out of one may still be queued
        # behind the step in flight while the next step's plan is written into the other.
        pinned = device.type == "cuda"
        self._staging = [torch.zeros(total, dtype=torch.int32, pin_memory=pinned) for _ in range(2)]
        self._copied = [None, None]  # CUDA event after each buffer's last copy
        self._turn = 0
        self.views = split_aligned(self.meta, self.sizes)
        self.partial_out = torch.empty(self.max_partials, num_q_heads, head_dim, dtype=torch.float32, device=device)
        self.partial_lse_base2 = torch.empty(self.max_partials, num_q_heads, dtype=torch.float32, device=device)


def build_decode_plan(**kwargs) -> CascadePlan:
    """Plan a decode step: one query token per request (`q[b]` belongs to request b).
    Keyword arguments as `build_extend_plan`, without `qo_indptr`."""
    if "qo_indptr" in kwargs:
        raise CascadePlanError("a decode plan has one query per request: drop qo_indptr")
    return _build_plan(mode="decode", qo_indptr=None, **kwargs)


def build_extend_plan(*, qo_indptr, **kwargs) -> CascadePlan:
    """Plan an extend/prefill step.

    Args (all keyword): prefix_kv_indptr, prefix_kv_indices, suffix_kv_indptr,
    suffix_kv_indices, request_group, qo_indptr, num_q_heads, num_kv_heads, head_dim;
    optional prefix_packing ("auto" | "always" | "never"), max_kv_chunk (split length; None =
    automatic), num_sms, config (CascadeLaunchConfig). Index tensors stay on their device;
    indptr / group / qo arrays may be lists or tensors (CPU tensors avoid a device sync).
    """
    return _build_plan(mode="extend", qo_indptr=qo_indptr, **kwargs)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a, b):
    return -(-a // b)


def _segment_arange(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts [n]: (owner of each element, index within its owner)."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    starts = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel()) - starts[owner]


def _runs_of_requests(eligible: torch.Tensor, q_len: torch.Tensor, capacity: int):
    """Greedily cut runs of consecutive eligible requests into tiles of <= capacity tokens.
    Returns (first request, last request) per tile."""
    idx = eligible.nonzero().flatten()
    if idx.numel() == 0:
        return idx, idx
    if bool((q_len[idx] == 1).all()):  # decode: vectorized
        new_run = torch.ones_like(idx, dtype=torch.bool)
        new_run[1:] = idx[1:] != idx[:-1] + 1
        run_id = torch.cumsum(new_run, 0) - 1
        run_start = torch.nonzero(new_run).flatten()
        pos = torch.arange(idx.numel()) - run_start[run_id]
        key = run_id * (idx.numel() + 1) + pos // capacity
        first = torch.ones_like(new_run)
        first[1:] = key[1:] != key[:-1]
        last = torch.ones_like(new_run)
        last[:-1] = first[1:]
        return idx[first], idx[last]
    firsts, lasts, tokens, prev = [], [], 0, -2
    for b, n in zip(idx.tolist(), q_len[idx].tolist()):
        if b == prev + 1 and tokens + n <= capacity:
            tokens += n
            lasts[-1] = b
        else:
            firsts.append(b)
            lasts.append(b)
            tokens = n
        prev = b
    return torch.tensor(firsts), torch.tensor(lasts)


def _build_plan(
    *,
    mode: str,
    prefix_kv_indptr,
    prefix_kv_indices: torch.Tensor,
    suffix_kv_indptr,
    suffix_kv_indices: torch.Tensor,
    request_group,
    qo_indptr,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    prefix_packing: PackingPolicy = "auto",
    max_kv_chunk: int | None = None,
    num_sms: int | None = None,
    config: CascadeLaunchConfig | None = None,
    workspace: CascadeWorkspace | None = None,
    slot_base: torch.Tensor | None = None,
) -> CascadePlan:
    suffix_offset = 0
    if slot_base is not None:
        # Both index tensors are views of one buffer, the prefix part first; the kernel gets the
        # buffer itself (a CUDA graph keeps the pointers of capture) and offsets.
        if prefix_kv_indices.numel() and prefix_kv_indices.data_ptr() != slot_base.data_ptr():
            raise CascadePlanError("with slot_base, prefix_kv_indices must start at slot_base")
        suffix_offset = prefix_kv_indices.numel()
        if suffix_kv_indices.numel():  # after the prefix part, maybe at an aligned offset
            gap, rest = divmod(suffix_kv_indices.data_ptr() - slot_base.data_ptr(), slot_base.element_size())
            if rest or gap < suffix_offset or gap - suffix_offset >= ALIGN:
                raise CascadePlanError("with slot_base, suffix_kv_indices must follow prefix_kv_indices")
            suffix_offset = gap
    step = read_step_batch(
        prefix_kv_indptr=prefix_kv_indptr, prefix_kv_indices=prefix_kv_indices,
        suffix_kv_indptr=suffix_kv_indptr, suffix_kv_indices=suffix_kv_indices,
        request_group=request_group, qo_indptr=qo_indptr, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim,
    )
    if prefix_packing not in ("auto", "always", "never"):
        raise CascadePlanError(f"prefix_packing must be auto, always or never, not {prefix_packing!r}")
    if max_kv_chunk is not None and max_kv_chunk <= 0:
        raise CascadePlanError(f"max_kv_chunk must be positive, got {max_kv_chunk}")
    device, group, qo = step.device, step.request_group, step.qo_indptr
    p_indptr, s_indptr = step.prefix_kv_indptr, step.suffix_kv_indptr
    prefix_len, suffix_len, q_len = step.prefix_len, step.suffix_len, step.q_len
    num_groups, num_tokens = step.num_groups, step.num_tokens
    hpk = num_q_heads // num_kv_heads

    # Per-group arrays get one padding entry at index G, which requests without a group use.
    pad = torch.zeros(1, dtype=torch.int64)
    gidx = torch.where(group >= 0, group, num_groups)
    req_prefix_len = torch.cat([prefix_len, pad])[gidx]
    req_prefix_start = torch.cat([p_indptr[:-1], pad])[gidx]
    members = torch.bincount(gidx, minlength=num_groups + 1)[:num_groups]
    group_tokens = torch.zeros(num_groups + 1, dtype=torch.int64).index_add_(0, gidx, q_len)
    group_tokens = group_tokens[:num_groups]

    # ---- which groups run their prefix as packed GROUP tiles -------------------------------
    if workspace is not None:
        if config is not None and config != workspace.config:
            raise CascadePlanError("a workspace plan uses the workspace's launch config")
        config = workspace.config
        if num_tokens > workspace.max_tokens:
            raise CascadePlanError(
                f"{num_tokens} query tokens exceed the workspace's {workspace.max_tokens}"
            )
        num_sms = workspace.num_sms
    if config is None:
        max_group_rows = int(group_tokens.max()) * hpk if num_groups else 0
        config = default_launch_config(mode, hpk, max_group_rows, head_dim)
    if min(config.block_m_group, config.block_m_request) < hpk:
        raise CascadePlanError(f"tiles of {config} cannot hold the {hpk} query heads of a KV head")
    tok_per_group_tile = config.block_m_group // hpk
    tok_per_req_tile = config.block_m_request // hpk
    if prefix_packing == "always":
        packed = (prefix_len > 0) & (group_tokens > 0)
    elif prefix_packing == "never":
        packed = torch.zeros(num_groups, dtype=torch.bool)
    else:  # pack when one member's rows alone would not fill a GROUP tile
        packed = (prefix_len > 0) & (members >= 2) & (
            group_tokens * hpk < members * config.block_m_group
        )
    req_packed = torch.cat([packed, torch.zeros(1, dtype=torch.bool)])[gidx]
    req_stream_prefix = torch.where(req_packed, 0, req_prefix_len)  # prefix a REQUEST tile reads

    # ---- GROUP tiles: token ranges of group_q_tokens ---------------------------------------
    group_q_indptr = torch.cat([pad, torch.cumsum(torch.where(packed, group_tokens, 0), 0)])
    g_tiles = torch.where(packed, _cdiv(group_tokens, tok_per_group_tile), 0)
    g_owner, g_m = _segment_arange(g_tiles)
    g_t0 = g_m * tok_per_group_tile
    g_fields = [
        torch.zeros_like(g_owner),  # lo
        prefix_len[g_owner],  # hi
        group_q_indptr[g_owner] + g_t0,  # token start (into group_q_tokens)
        torch.minimum(group_tokens[g_owner] - g_t0, torch.full_like(g_t0, tok_per_group_tile)),
        p_indptr[:-1][g_owner],  # prefix start
        prefix_len[g_owner],  # prefix length
        torch.zeros_like(g_owner),  # suffix start
    ]

    # ---- REQUEST tiles ---------------------------------------------------------------------
    # a) requests that stream a prefix, or have more tokens than a tile: tiles of their own
    alone = (q_len > 0) & ((req_stream_prefix > 0) | (q_len > tok_per_req_tile))
    a_tiles = torch.where(alone, _cdiv(q_len, tok_per_req_tile), 0)
    a_owner, a_m = _segment_arange(a_tiles)
    a_t0 = a_m * tok_per_req_tile
    a_ntok = torch.minimum(q_len[a_owner] - a_t0, torch.full_like(a_t0, tok_per_req_tile))
    a_prefix = req_stream_prefix[a_owner]
    # a causal tile needs no key after its last query token
    a_hi = a_prefix + suffix_len[a_owner] - q_len[a_owner] + a_t0 + a_ntok
    # b) runs of consecutive suffix-only requests share a tile, suffixes back to back
    first, last = _runs_of_requests((q_len > 0) & ~alone, q_len, tok_per_req_tile)
    r_fields = [
        torch.zeros(a_owner.numel() + first.numel(), dtype=torch.int64),  # lo
        torch.cat([a_hi, s_indptr[last + 1] - s_indptr[first]]),  # hi
        torch.cat([qo[:-1][a_owner] + a_t0, qo[first]]),  # token start
        torch.cat([a_ntok, qo[last + 1] - qo[first]]),  # tokens
        torch.cat([req_prefix_start[a_owner], torch.zeros_like(first)]),  # prefix start
        torch.cat([a_prefix, torch.zeros_like(first)]),  # prefix length streamed
        torch.cat([s_indptr[:-1][a_owner], s_indptr[:-1][first]]),  # suffix start
    ]
    num_g = g_owner.numel()
    kind = torch.cat(
        [torch.full((num_g,), KIND_GROUP), torch.full((r_fields[0].numel(),), KIND_REQUEST)]
    )
    fields = [torch.cat([g, r]) for g, r in zip(g_fields, r_fields)]
    lo, hi = fields[0], fields[1]
    length = (hi - lo).clamp(min=0)  # 0: nothing to attend (no prefix, empty suffix)

    # ---- split long tiles into pieces ------------------------------------------------------
    if max_kv_chunk is None:
        if num_sms is None:
            num_sms = (
                torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda"
                else DEFAULT_NUM_SMS
            )
        work = int(length.sum()) * num_kv_heads
        chunk = max(MIN_SPLIT_CHUNK, _cdiv(work, num_sms * PROGRAMS_PER_SM_TARGET))
    else:
        chunk = int(max_kv_chunk)
    while True:
        layout = _lay_out_pieces(
            chunk, exact=max_kv_chunk is not None, kind=kind, fields=fields, lo=lo, hi=hi,
            length=length, config=config, num_g=g_owner.numel(), g_owner=g_owner,
            num_groups=num_groups, num_tokens=num_tokens, q_len=q_len, req_packed=req_packed,
            gidx=gidx,
        )
        if workspace is None or (
            layout.items.shape[0] <= workspace.max_items
            and layout.total_partials <= workspace.max_partials
        ):
            break
        longest = int(length.max()) if length.numel() else 0
        if chunk >= longest:  # no split left to undo: the capacities are too small
            raise CascadePlanError(
                f"the plan needs {layout.items.shape[0]} items / {layout.total_partials} partials "
                f"but the workspace holds {workspace.max_items} / {workspace.max_partials}"
            )
        chunk *= 2  # fewer, longer pieces: fewer items and partials

    items, partial_start, grp_pieces, num_partials = (
        layout.items, layout.partial_start, layout.grp_pieces, layout.num_partials
    )
    tok_req, tok_local = _segment_arange(q_len)
    token_suffix_start = s_indptr[:-1][tok_req] + suffix_offset
    token_qpos = suffix_len[tok_req] - q_len[tok_req] + tok_local
    if suffix_offset:
        items[:, F_SUFFIX_START] += suffix_offset
    # GROUP tiles' query tokens: packed groups' member tokens, by group, in token order
    sel = req_packed[tok_req]
    group_q_tokens = torch.arange(num_tokens)[sel][torch.argsort(gidx[tok_req][sel], stable=True)]

    # ---- one host-to-device copy of all int32 metadata ------------------------------------
    host = [
        items.reshape(-1), group_q_tokens, partial_start, partial_start + grp_pieces,
        num_partials, token_suffix_start, token_qpos,
    ]
    common = dict(
        mode=mode, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        num_tokens=num_tokens, num_requests=step.num_requests, num_groups=num_groups,
        num_items=items.shape[0], config=config,
        prefix_kv_indices=prefix_kv_indices if slot_base is None else slot_base,
        suffix_kv_indices=suffix_kv_indices if slot_base is None else slot_base,
        packed_groups=packed,
        group_num_splits=layout.group_num_splits[:num_groups],
    )
    if workspace is not None:
        return _write_into(workspace, host, items.shape[0], common)
    packed_host = pack_aligned(host)
    if device.type == "cuda":
        packed_host = packed_host.pin_memory()
    dev = split_aligned(packed_host.to(device, non_blocking=True), [t.numel() for t in host])
    ws_rows = max(layout.total_partials, 1)
    return _plan(
        common, dev, needs_merge=layout.needs_merge,
        partial_out=torch.empty(ws_rows, num_q_heads, head_dim, dtype=torch.float32, device=device),
        partial_lse_base2=torch.empty(ws_rows, num_q_heads, dtype=torch.float32, device=device),
    )


def _plan(common: dict, arrays, **rest) -> CascadePlan:
    """The plan over its int32 device arrays, in the order `_build_plan` packs them."""
    return CascadePlan(
        **common,
        items=arrays[0].view(-1, ITEM_FIELDS),
        group_q_tokens=arrays[1],
        token_partial_start=arrays[2],
        token_own_partial_start=arrays[3],
        token_num_partials=arrays[4],
        token_suffix_start=arrays[5],
        token_qpos=arrays[6],
        **rest,
    )


@dataclass(frozen=True)
class _Layout:
    items: torch.Tensor
    partial_start: torch.Tensor
    grp_pieces: torch.Tensor
    num_partials: torch.Tensor
    total_partials: int
    needs_merge: bool
    group_num_splits: torch.Tensor


def _lay_out_pieces(chunk, *, exact, kind, fields, lo, hi, length, config, num_g, g_owner,
                    num_groups, num_tokens, q_len, req_packed, gidx) -> _Layout:
    """Cut tiles into pieces of about `chunk` KV positions (exactly `chunk` when `exact`), order
    them costliest first, and assign every token its partial rows."""
    if exact:
        piece_len = torch.full_like(length, chunk)
        pieces = _cdiv(length, piece_len)
    else:
        pieces = _cdiv(length, chunk)
        # even pieces, borders on multiples of the larger block_n
        block = max(config.block_n_group, config.block_n_request)
        piece_len = _cdiv(_cdiv(length, pieces.clamp(min=1)), block) * block
        pieces = _cdiv(length, piece_len.clamp(min=1))

    # expand pieces into items, costliest first (longest-processing-time order)
    parent, piece = _segment_arange(pieces)
    p_lo = lo[parent] + piece * piece_len[parent]
    p_hi = torch.minimum(hi[parent], p_lo + piece_len[parent])
    rows = torch.where(kind[parent] == KIND_GROUP, config.block_m_group, config.block_m_request)
    order = torch.argsort((p_hi - p_lo) * rows, descending=True, stable=True)
    items = torch.stack(
        [kind[parent], p_lo, p_hi, piece] + [f[parent] for f in fields[2:]]
        + [torch.zeros_like(p_lo)],
        dim=1,
    )[order]

    # per-token bookkeeping
    tok_req, _ = _segment_arange(q_len)
    group_num_splits = torch.zeros(num_groups + 1, dtype=torch.int64)
    group_num_splits[g_owner] = pieces[:num_g]
    grp_pieces = torch.where(req_packed[tok_req], group_num_splits[gidx[tok_req]], 0)
    own_pieces = torch.zeros(num_tokens, dtype=torch.int64)
    r_start, r_ntok = fields[2][num_g:], fields[3][num_g:]
    tile_of, tile_pos = _segment_arange(r_ntok)  # REQUEST tiles partition the tokens
    own_pieces[r_start[tile_of] + tile_pos] = pieces[num_g:][tile_of]
    num_partials = grp_pieces + own_pieces
    partial_start = torch.cumsum(num_partials, 0) - num_partials
    needs_merge = bool((num_partials != 1).any())
    total_partials = int(num_partials.sum()) if needs_merge else 0
    return _Layout(items, partial_start, grp_pieces, num_partials, total_partials, needs_merge,
                   group_num_splits)


def _write_into(ws: CascadeWorkspace, host: list[torch.Tensor], num_items: int, common) -> CascadePlan:
    """Stage the plan's int32 arrays into the workspace's fixed regions (one copy)."""
    turn = ws._turn
    ws._turn = 1 - turn
    staging, copied = ws._staging[turn], ws._copied[turn]
    if copied is not None:
        copied.synchronize()  # its previous copy has left: safe to overwrite
    offset = 0
    for region, values in zip(ws.sizes, host + [torch.tensor([num_items])]):
        n = values.numel()
        staging[offset:offset + n].copy_(values.reshape(-1))
        offset += aligned(region)
    ws.meta.copy_(staging, non_blocking=True)
    if ws.device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        ws._copied[turn] = event
    v = ws.views
    return _plan(
        common, v,
        needs_merge=True,  # the merge skips tokens whose one partial went straight to Out
        partial_out=ws.partial_out,
        partial_lse_base2=ws.partial_lse_base2,
        num_items_dev=v[7],
        grid_items=ws.max_items,
    )
