"""Group placement over data-parallel replicas (sglang_batchllm.policy.placement), on the CPU.

Laws: every group lands on exactly one replica (never split); loads add up; the maximum load
is within LPT's 4/3 - 1/(3R) of the optimum always, and within 5% of the lower bound
max(total / R, largest group) on the authors' workload and on many-group workloads;
the same input gives the same placement whatever its order; late members follow their group.
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_batchllm.policy.placement import (
    GroupLoad,
    StickyPlacer,
    group_load,
    lower_bound,
    place_groups,
)


def authors_groups(n_groups=400, size=16, prefix=2000, distinct=200, output=100):
    """BatchLLM's workload: groups of 16 sharing a 2000-token prefix, 200 own tokens, 100 out."""
    return [group_load(g, prefix, [prefix + distinct] * size, [output] * size) for g in range(n_groups)]


def skewed_groups(rng: random.Random, n_groups: int):
    """Group sizes 1..64, prefixes 100..4000, own tokens 1..400, outputs 10..500."""
    groups = []
    for gid in range(n_groups):
        size, prefix = rng.randint(1, 64), rng.randint(100, 4000)
        groups.append(group_load(gid, prefix, [prefix + rng.randint(1, 400) for _ in range(size)],
                                 [rng.randint(10, 500) for _ in range(size)]))
    return groups


def check_placement(groups, replicas, placement, start=None):
    """Never split, every group placed once, loads add up."""
    start = start or [0] * replicas
    assert sorted(placement.replica_of) == sorted(g.gid for g in groups)
    assert all(0 <= r < replicas for r in placement.replica_of.values())
    totals = list(start)
    for g in groups:
        totals[placement.replica_of[g.gid]] += g.cost
    assert list(placement.loads) == totals
    assert sorted(itertools.chain.from_iterable(placement.groups_on(r) for r in range(replicas))) == sorted(
        g.gid for g in groups)


def optimum(groups, replicas):
    """Brute force over every assignment (small inputs only)."""
    best = None
    for assign in itertools.product(range(replicas), repeat=len(groups)):
        loads = [0] * replicas
        for g, r in zip(groups, assign):
            loads[r] += g.cost
        best = max(loads) if best is None else min(best, max(loads))
    return best


# ---- cost ---------------------------------------------------------------------------------

def test_group_load_counts_prefix_once():
    load = group_load(7, 2000, [2200] * 16, [100] * 16)
    assert (load.gid, load.prefill_tokens, load.decode_tokens) == (7, 2000 + 16 * 200, 1600)
    assert load.cost == 2000 + 3200 + 1600
    assert group_load(7, 2000, [2200], [10], prefix_cached=True).prefill_tokens == 200
    assert group_load(1, 0, [50], [5]).cost == 55  # an unshared request: its whole prompt
    with pytest.raises(ValueError):
        GroupLoad(1, -1, 0)


# ---- balance ------------------------------------------------------------------------------

@pytest.mark.parametrize("replicas", [2, 3, 4, 8])
def test_authors_workload_within_5_percent(replicas):
    groups = authors_groups()
    placement = place_groups(groups, replicas)
    check_placement(groups, replicas, placement)
    bound = lower_bound(groups, replicas)
    assert placement.max_load <= 1.05 * bound
    # equal groups: LPT is round robin, the best possible (ceil(400 / R) groups on the busiest)
    assert placement.max_load == -(-400 // replicas) * groups[0].cost


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("replicas", [2, 4, 8])
def test_many_skewed_groups_within_5_percent(seed, replicas):
    groups = skewed_groups(random.Random(seed), 400)
    placement = place_groups(groups, replicas)
    check_placement(groups, replicas, placement)
    ratio = placement.max_load / lower_bound(groups, replicas)
    assert ratio <= 1.05
    assert ratio <= 1.001  # measured: <= 1.000005 for these seeds; LPT alone <= 1.0006 (R=8)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 200_000), min_size=1, max_size=60), st.integers(1, 8))
def test_list_schedule_bound_always(costs, replicas):
    """Any size: the maximum is at least the lower bound and at most Graham's list-schedule
    bound total / R + (1 - 1/R) * largest (LPT is a list schedule; the search only lowers the
    maximum). The 4/3 - 1/(3R) bound against the exact optimum is checked below."""
    groups = [GroupLoad(gid, c, 0) for gid, c in enumerate(costs)]
    bound = lower_bound(groups, replicas)
    lpt = place_groups(groups, replicas, improve=False)
    improved = place_groups(groups, replicas)
    for placement in (lpt, improved):
        check_placement(groups, replicas, placement)
        assert bound <= placement.max_load <= sum(costs) / replicas + (1 - 1 / replicas) * max(costs) + 1e-9
    assert improved.max_load <= lpt.max_load


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=7), st.integers(2, 4))
def test_lpt_against_exact_optimum(costs, replicas):
    groups = [GroupLoad(gid, c, 0) for gid, c in enumerate(costs)]
    best = optimum(groups, replicas)
    lpt = place_groups(groups, replicas, improve=False).max_load
    improved = place_groups(groups, replicas).max_load
    assert best <= improved <= lpt <= (4 / 3 - 1 / (3 * replicas)) * best + 1e-9


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31), st.integers(100, 800), st.integers(2, 8))
def test_skewed_many_groups_hypothesis(seed, n_groups, replicas):
    """Many groups (100..800 of sizes 1..64): within 5% of the bound. Measured over 400 such
    seeds: at most 1.00014 x the bound with the local search, 1.0117 x with LPT alone."""
    groups = skewed_groups(random.Random(seed), n_groups)
    placement = place_groups(groups, replicas)
    check_placement(groups, replicas, placement)
    assert placement.max_load <= 1.05 * lower_bound(groups, replicas)


def test_starting_loads_are_respected():
    groups = [GroupLoad(g, 100, 0) for g in range(10)]
    placement = place_groups(groups, 2, loads=[600, 0])
    check_placement(groups, 2, placement, [600, 0])
    assert placement.loads == (800, 800)
    with pytest.raises(ValueError):
        place_groups(groups, 2, loads=[1])
    with pytest.raises(ValueError):
        place_groups(groups, 0)
    with pytest.raises(ValueError):
        place_groups([GroupLoad(1, 5, 0), GroupLoad(1, 6, 0)], 2)


def test_one_huge_group_is_not_split():
    groups = [GroupLoad(0, 10_000, 0)] + [GroupLoad(g, 10, 0) for g in range(1, 11)]
    placement = place_groups(groups, 4)
    check_placement(groups, 4, placement)
    assert placement.max_load == lower_bound(groups, 4) == 10_000
    assert placement.groups_on(placement.replica_of[0]) == (0,)


# ---- determinism --------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 5), st.randoms())
def test_same_placement_whatever_the_input_order(costs, replicas, rnd):
    groups = [GroupLoad(gid, c, 0) for gid, c in enumerate(costs)]  # many ties on purpose
    shuffled = groups[:]
    rnd.shuffle(shuffled)
    assert place_groups(groups, replicas) == place_groups(shuffled, replicas)


# ---- incremental: sticky groups -----------------------------------------------------------

def test_late_members_follow_their_group():
    placer = StickyPlacer(2)
    first = placer.place([GroupLoad(0, 1000, 0), GroupLoad(1, 900, 0), GroupLoad(2, 100, 0)])
    assert first[0] != first[1]
    before = list(placer.loads)
    # a late member of group 1 follows it even though the other replica is now lighter or equal
    assert placer.place_one(1, 5000) == first[1]
    assert placer.loads[first[1]] == before[first[1]] + 5000
    # a new group goes to the least-loaded replica
    assert placer.place_one(3, 10) == min(range(2), key=lambda r: (placer.loads[r], r))
    placer.check_invariants()


def test_done_releases_the_load_and_forgets():
    placer = StickyPlacer(2)
    placer.place([GroupLoad(0, 1000, 0), GroupLoad(1, 10, 0)])
    r0 = placer.replica_of(0)
    placer.done(0)
    assert 0 not in placer and placer.loads[r0] == 0
    placer.done(0)  # unknown: ignored
    # the gid is free again: a new group with it is placed afresh (least loaded)
    assert placer.place_one(0, 5) == r0
    placer.check_invariants()


def test_capacity_forgets_least_recently_used():
    placer = StickyPlacer(2, max_groups=3)
    for gid in range(3):
        placer.place_one(gid, 10)
    placer.place_one(0, 10)  # 0 is now the most recently used
    placer.place_one(3, 10)
    assert placer.forgotten == [1]
    assert 1 not in placer and all(g in placer for g in (0, 2, 3))
    assert sum(placer.loads) == 50 - 10
    placer.check_invariants()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(1, 1000)), min_size=1, max_size=200),
       st.integers(1, 4))
def test_sticky_stream(events, replicas):
    """A stream of (gid, cost) arrivals: a gid stays on one replica while it is remembered,
    and the ledger equals the remembered groups' costs."""
    placer = StickyPlacer(replicas, max_groups=8)
    home: dict[int, int] = {}
    charged: dict[int, int] = {}
    for gid, cost in events:
        r = placer.place_one(gid, cost)
        if gid in home:
            assert r == home[gid]
        for lost in placer.forgotten:
            home.pop(lost, None)
            charged.pop(lost, None)
        placer.forgotten.clear()
        if gid in placer:
            home[gid] = r
            charged[gid] = charged.get(gid, 0) + cost
        placer.check_invariants()
        totals = [0] * replicas
        for g, c in charged.items():
            totals[home[g]] += c
        assert placer.loads == totals


def test_sticky_batch_balances_new_groups_around_old_ones():
    placer = StickyPlacer(2)
    placer.place([GroupLoad(0, 1000, 0)])
    out = placer.place([GroupLoad(0, 500, 0)] + [GroupLoad(g, 100, 0) for g in range(1, 16)])
    assert out[0] == placer.replica_of(0) == 0
    assert placer.loads == [1500, 1500]
