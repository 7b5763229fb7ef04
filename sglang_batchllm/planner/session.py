"""A planning session: the plan of a live batch, owned by one scheduler process.

`build_plan` plans a fixed batch; a scheduler sees requests arrive while others run and
finish. The session keeps the plan *live*:

- every request belongs to one group with a **stable id** (ids only grow; nothing renumbers);
- a batch that arrives at once is planned as one (`add` runs the planner over it); a request
  whose prompt starts with the prefix of a live group **joins** that group instead, so late
  arrivals never regroup or move a request that is already running;
- groups move through `WAITING -> PREFILLING -> CACHED -> DONE` driven by lifecycle calls
  (`admitted`, `prefix_cached`, `finished`, `retracted`, `aborted`); the calls return the
  pin/unpin decisions (`Pin`, `Unpin`) the adapter applies to the radix cache;
- finished requests and done groups are forgotten, so memory stays flat on a long-running
  server.

Groups with no shared prefix (`prefix_len == 0`) hold one request and are never pinned.
Nested plans (levels > 1) run each request in its deepest group, whose prefix includes its
ancestors' (pinning a radix node pins its ancestors too).

Deterministic: decisions depend only on the calls and their order (no clocks, no hashing of
str, no randomness), so every TP rank that makes the same calls reaches the same state.
Pure Python: no torch, no SGLang.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .build import build_plan
from .inputs import PlanInputError, PlannerConfig, PlanRequest
from .tokens import TOKEN_BYTES, TokenIds

# Live groups are found by the first JOIN_KEY_TOKENS tokens of their prefix (or the whole
# prefix when shorter): a bucket lookup, then an exact comparison of the prefix bytes.
JOIN_KEY_TOKENS = 16


class GroupState(enum.Enum):
    WAITING = "waiting"  # nothing admitted yet
    PREFILLING = "prefilling"  # the leader is admitted; the prefix is being computed
    CACHED = "cached"  # the prefix is in the radix cache and pinned; members may run
    DONE = "done"  # every member finished; forgotten


@dataclass(frozen=True)
class Pin:
    """Lock the first `prefix_len` tokens of `prefix_ids` in the radix cache for group `gid`."""

    gid: int
    prefix_ids: TokenIds
    prefix_len: int


@dataclass(frozen=True)
class Unpin:
    """Release group `gid`'s pin: its last member finished (or left)."""

    gid: int


Event = Pin | Unpin


@dataclass
class Member:
    rid: str
    prompt_len: int
    max_new_tokens: int
    gid: int


@dataclass
class LiveGroup:
    gid: int
    prefix_ids: TokenIds  # empty for an unshared request
    pending: list[str] = field(default_factory=list)  # not yet admitted, in run order
    running: set[str] = field(default_factory=set)  # admitted, not finished
    state: GroupState = GroupState.WAITING
    leader: str | None = None  # the member whose prefill computes the prefix
    pinned: bool = False
    # members that joined after the group was opened: the group's memory reservation was made
    # without them, so the policy admits them only from memory nobody has claimed
    late: set[str] = field(default_factory=set)
    prefix_computations: int = 0  # leaders elected; > 1 means the prefix was computed again

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def is_shared(self) -> bool:
        return self.prefix_len > 0


class PlanningSession:
    """The live plan. See the module docstring for the rules; `check_invariants` states them."""

    def __init__(self, config: PlannerConfig = PlannerConfig(), max_prefix_tokens: int | None = None) -> None:
        """max_prefix_tokens: a shared prefix longer than this is not pinned; its requests run
        as unshared ones (a prefix that alone fills most of the KV pool cannot be held for a
        group's lifetime without starving everything else)."""
        self.config = config
        self.max_prefix_tokens = max_prefix_tokens
        self._groups: dict[int, LiveGroup] = {}  # live groups in run order (insertion order)
        self._members: dict[str, Member] = {}
        self._join_index: dict[bytes, list[int]] = {}  # join key -> gids of live shared groups
        self._join_key_lens: set[int] = set()  # key lengths in use (prefixes shorter than the key)
        self._next_gid = itertools.count()
        self.pending = 0  # requests known and not admitted (kept in step with the groups' lists)
        self.batches = 0
        self.last_plan = None  # PlanMetrics of the last batch the planner ran over
        self.recomputations = 0  # prefix computed again after its first leader's KV was lost
        self.retractions = 0

    # ---- intake -------------------------------------------------------------------------
    def add(self, requests: Iterable[PlanRequest]) -> list[int]:
        """Plan newly arrived requests as one batch; returns the gids of the groups created.

        A request that extends the prefix of a live shared group joins it (appended to its
        pending members); the others are planned together by the global planner and form new
        groups. All-or-nothing: a duplicate or already known id rejects the whole batch.
        """
        batch = list(requests)
        seen: set[str] = set()
        for req in batch:
            if not isinstance(req, PlanRequest):
                raise PlanInputError(f"expected PlanRequest, got {type(req).__name__}")
            if req.rid in self._members or req.rid in seen:
                raise PlanInputError(f"request id {req.rid!r} is already in the session; ids must be unique")
            seen.add(req.rid)
        self.batches += 1
        fresh = []
        for req in batch:
            gid = self._live_group_for(req)
            if gid is None:
                fresh.append(req)
            else:
                self._enroll(req, gid)
        if not fresh:
            return []
        plan = build_plan(fresh, self.config)
        self.last_plan = plan.metrics
        created = []
        for group in plan.groups:
            if not group.members:
                continue  # a pure parent of nested groups: its requests live in the children
            if group.is_shared and (self.max_prefix_tokens is None or group.prefix_len <= self.max_prefix_tokens):
                created.append(self._open_group(group.prefix_ids, [plan.request(rid) for rid in group.members]))
            else:  # requests that share nothing worth a group: one group each
                for rid in group.members:
                    created.append(self._open_group(TokenIds(), [plan.request(rid)]))
        return created

    def add_unshared(self, requests: Iterable[PlanRequest]) -> list[int]:
        """Requests that must not share a prefix (multimodal, input embeddings, a cache
        namespace): one group each, never joined, never pinned."""
        batch = list(requests)
        for req in batch:
            if req.rid in self._members:
                raise PlanInputError(f"request id {req.rid!r} is already in the session; ids must be unique")
        return [self._open_group(TokenIds(), [req]) for req in batch]

    def _open_group(self, prefix_ids: TokenIds, members: list[PlanRequest]) -> int:
        gid = next(self._next_gid)
        self._groups[gid] = LiveGroup(gid, prefix_ids)
        if prefix_ids:
            self._join_index.setdefault(self._join_key(prefix_ids.packed, len(prefix_ids)), []).append(gid)
            if len(prefix_ids) < JOIN_KEY_TOKENS:
                self._join_key_lens.add(len(prefix_ids))
        for req in members:
            self._enroll(req, gid)
        return gid

    def _enroll(self, req: PlanRequest, gid: int) -> None:
        self._members[req.rid] = Member(req.rid, req.prompt_len, req.max_new_tokens, gid)
        group = self._groups[gid]
        group.pending.append(req.rid)
        self.pending += 1
        if group.state is not GroupState.WAITING:
            group.late.add(req.rid)

    @staticmethod
    def _join_key(packed: bytes, prefix_len: int) -> bytes:
        return packed[: min(prefix_len, JOIN_KEY_TOKENS) * TOKEN_BYTES]

    def _live_group_for(self, req: PlanRequest) -> int | None:
        """The live shared group with the longest prefix that `req` extends (prompt strictly
        longer than the prefix, so the member has a token of its own to compute)."""
        packed = req.input_ids.packed
        best, best_len = None, 0
        for key_len in sorted(self._join_key_lens | {JOIN_KEY_TOKENS}):
            for gid in self._join_index.get(packed[: key_len * TOKEN_BYTES], ()):
                group = self._groups[gid]
                plen = group.prefix_len
                if plen > best_len and req.prompt_len > plen and packed[: plen * TOKEN_BYTES] == group.prefix_ids.packed:
                    best, best_len = gid, plen
        return best

    # ---- views for the policy --------------------------------------------------------------
    def groups(self) -> Iterator[LiveGroup]:
        """Live groups in run order (the plan's decode-first order, batch after batch)."""
        return iter(self._groups.values())

    def group(self, gid: int) -> LiveGroup:
        return self._groups[gid]

    def member(self, rid: str) -> Member | None:
        return self._members.get(rid)

    def group_of(self, rid: str) -> LiveGroup | None:
        m = self._members.get(rid)
        return None if m is None else self._groups[m.gid]

    def __contains__(self, rid: str) -> bool:
        return rid in self._members

    def __len__(self) -> int:
        return len(self._members)

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def live_shared_groups(self) -> int:
        return sum(1 for g in self._groups.values() if g.is_shared and g.state is not GroupState.WAITING)

    # ---- lifecycle ----------------------------------------------------------------------
    def admitted(self, rid: str) -> list[Event]:
        """`rid` was put in a prefill batch. The first admitted member of a waiting shared
        group is its leader: the group starts computing its prefix."""
        group = self._require(rid)
        group.pending.remove(rid)
        self.pending -= 1
        group.late.discard(rid)
        group.running.add(rid)
        if group.state is GroupState.WAITING:
            if group.is_shared:
                group.state, group.leader = GroupState.PREFILLING, rid
                group.prefix_computations += 1
            else:
                group.state = GroupState.CACHED  # nothing to compute or pin
        return []

    def prefix_cached(self, gid: int) -> list[Event]:
        """The group's prefix is now in the radix cache: pin it; members may be admitted."""
        group = self._groups[gid]
        if group.state is not GroupState.PREFILLING:
            raise ValueError(f"group {gid} is {group.state.value}, not prefilling")
        group.state, group.pinned = GroupState.CACHED, True
        return [Pin(gid, group.prefix_ids, group.prefix_len)]

    def leader_lost(self, gid: int) -> list[Event]:
        """The leader left before the prefix was cached (finished, aborted, or its KV was
        evicted): the group waits for a new leader, whose prefill computes the prefix again."""
        group = self._groups[gid]
        if group.state is GroupState.PREFILLING:
            group.state, group.leader = GroupState.WAITING, None
            self.recomputations += 1
        return self._maybe_done(group)

    def finished(self, rid: str) -> list[Event]:
        """`rid` finished (or was aborted while running); it is forgotten."""
        group = self._require(rid)
        group.running.discard(rid)
        del self._members[rid]
        # A leader that finishes before its prefix was seen cached leaves the group PREFILLING:
        # its KV went to the tree, so the adapter's next check pins it, or calls leader_lost.
        return self._maybe_done(group)

    def retracted(self, rid: str) -> list[Event]:
        """SGLang took `rid` out of the decode batch to free memory; it will be admitted again.
        Its group's pin survives (the group is not done while `rid` is pending)."""
        group = self._require(rid)
        group.running.discard(rid)
        group.pending.insert(0, rid)
        self.pending += 1
        self.retractions += 1
        if not group.is_shared:
            group.state = GroupState.WAITING  # offered again like any unshared request
        return []

    def aborted(self, rid: str) -> list[Event]:
        """`rid` left before it was admitted (client gone, abort_request)."""
        group = self._require(rid)
        if rid in group.pending:
            group.pending.remove(rid)
            self.pending -= 1
        group.late.discard(rid)
        group.running.discard(rid)
        del self._members[rid]
        return self._maybe_done(group)

    def _maybe_done(self, group: LiveGroup) -> list[Event]:
        if group.pending or group.running:
            return []
        group.state = GroupState.DONE
        del self._groups[group.gid]
        if group.is_shared:
            key = self._join_key(group.prefix_ids.packed, group.prefix_len)
            bucket = self._join_index[key]
            bucket.remove(group.gid)
            if not bucket:
                del self._join_index[key]
        return [Unpin(group.gid)] if group.pinned else []

    def _require(self, rid: str) -> LiveGroup:
        m = self._members.get(rid)
        if m is None:
            raise KeyError(f"request {rid!r} is not in the planning session")
        return self._groups[m.gid]

    # ---- invariants ---------------------------------------------------------------------
    def check_invariants(self) -> None:
        seen: dict[str, int] = {}
        for gid, g in self._groups.items():
            assert g.gid == gid
            assert g.state is not GroupState.DONE, f"done group {gid} still live"
            assert g.pending or g.running, f"group {gid} has no members but is live"
            assert not (set(g.pending) & g.running), f"group {gid}: a member is both pending and running"
            assert len(set(g.pending)) == len(g.pending), f"group {gid}: duplicate pending member"
            assert g.late <= set(g.pending), f"group {gid}: a late member is not pending"
            for rid in (*g.pending, *g.running):
                assert rid not in seen, f"request {rid} in groups {seen[rid]} and {gid}"
                seen[rid] = gid
                assert self._members[rid].gid == gid
            assert g.pinned == (g.state is GroupState.CACHED and g.is_shared), f"group {gid}: pin state"
            if g.state is GroupState.WAITING:
                assert not g.running or not g.is_shared, f"waiting group {gid} has running members"
            if g.state is GroupState.PREFILLING:
                assert g.is_shared and g.leader is not None
            if not g.is_shared:
                assert len(g.pending) + len(g.running) == 1, f"unshared group {gid} holds more than one request"
        assert set(seen) == set(self._members), "every known request is in exactly one live group"
        assert self.pending == sum(len(g.pending) for g in self._groups.values()), "pending count out of step"
        indexed = sorted(gid for bucket in self._join_index.values() for gid in bucket)
        assert indexed == sorted(gid for gid, g in self._groups.items() if g.is_shared), "join index out of date"
