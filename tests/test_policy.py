"""The planning session and the admission policy against a simulated KV pool (CPU, pure)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_batchllm.planner import PlannerConfig, PlanRequest
from sglang_batchllm.planner.session import GroupState, Pin, PlanningSession, Unpin
from sglang_batchllm.policy import AdmissionConfig, PoolView, mixes, plan_admission
from sglang_batchllm.policy.sim import MIX_RULES, SimulatedEngine

CFG = PlannerConfig(page_size=1, levels=1, min_prefix_tokens=4)


def make_batch(groups: list[tuple[int, int, list[tuple[int, int]]]], seed: int = 0) -> list[PlanRequest]:
    """groups: (group id, prefix_len, [(suffix_len, max_new), ...]); distinct first tokens keep
    prefixes and suffixes from sharing anything by accident."""
    rng = random.Random(seed)
    reqs, token = [], iter(range(10_000_000, 20_000_000))
    for g, plen, members in groups:
        prefix = [next(token)] + [rng.randrange(1000) for _ in range(plen - 1)] if plen else []
        for i, (slen, out) in enumerate(members):
            suffix = [next(token)] + [rng.randrange(1000) for _ in range(slen - 1)]
            reqs.append(PlanRequest(f"g{g}-m{i}", prefix + suffix, out))
    rng.shuffle(reqs)
    return reqs


def authors_like(groups: int, size: int, prefix: int = 40, distinct: int = 4, out: int = 2):
    return make_batch([(g, prefix, [(distinct, out)] * size) for g in range(groups)])


# ---- the session --------------------------------------------------------------------------

def test_session_groups_a_batch_and_ids_are_stable():
    s = PlanningSession(CFG)
    s.add(authors_like(3, 4))
    gids = {s.group_of(r).gid for r in list(s._members)}
    assert len(gids) == 3 and all(s.group(g).prefix_len == 40 for g in gids)
    before = {r: s.group_of(r).gid for r in s._members}
    s.add(make_batch([(9, 40, [(4, 2)] * 3)], seed=7))  # another batch, other prefix
    assert all(s.group_of(r).gid == gid for r, gid in before.items()), "existing ids never change"
    s.check_invariants()


def test_late_arrival_joins_a_running_group_and_never_moves_members():
    s = PlanningSession(CFG)
    first = make_batch([(0, 40, [(4, 2)] * 3)])
    s.add(first)
    g = s.group_of(first[0].rid)
    leader = g.pending[0]
    s.admitted(leader)
    late = PlanRequest("late", list(first[0].input_ids[:40]) + [99_999_999, 5], 3)
    assert s.add([late]) == [], "no new group: it joins"
    assert s.group_of("late") is g and g.pending[-1] == "late"
    assert g.leader == leader and leader in g.running
    s.check_invariants()


def test_lifecycle_pins_once_and_unpins_when_the_last_member_finishes():
    s = PlanningSession(CFG)
    batch = make_batch([(0, 40, [(4, 2)] * 3)])
    s.add(batch)
    g = s.group_of(batch[0].rid)
    rids = list(g.pending)
    assert s.admitted(rids[0]) == [] and g.state is GroupState.PREFILLING
    assert s.prefix_cached(g.gid) == [Pin(g.gid, g.prefix_ids, 40)]
    with pytest.raises(ValueError):
        s.prefix_cached(g.gid)
    for r in rids[1:]:
        s.admitted(r)
    assert s.finished(rids[0]) == [] and s.finished(rids[1]) == []
    assert s.finished(rids[2]) == [Unpin(g.gid)]
    assert len(s) == 0 and s.num_groups == 0, "finished requests are forgotten"
    s.check_invariants()


def test_abort_and_retraction_keep_the_pin_right():
    s = PlanningSession(CFG)
    batch = make_batch([(0, 40, [(4, 2)] * 3)])
    s.add(batch)
    g = s.group_of(batch[0].rid)
    a, b, c = g.pending
    s.admitted(a)
    s.prefix_cached(g.gid)
    s.admitted(b)
    assert s.retracted(b) == [] and g.pending[0] == b and s.retractions == 1
    assert s.aborted(c) == []  # left before admission
    assert s.finished(a) == [], "b is still pending: the pin survives"
    s.admitted(b)
    assert s.aborted(b) == [Unpin(g.gid)], "an abort of the last member releases the pin"
    s.check_invariants()


def test_leader_lost_elects_a_new_leader_and_counts_a_recomputation():
    s = PlanningSession(CFG)
    batch = make_batch([(0, 40, [(4, 2)] * 2)])
    s.add(batch)
    g = s.group_of(batch[0].rid)
    a, b = g.pending
    s.admitted(a)
    s.finished(a)
    assert g.state is GroupState.PREFILLING
    s.leader_lost(g.gid)
    assert g.state is GroupState.WAITING and s.recomputations == 1
    s.admitted(b)
    assert g.leader == b


def test_duplicate_ids_reject_the_whole_batch():
    s = PlanningSession(CFG)
    batch = authors_like(2, 2)
    s.add(batch)
    with pytest.raises(ValueError, match="already in the session"):
        s.add([PlanRequest("new", [1, 2, 3], 1), batch[0]])
    assert "new" not in s


def test_oversized_prefix_runs_unshared():
    s = PlanningSession(CFG, max_prefix_tokens=30)
    s.add(authors_like(1, 3))
    assert all(not g.is_shared for g in s.groups()) and s.num_groups == 3


def test_session_is_deterministic():
    def run():
        s = PlanningSession(CFG)
        s.add(authors_like(5, 3))
        return [(g.gid, g.prefix_ids.packed, tuple(g.pending)) for g in s.groups()]

    assert run() == run()


# ---- the policy ---------------------------------------------------------------------------

def test_members_wait_for_the_prefix_and_groups_open_by_memory():
    s = PlanningSession(CFG)
    s.add(authors_like(4, 4))  # each group: leader 44+2+1, members 3 x (4+2+1) = 68
    adm = plan_admission(s, PoolView(capacity=1000, free=150, running_need=0))
    assert len(adm.opened) == 2 and len(adm.offer) == 2, "two whole groups fit in 150"
    for rid in adm.offer:
        s.admitted(rid)
    adm2 = plan_admission(s, PoolView(capacity=1000, free=150 - 2 * 44, running_need=2 * 2))
    assert adm2.offer == (), "members wait while the prefix is computed; no new group fits"
    for gid in adm.opened:
        s.prefix_cached(gid)
    adm3 = plan_admission(s, PoolView(capacity=1000, free=150 - 2 * 44 - 0, running_need=4))
    assert len(adm3.offer) == 6 and not adm3.opened, "members of cached groups come first"


def test_progress_rule_opens_a_group_larger_than_the_pool():
    s = PlanningSession(CFG)
    s.add(authors_like(1, 50))
    adm = plan_admission(s, PoolView(capacity=100, free=100, running_need=0))
    assert len(adm.offer) == 1 and adm.headroom < 0


@st.composite
def workloads(draw):
    groups = []
    for g in range(draw(st.integers(1, 8))):
        plen = draw(st.sampled_from([0, 8, 20, 60]))
        members = [(draw(st.integers(1, 12)), draw(st.integers(0, 6))) for _ in range(draw(st.integers(1, 10)))]
        groups.append((g, plen, members))
    capacity = draw(st.integers(160, 900))
    step_tokens = draw(st.integers(8, 200))
    return (groups, capacity, step_tokens, draw(st.integers(0, 3)), draw(st.randoms(use_true_random=False)),
            draw(st.sampled_from(MIX_RULES)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_simulated_engine_properties(w):
    groups, capacity, step_tokens, waves, rnd, mix = w
    reqs = make_batch(groups, seed=rnd.randrange(1000))
    engine = SimulatedEngine(capacity, step_tokens, session=PlanningSession(CFG, max_prefix_tokens=capacity // 2),
                             mix=mix)
    # the batch arrives whole or in a few parts while others run (trickle)
    parts = [reqs] if not waves else [reqs[i::waves + 1] for i in range(waves + 1)]
    engine.submit(parts[0])
    for part in parts[1:]:
        for _ in range(rnd.randrange(5)):
            if engine.running or len(engine.session):
                engine.step()
        engine.submit(part)
    result = engine.run()  # asserts: pool never over-committed (no retraction), no stall
    assert sorted(result.finished) == sorted(r.rid for r in reqs), "every request runs exactly once"
    assert all(st.prefill_tokens <= step_tokens for st in result.steps), "step token budget"
    planned = {f"g{g}": plen for g, plen, _ in groups}
    plan_group_of = {gid: rid.split("-")[0] for rid, gid in result.gid_of.items()}
    for gid, tokens in result.prefix_tokens_computed.items():
        assert tokens == planned[plan_group_of[gid]], f"group {gid} computed its prefix {tokens} tokens, not once"
    assert not engine.pinned, "no pin outlives its group"
    assert engine.session.recomputations == 0


def test_big_batch_runs_in_waves_without_retraction():
    reqs = authors_like(60, 16, out=20)  # 60 groups x (40 + 16 x (4 + 20 + 1)) = 26400 slots > 1500
    engine = SimulatedEngine(capacity=1500, step_tokens=256, session=PlanningSession(CFG))
    engine.submit(reqs)
    result = engine.run()
    assert len(result.finished) == 960
    assert len(result.prefix_tokens_computed) == 60 and set(result.prefix_tokens_computed.values()) == {40}
    assert max(s.slots_used for s in result.steps) > 1500 * 0.6, "memory is used, not left idle"


def _simulate(reqs, capacity, mix, step_tokens=256):
    engine = SimulatedEngine(capacity=capacity, step_tokens=step_tokens, session=PlanningSession(CFG), mix=mix)
    engine.submit(reqs)
    return engine.run()


def _mixed_and_plain_prefills(result):
    mixed = [i for i, s in enumerate(result.steps) if s.mixed]
    plain = [i for i, s in enumerate(result.steps) if s.prefill_tokens and not s.mixed]
    return mixed, plain


def test_a_batch_that_fits_mixes_only_once_its_waiting_work_fits_one_step():
    reqs = authors_like(8, 16, out=20)  # 8 x (40 + 16 x 25) = 3520 slots: everything fits
    rule, always = _simulate(reqs, 5000, "rule"), _simulate(reqs, 5000, "always")
    mixed, plain = _mixed_and_plain_prefills(rule)
    assert plain and mixed and min(mixed) > max(plain), "the known tail carries the decodes until the end"
    assert len(mixed) < sum(s.mixed for s in always.steps)
    assert len(rule.steps) == len(_simulate(reqs, 5000, "never").steps)


def test_memory_bound_waves_mix_until_the_last_wave_is_admitted():
    # 40 x (200 + 16 x 71) = 53,440 slots through a pool of 6,000: waves; 64-token steps
    reqs = authors_like(40, 16, prefix=200, distinct=20, out=50)
    memory, never, always = (_simulate(reqs, 6000, m, step_tokens=64) for m in ("rule", "never", "always"))
    for result in (memory, never, always):
        assert len(result.finished) == 640
    assert len(memory.steps) < len(never.steps), "decodes that ride free memory sooner"
    assert memory.end <= never.end
    mixed, plain = _mixed_and_plain_prefills(memory)
    assert mixed and plain and min(plain) > min(mixed), "waves mix; once all is admitted the tail carries them"
    assert sum(s.mixed for s in memory.steps) < sum(s.mixed for s in always.steps)


def test_admission_says_when_memory_binds_and_what_waits():
    s = PlanningSession(CFG)
    s.add(authors_like(4, 4))  # each group 68 slots: 44 + 3 x 4 prompt tokens to compute
    free = plan_admission(s, PoolView(capacity=1000, free=1000, running_need=0))
    assert not free.memory_bound and free.waiting_tokens == 4 * (44 + 3 * 4)
    assert not mixes(free, 200) and mixes(free, 224)
    bound = plan_admission(s, PoolView(capacity=1000, free=150, running_need=0))
    assert bound.memory_bound and mixes(bound, 0)
    for rid in free.offer:  # leaders admitted, prefixes cached: members compute 4 tokens each
        s.admitted(rid)
    for gid in free.opened:
        s.prefix_cached(gid)
    assert plan_admission(s, PoolView(capacity=1000, free=1000, running_need=0)).waiting_tokens == 4 * 3 * 4


_DECISIONS = """
import json, sys
sys.path.insert(0, "tests")
from test_policy import CFG, make_batch
from sglang_batchllm.planner.session import PlanningSession
from sglang_batchllm.policy.sim import SimulatedEngine
from sglang_batchllm.policy import plan_admission
groups = [(g, [0, 8, 20, 60][g % 4], [(1 + (g * 7 + i) % 12, (g + i) % 6) for i in range(1 + g % 9)]) for g in range(30)]
engine = SimulatedEngine(700, 64, session=PlanningSession(CFG, max_prefix_tokens=350))
reqs = make_batch(groups, seed=3)
engine.submit(reqs[:200])
trace = []
for step in range(10_000):
    if step == 5:
        engine.submit(reqs[200:])
    if not engine.running and len(engine.session) == 0:
        break
    trace.append(list(plan_admission(engine.session, engine.pool()).offer))
    engine.step()
print(json.dumps(trace))
"""


def test_decisions_do_not_depend_on_the_process():
    # TP ranks are separate processes with their own str hash seeds: the same calls must give
    # the same admissions in every one of them.
    import os
    import subprocess
    import sys

    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", _DECISIONS], capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(out.stdout)
    assert runs[0] == runs[1] and len(runs[0]) > 100
