"""Group placement over data-parallel replicas: every group on one replica, loads balanced.

SGLang's data-parallel controller sends requests to replicas one by one (round robin or
shortest queue), which splits a prefix group over replicas and makes each compute the prefix
again. Placement works on whole groups instead:

- a group's **cost** is the work it puts on its replica: the prefill tokens it computes (its
  prefix once, plus every member's own tokens) and the decode tokens it may produce (the sum
  of the members' `max_new_tokens`);
- `place_groups` assigns a batch of groups to R replicas, never splitting one: LPT (longest
  processing time first: largest group first, each to the least-loaded replica), then a local
  search that moves or swaps single groups between the most- and a less-loaded replica while
  that lowers the pair's maximum. LPT alone is within 4/3 - 1/(3R) of the optimum; with many
  groups each small relative to the total it is within a fraction of a percent;
- `StickyPlacer` is the incremental form a live controller needs: a group's late members
  follow the replica the group went to, new groups go where the load is lowest, and a group
  is forgotten (its load released) when it is done, or when too many are remembered.

Deterministic: ties break on the replica index and the gid, never on input order, a clock or
a hash. Pure Python: no torch, no SGLang.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# The local search stops after this many moves per placed group (it always terminates, since
# every move lowers the sum of squared loads; the cap only bounds its time on odd inputs).
MAX_IMPROVE_MOVES_PER_GROUP = 4

# A StickyPlacer remembers at most this many groups; the least recently used is forgotten
# first (a controller that never hears of finished requests relies on this to stay bounded).
DEFAULT_MAX_REMEMBERED_GROUPS = 4096


@dataclass(frozen=True)
class GroupLoad:
    """The work of one group (or of the members that joined it late) on its replica."""

    gid: int
    prefill_tokens: int
    decode_tokens: int

    def __post_init__(self) -> None:
        if self.prefill_tokens < 0 or self.decode_tokens < 0:
            raise ValueError(f"group {self.gid}: token counts must be >= 0, got {self}")

    @property
    def cost(self) -> int:
        return self.prefill_tokens + self.decode_tokens


def group_load(gid: int, prefix_len: int, prompt_lens: Iterable[int], max_new_tokens: Iterable[int],
               prefix_cached: bool = False) -> GroupLoad:
    """The load of a group whose members have these prompt lengths and decode budgets: the
    prefix once (none when it is already cached on the replica), each member's own tokens."""
    prompts = list(prompt_lens)
    own = sum(p - prefix_len for p in prompts)
    return GroupLoad(gid, (0 if prefix_cached or not prompts else prefix_len) + own, sum(max_new_tokens))


@dataclass(frozen=True)
class Placement:
    """replica_of: gid -> replica index. loads: each replica's total, its starting load included."""

    replica_of: Mapping[int, int]
    loads: tuple[int, ...]

    @property
    def max_load(self) -> int:
        return max(self.loads)

    def groups_on(self, replica: int) -> tuple[int, ...]:
        return tuple(sorted(g for g, r in self.replica_of.items() if r == replica))


def lower_bound(groups: Sequence[GroupLoad], replicas: int, loads: Sequence[int] | None = None) -> float:
    """No placement has a smaller maximum load: the average, the largest group on the
    least-loaded replica, and the heaviest starting load (which nothing can lower)."""
    start = list(loads) if loads is not None else [0] * replicas
    average = (sum(g.cost for g in groups) + sum(start)) / replicas
    largest = max((g.cost for g in groups), default=0) + min(start)
    return max(average, largest, max(start))


def place_groups(groups: Sequence[GroupLoad], replicas: int, loads: Sequence[int] | None = None,
                 improve: bool = True) -> Placement:
    """Assign every group to one of `replicas`, balancing the total cost per replica.

    loads: the replicas' current loads (work already placed there), default all zero.
    improve: run the local search after LPT.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    start = [0] * replicas if loads is None else list(loads)
    if len(start) != replicas:
        raise ValueError(f"got {len(start)} loads for {replicas} replicas")
    if len({g.gid for g in groups}) != len(groups):
        raise ValueError("group ids must be unique within one placement")

    # LPT: largest first (ties: smaller gid first), each to the least-loaded replica (ties:
    # smaller index). The heap holds (load, replica), so its order is the tie rule.
    heap = [(load, r) for r, load in enumerate(start)]
    heapq.heapify(heap)
    replica_of: dict[int, int] = {}
    for g in sorted(groups, key=lambda g: (-g.cost, g.gid)):
        load, r = heapq.heappop(heap)
        replica_of[g.gid] = r
        heapq.heappush(heap, (load + g.cost, r))
    totals = start[:]
    for g in groups:
        totals[replica_of[g.gid]] += g.cost
    if improve and replicas > 1 and groups:
        _improve(groups, replica_of, totals, lower_bound(groups, replicas, start))
    return Placement(replica_of, tuple(totals))


def _improve(groups: Sequence[GroupLoad], replica_of: dict[int, int], totals: list[int], bound: float) -> None:
    """Local search: while the most-loaded replica `a` can give a group to a less-loaded
    replica `b` (or swap one of its groups for a smaller one of b's) so that the pair's maximum
    drops, do the best such exchange. Each exchange of delta with 0 < delta < load_a - load_b
    strictly lowers the sum of squared loads, so the search ends."""
    cost = {g.gid: g.cost for g in groups}
    members: list[list[tuple[int, int]]] = [[] for _ in totals]  # per replica: sorted (cost, gid)
    for gid, r in sorted(replica_of.items()):
        members[r].append((cost[gid], gid))
    for m in members:
        m.sort()
    for _ in range(MAX_IMPROVE_MOVES_PER_GROUP * len(groups)):
        a = max(range(len(totals)), key=lambda r: (totals[r], -r))
        if totals[a] <= bound:
            return
        for b in sorted(range(len(totals)), key=lambda r: (totals[r], r)):
            if totals[b] >= totals[a]:
                return  # no replica is lighter than a: nothing to gain
            exchange = _best_exchange(members[a], members[b], totals[a] - totals[b])
            if exchange is not None:
                break
        else:
            return
        give, take = exchange
        delta = give[0] - (take[0] if take else 0)
        members[a].remove(give)
        bisect.insort(members[b], give)
        replica_of[give[1]] = b
        if take:
            members[b].remove(take)
            bisect.insort(members[a], take)
            replica_of[take[1]] = a
        totals[a] -= delta
        totals[b] += delta


def _best_exchange(on_a: list[tuple[int, int]], on_b: list[tuple[int, int]], gap: int):
    """The move (a group of a -> b) or swap (a group of a <-> a smaller one of b) whose cost
    difference `delta` is closest to gap / 2 with 0 < delta < gap; None when there is none.
    Ties break on the smaller (cost, gid) pairs, so the choice is deterministic."""
    best, best_key = None, None
    half = gap / 2
    for give in on_a:
        candidates = [(give, None)] if 0 < give[0] < gap else []
        # swaps: b's groups with cost near give - half, and strictly smaller than give
        i = bisect.bisect_left(on_b, (give[0] - half, -1))
        for j in (i - 1, i):
            if 0 <= j < len(on_b) and 0 < give[0] - on_b[j][0] < gap:
                candidates.append((give, on_b[j]))
        for cand in candidates:
            delta = cand[0][0] - (cand[1][0] if cand[1] else 0)
            key = (abs(delta - half), cand[0], cand[1] or (-1, -1))
            if best_key is None or key < best_key:
                best, best_key = cand, key
    return best


class StickyPlacer:
    """Placement for a live stream of batches.

    `place` takes the loads of a new batch: a group it already remembers follows its replica
    (late members never move the group), the others are placed together by `place_groups`
    over the replicas' current loads. Loads are the placer's own ledger: the cost of the
    remembered groups on each replica, or loads the caller measured (`set_loads`).
    `done(gid)` forgets a group and releases its load; beyond `max_groups` remembered groups
    the least recently placed is forgotten first.
    """

    def __init__(self, replicas: int, max_groups: int = DEFAULT_MAX_REMEMBERED_GROUPS) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if max_groups < 1:
            raise ValueError(f"max_groups must be >= 1, got {max_groups}")
        self.replicas = replicas
        self.max_groups = max_groups
        self.loads = [0] * replicas
        self._where: OrderedDict[int, tuple[int, int]] = OrderedDict()  # gid -> (replica, cost), LRU first
        self.forgotten: list[int] = []  # gids forgotten for capacity since the caller last cleared it

    def replica_of(self, gid: int) -> int | None:
        hit = self._where.get(gid)
        return None if hit is None else hit[0]

    def __contains__(self, gid: int) -> bool:
        return gid in self._where

    def __len__(self) -> int:
        return len(self._where)

    def place(self, groups: Sequence[GroupLoad]) -> dict[int, int]:
        """Replica of every group of the batch (gid -> replica index)."""
        merged: dict[int, int] = {}
        for g in groups:  # one gid twice in a batch: one group, costs add up
            merged[g.gid] = merged.get(g.gid, 0) + g.cost
        out: dict[int, int] = {}
        fresh = []
        for gid in sorted(merged):
            if gid in self._where:
                out[gid] = self._charge(gid, self._where[gid][0], merged[gid])
            else:
                fresh.append(GroupLoad(gid, merged[gid], 0))
        if fresh:
            placement = place_groups(fresh, self.replicas, self.loads)
            for g in fresh:
                out[g.gid] = self._charge(g.gid, placement.replica_of[g.gid], g.cost)
        while len(self._where) > self.max_groups:
            gid = next(iter(self._where))
            self.done(gid)
            self.forgotten.append(gid)
        return out

    def place_one(self, gid: int, cost: int) -> int:
        """A single request's group: follows the group if remembered, else the least loaded."""
        return self.place([GroupLoad(gid, cost, 0)])[gid]

    def _charge(self, gid: int, replica: int, cost: int) -> int:
        old = self._where.pop(gid, (replica, 0))[1]
        self._where[gid] = (replica, old + cost)  # most recently used last
        self.loads[replica] += cost
        return replica

    def done(self, gid: int) -> None:
        """The group finished (or is to be forgotten): release its load. Unknown gids are ignored."""
        hit = self._where.pop(gid, None)
        if hit is not None:
            self.loads[hit[0]] = max(0, self.loads[hit[0]] - hit[1])

    def set_loads(self, loads: Sequence[int]) -> None:
        """Replace the ledger by measured loads (e.g. the replicas' queued tokens)."""
        if len(loads) != self.replicas:
            raise ValueError(f"got {len(loads)} loads for {self.replicas} replicas")
        self.loads = [int(x) for x in loads]

    def check_invariants(self) -> None:
        assert len(self._where) <= self.max_groups, "remembers more groups than allowed"
        for gid, (r, cost) in self._where.items():
            assert 0 <= r < self.replicas and cost >= 0, f"group {gid}: bad record {(r, cost)}"
        assert all(x >= 0 for x in self.loads), "negative load"
