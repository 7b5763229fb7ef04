"""A planning session: the plan of a live batch, owned by one scheduler process.

`build_plan` plans a fixed batch; a scheduler sees requests arrive while others run and
finish. The session keeps the plan *live*:

- every request belongs to one group with a **stable id** (ids only grow; nothing renumbers);
- a batch that arrives at once is planned as one (`add` runs the planner over it); a request
  whose prompt starts with the prefix of a live group **joins** that group instead, so late
  arrivals never regroup or move a request that is already running;
- requests that trickle in one by one **gather**: a request that shares a prefix worth a group
  (`min_prefix_tokens`, page-aligned, as the planner decides) with a request that is known but
  not admitted, in a group nothing of which is admitted (`WAITING`), forms a new group with it
  when that saves more prefill than joining the best live group (the planner's level-1 saving,
  applied one arrival at a time; see `_place`). Only members of `WAITING` groups move, so a
  group's composition is frozen from the moment its leader is admitted;
- groups move through `WAITING -> PREFILLING -> CACHED -> DONE` driven by lifecycle calls
  (`admitted`, `prefix_cached`, `finished`, `retracted`, `aborted`); the calls return the
  pin/unpin decisions (`Pin`, `Unpin`) the adapter applies to the radix cache;
- finished requests and done groups are forgotten, so memory stays flat on a long-running
  server.

Groups with no shared prefix (`prefix_len == 0`) hold one request and are never pinned.
Nested plans (levels > 1) run each request in its deepest group, whose prefix includes its
ancestors' (pinning a radix node pins its ancestors too).

Deterministic: decisions depend only on the calls and their order (no hashing of str, no
randomness); time is an input (`add(..., now=)`, a clock value the caller passes, the same on
every TP rank), never read here, so every TP rank that makes the same calls reaches the same
state.
Pure Python: no torch, no SGLang.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .build import build_plan
from .inputs import PlanInputError, PlannerConfig, PlanRequest
from .tokens import TOKEN_BYTES, TokenIds, common_prefix_len

# Live groups are found by the first JOIN_KEY_TOKENS tokens of their prefix (or the whole
# prefix when shorter): a bucket lookup, then an exact comparison of the prefix bytes.
JOIN_KEY_TOKENS = 16

# Known-but-waiting requests are scanned for a shared prefix per arrival; the scan looks at the
# most recent ones of the arrival's bucket only, so an arrival costs O(1) compares however long
# the queue (a request that waited past this many newer arrivals with the same first tokens has
# had its chance to gather).
GATHER_SCAN_LIMIT = 256


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
    arrived: float = 0.0  # the caller's clock value when the request was added
    ids: TokenIds | None = None  # its prompt, kept only while it may still gather (waiting)


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
    born: float = 0.0  # arrival of its earliest member: the gather hold is measured from it
    shareable: bool = True  # False for add_unshared requests: never gathered, never joined
    gathered: bool = False  # formed (or grown) by trickle arrivals gathering, not by a batch plan

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
        # first tokens -> rids (insertion-ordered) of pending members of WAITING groups that may gather
        self._waiting_index: dict[bytes, dict[str, None]] = {}
        self._next_gid = itertools.count()
        self.pending = 0  # requests known and not admitted (kept in step with the groups' lists)
        self.batches = 0
        self.last_plan = None  # PlanMetrics of the last batch the planner ran over
        self.recomputations = 0  # prefix computed again after its first leader's KV was lost
        self.retractions = 0

    # ---- intake -------------------------------------------------------------------------
    def add(self, requests: Iterable[PlanRequest], now: float = 0.0) -> list[int]:
        """Plan newly arrived requests as one batch; returns the gids of the groups created.

        A request that extends the prefix of a live shared group joins it (appended to its
        pending members), unless gathering with a waiting request saves more (`_place`); the
        others are planned together by the global planner and form new groups, and the ones
        the planner leaves alone try to gather with waiting requests. `now` is the caller's
        clock value for this arrival (the gather hold is measured from it). All-or-nothing: a
        duplicate or already known id rejects the whole batch.
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
        created: list[int] = []
        fresh = []
        for req in batch:
            if self._live_group_for(req) is None:
                fresh.append(req)
            else:
                created += self._place(req, now)
        if not fresh:
            return created
        plan = build_plan(fresh, self.config)
        self.last_plan = plan.metrics
        for group in plan.groups:
            if not group.members:
                continue  # a pure parent of nested groups: its requests live in the children
            if group.is_shared and self._pinnable(group.prefix_len):
                created.append(self._open_group(group.prefix_ids, [plan.request(rid) for rid in group.members], now))
            else:  # requests that share nothing worth a group in this batch: gather or stand alone
                for rid in group.members:
                    created += self._place(plan.request(rid), now)
        return created

    def add_unshared(self, requests: Iterable[PlanRequest], now: float = 0.0) -> list[int]:
        """Requests that must not share a prefix (multimodal, input embeddings, a cache
        namespace): one group each, never joined, never pinned, never gathered."""
        batch = list(requests)
        for req in batch:
            if req.rid in self._members:
                raise PlanInputError(f"request id {req.rid!r} is already in the session; ids must be unique")
        return [self._open_group(TokenIds(), [req], now, shareable=False) for req in batch]

    def _pinnable(self, prefix_len: int) -> bool:
        return self.max_prefix_tokens is None or prefix_len <= self.max_prefix_tokens

    def _open_group(self, prefix_ids: TokenIds, members: list[PlanRequest], now: float,
                    shareable: bool = True) -> int:
        gid = next(self._next_gid)
        self._groups[gid] = LiveGroup(gid, prefix_ids, born=now, shareable=shareable)
        if prefix_ids:
            self._index_group(gid, prefix_ids)
        for req in members:
            self._enroll(req, gid, now)
        return gid

    def _index_group(self, gid: int, prefix_ids: TokenIds) -> None:
        self._join_index.setdefault(self._join_key(prefix_ids.packed, len(prefix_ids)), []).append(gid)
        if len(prefix_ids) < JOIN_KEY_TOKENS:
            self._join_key_lens.add(len(prefix_ids))

    def _unindex_group(self, group: LiveGroup) -> None:
        key = self._join_key(group.prefix_ids.packed, group.prefix_len)
        bucket = self._join_index[key]
        bucket.remove(group.gid)
        if not bucket:
            del self._join_index[key]

    def _enroll(self, req: PlanRequest, gid: int, now: float) -> None:
        group = self._groups[gid]
        m = Member(req.rid, req.prompt_len, req.max_new_tokens, gid, arrived=now)
        self._members[req.rid] = m
        group.pending.append(req.rid)
        self.pending += 1
        if group.state is not GroupState.WAITING:
            group.late.add(req.rid)
        elif group.shareable:
            self._index_waiting(m, req.input_ids)

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

    # ---- gathering trickle arrivals ---------------------------------------------------------
    @property
    def _min_share(self) -> int:
        """The shortest prefix worth a group: the planner's rule (`GroupSolver.share`)."""
        page = self.config.page_size
        return max(self.config.min_prefix_tokens, page, 1)

    def _gather_key_len(self) -> int:
        # two prompts sharing a prefix worth a group share at least their first _min_share tokens
        return min(JOIN_KEY_TOKENS, self._min_share)

    def _index_waiting(self, m: Member, ids: TokenIds) -> None:
        k = self._gather_key_len()
        if len(ids) <= k:
            return  # too short to share a prefix worth a group and keep a token of its own
        m.ids = ids
        self._waiting_index.setdefault(ids.packed[: k * TOKEN_BYTES], {})[m.rid] = None

    def _unindex_waiting(self, m: Member) -> None:
        if m.ids is None:
            return
        key = m.ids.packed[: self._gather_key_len() * TOKEN_BYTES]
        bucket = self._waiting_index.get(key)
        if bucket is not None:
            bucket.pop(m.rid, None)
            if not bucket:
                del self._waiting_index[key]
        m.ids = None

    def _share(self, a: TokenIds, b: TokenIds) -> int:
        """Tokens two prompts could share as a group prefix: their common prefix, cut to the page
        size, each keeping at least one token of its own; 0 when that is not worth a group."""
        limit = min(len(a), len(b)) - 1
        n = common_prefix_len(a.packed, 0, b.packed, 0, limit)
        n -= n % self.config.page_size
        return n if n >= self._min_share and self._pinnable(n) else 0

    def _place(self, req: PlanRequest, now: float) -> list[int]:
        """Put one request that the batch plan left alone where it saves most prefill.

        Options, scored by the planner's level-1 saving (a group of k members with prefix p
        saves (k - 1) p):
        - join the live shared group with the longest prefix `p` the request extends: +p;
        - gather with a waiting member `m` of a WAITING group (prefix q, or 0 when `m` is
          alone) into a new group on their common prefix L: +L, and m's old group loses one
          member's saving q, so +(L - q).
        Strictly better gathering wins; ties keep the join (nothing moves). Returns the gids
        of the groups created."""
        join = self._live_group_for(req)
        best_gain = self._groups[join].prefix_len if join is not None else 0
        partner, share = None, 0
        k = self._gather_key_len()
        bucket = self._waiting_index.get(req.input_ids.packed[: k * TOKEN_BYTES]) if req.prompt_len > k else None
        if bucket:
            stale = []
            for rid in list(reversed(bucket))[:GATHER_SCAN_LIMIT]:  # newest first
                m = self._members.get(rid)
                g = None if m is None else self._groups[m.gid]
                if g is None or g.state is not GroupState.WAITING or m.ids is None:
                    stale.append(rid)  # admitted, gone, or its group opened: no longer gathers
                    continue
                L = self._share(req.input_ids, m.ids)
                if L - g.prefix_len > best_gain:
                    partner, share, best_gain = m, L, L - g.prefix_len
            for rid in stale:
                m = self._members.get(rid)
                if m is not None:
                    self._unindex_waiting(m)
                else:
                    bucket.pop(rid, None)
            if not bucket:
                self._waiting_index.pop(req.input_ids.packed[: k * TOKEN_BYTES], None)
        if partner is not None:
            return [self._gather(partner, req, share, now)]
        if join is not None:
            self._enroll(req, join, now)
            return []
        gid = self._open_group(TokenIds(), [req], now)
        return [gid]

    def _gather(self, partner: Member, req: PlanRequest, share: int, now: float) -> int:
        """A new group of `partner` (taken out of its WAITING group) and `req` on `share` tokens."""
        old = self._groups[partner.gid]
        assert old.state is GroupState.WAITING and not old.running, "only waiting groups give members away"
        old.pending.remove(partner.rid)
        self.pending -= 1
        if not old.pending:
            self._maybe_done(old)
        elif old.is_shared and len(old.pending) == 1:
            # one member left: a group of one saves nothing; it stands alone (and may gather again)
            self._unindex_group(old)
            old.prefix_ids = TokenIds()
        prefix = req.input_ids[:share]
        gid = next(self._next_gid)
        group = LiveGroup(gid, prefix, born=min(partner.arrived, now), gathered=True)
        self._groups[gid] = group
        self._index_group(gid, prefix)
        partner.gid = gid
        group.pending.append(partner.rid)
        self.pending += 1
        self._enroll(req, gid, now)
        return gid

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
        self._unindex_waiting(self._members[rid])
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
        self._unindex_waiting(self._members.pop(rid))
        return self._maybe_done(group)

    def _maybe_done(self, group: LiveGroup) -> list[Event]:
        if group.pending or group.running:
            return []
        group.state = GroupState.DONE
        del self._groups[group.gid]
        if group.is_shared:
            self._unindex_group(group)
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
