"""Trickle arrivals gather into groups; the bounded gather hold (pure session, policy, simulator)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_batchllm.planner import PlannerConfig, PlanRequest
from sglang_batchllm.planner.session import GroupState, PlanningSession
from sglang_batchllm.policy import AdmissionConfig, PoolView, plan_admission
from sglang_batchllm.policy.admission import hold_until
from sglang_batchllm.policy.gather_model import ProgramShape, TrickleClients, program_steps, simulate
from sglang_batchllm.policy.sim import SimulatedEngine

CFG = PlannerConfig(page_size=1, levels=1, min_prefix_tokens=4)
SYSTEM = list(range(1000, 1010))  # 10 tokens shared by everyone


def doc(d: int, n: int = 40) -> list[int]:
    return [100_000 + d * 1000 + i for i in range(n)]


def req(rid: str, d: int | None, own: int, max_new: int = 2) -> PlanRequest:
    body = doc(d) if d is not None else []
    return PlanRequest(rid, SYSTEM + body + [900_000 + own * 10 + i for i in range(3)], max_new)


def test_two_single_arrivals_sharing_a_prefix_form_a_group():
    s = PlanningSession(CFG)
    assert len(s.add([req("a", 1, 0)], now=1.0)) == 1
    ga = s.group_of("a")
    assert not ga.is_shared, "alone, it shares nothing"
    created = s.add([req("b", 1, 1)], now=2.0)
    g = s.group_of("b")
    assert created == [g.gid] and s.group_of("a") is g
    assert g.is_shared and g.prefix_len == len(SYSTEM) + 40 and g.pending == ["a", "b"]
    assert g.born == 1.0, "the hold is measured from the earliest member's arrival"
    assert ga.gid not in {x.gid for x in s.groups()}, "the waiting singleton moved into the group"
    s.add([req("c", 1, 2)], now=3.0)
    assert s.group_of("c") is g, "a third one joins"
    s.check_invariants()


def test_a_share_below_the_minimum_forms_no_group():
    s = PlanningSession(PlannerConfig(page_size=1, levels=1, min_prefix_tokens=16))
    s.add([req("a", 1, 0)])
    s.add([req("b", 2, 1)])  # shares only the 10-token system prompt
    assert not s.group_of("a").is_shared and not s.group_of("b").is_shared
    assert s.group_of("a") is not s.group_of("b")


def test_page_alignment_of_a_gathered_prefix():
    s = PlanningSession(PlannerConfig(page_size=16, levels=1, min_prefix_tokens=4))
    s.add([req("a", 1, 0)])
    s.add([req("b", 1, 1)])
    assert s.group_of("a").prefix_len == 48, "50 shared tokens, cut to whole pages"


def test_a_running_member_never_moves():
    s = PlanningSession(CFG)
    s.add([req("a", 1, 0)])
    ga = s.group_of("a")
    s.admitted("a")
    s.add([req("b", 1, 1)])
    assert s.group_of("a") is ga and "a" in ga.running and not ga.is_shared
    assert s.group_of("b") is not ga
    # and a running leader keeps its group whatever arrives
    s.add([req("c", 2, 2)])
    s.add([req("d", 2, 3)])
    g = s.group_of("c")
    s.admitted("c")
    s.add([req("e", 2, 4)])
    assert s.group_of("e") is g and s.group_of("c") is g and g.leader == "c"
    s.check_invariants()


def test_a_longer_share_regroups_waiting_members_only_when_it_saves_more():
    s = PlanningSession(CFG)
    s.add([req("a", 1, 0)])
    s.add([req("b", 2, 1)])  # a and b share the system prompt only
    sys_group = s.group_of("a")
    assert sys_group.prefix_len == len(SYSTEM) and s.group_of("b") is sys_group
    s.add([req("c", 1, 2)])  # shares system + doc 1 with a: 50 > 2 x 10, so a moves to it
    g = s.group_of("c")
    assert s.group_of("a") is g and g.prefix_len == 50
    assert not s.group_of("b").is_shared, "b is alone again"
    s.check_invariants()
    # once the doc-1 group runs, its members stay; a newcomer joins it
    s.admitted("a")
    s.add([req("f", 1, 5)])
    assert s.group_of("f") is g and s.group_of("a") is g


def test_gathering_is_deterministic():
    def run(seed):
        rng = random.Random(seed)
        s = PlanningSession(CFG)
        order = [(f"r{i}", rng.randrange(4), i) for i in range(40)]
        for i, (rid, d, own) in enumerate(order):
            s.add([req(rid, d, own)], now=i * 0.001)
        return [(g.gid, g.prefix_ids.packed, tuple(g.pending), g.born) for g in s.groups()]

    assert run(1) == run(1)


# ---- the hold -------------------------------------------------------------------------------

def test_hold_applies_only_to_shared_groups_and_ends_at_its_bound():
    s = PlanningSession(CFG)
    s.add([req("a", 1, 0)], now=0.0)
    s.add([req("b", 1, 1)], now=0.001)
    # shares only the system prompt with the waiting pair: joining saves nothing (it does not
    # extend their prefix) and taking a from a 50-token group to share 10 would lose 40
    s.add([req("lone", None, 2)], now=0.001)
    assert not s.group_of("lone").is_shared
    g = s.group_of("a")
    cfg = AdmissionConfig(gather_s=0.010, prefill_tokens_per_s=50 / 0.004)  # prefix computes in 4 ms
    pool = PoolView(capacity=10_000, free=10_000, running_need=0)
    assert hold_until(g, cfg) == 0.004, "bounded by the prefill the prefix costs, below gather_s"
    adm = plan_admission(s, pool, cfg, now=0.002)
    assert adm.held == (g.gid,) and "lone" in adm.offer and not set(g.pending) & set(adm.offer)
    assert adm.release_at == 0.004
    adm = plan_admission(s, pool, cfg, now=0.004)
    assert adm.held == () and g.pending[0] in adm.offer
    assert plan_admission(s, pool, cfg, now=None).held == (), "no clock value: no hold"
    assert plan_admission(s, pool, AdmissionConfig(gather_s=0), now=0.002).held == (), "0 disables"
    long = AdmissionConfig(gather_s=0.002, prefill_tokens_per_s=1.0)
    assert hold_until(g, long) == 0.002, "bounded by the setting"


def test_a_held_group_keeps_its_memory_and_its_place():
    s = PlanningSession(CFG)
    s.add([req("a", 1, 0)], now=0.0)
    s.add([req("b", 1, 1)], now=0.0)
    s.add([req("c", 2, 2)], now=0.0)
    s.add([req("d", 2, 3)], now=0.0)  # two groups of 2
    cfg = AdmissionConfig(gather_s=1.0, prefill_tokens_per_s=1.0)
    adm = plan_admission(s, PoolView(capacity=10_000, free=10_000, running_need=0), cfg, now=0.5)
    assert len(adm.held) == 2 and adm.offer == ()
    cost_one = 53 + 2 + 1 + 3 + 2 + 1
    assert adm.headroom == 10_000 - 2 * cost_one


# ---- the simulator under trickle arrivals ------------------------------------------------------

@st.composite
def trickles(draw):
    docs = draw(st.integers(1, 6))
    n = draw(st.integers(2, 40))
    plan = [(draw(st.integers(0, docs - 1)) if draw(st.booleans()) else None, draw(st.integers(0, 4)))
            for _ in range(n)]
    gaps = [draw(st.sampled_from([0.0, 0.0005, 0.002, 0.01])) for _ in range(n)]
    return plan, gaps, draw(st.sampled_from([0, 1, 5, 20])), draw(st.integers(200, 2000)), draw(st.integers(8, 128))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trickles())
def test_trickle_arrivals_in_the_simulator(t):
    plan, gaps, gather_ms, capacity, step_tokens = t
    cfg = AdmissionConfig(gather_s=gather_ms / 1000)
    engine = SimulatedEngine(capacity, step_tokens, admission=cfg,
                             session=PlanningSession(CFG, max_prefix_tokens=capacity // 2))
    at, reqs = 0.0, []
    for i, ((d, out), gap) in enumerate(zip(plan, gaps)):
        at += gap
        r = req(f"r{i}", d, i, max_new=out) if d is not None else PlanRequest(
            f"r{i}", [2_000_000 + i * 100 + j for j in range(30)], out)  # shares nothing at all
        reqs.append(r)
        engine.arrive(at, r)
    result = engine.run()  # asserts: no over-commit (no retraction), no stall
    assert sorted(result.finished) == sorted(r.rid for r in reqs), "every request runs exactly once"
    for now, gid, shared, first, plen in result.holds:
        assert shared, "a request that shares nothing is never held"
        assert now < first + min(cfg.gather_s, plen / cfg.prefill_tokens_per_s) + 1e-12, "never past the bound"
    for gid, tokens in result.prefix_tokens_computed.items():
        assert tokens == result.prefix_len_of[gid], f"group {gid} computed its prefix more than once"
    assert engine.session.recomputations == 0 and not engine.pinned
    if gather_ms == 0:
        assert not result.holds


def test_trickle_siblings_share_their_prefix_once_when_they_wait_together():
    """Two requests of the same document arrive 1 ms apart while the engine is busy with a long
    prefill: they gather into one group and the document is computed once."""
    engine = SimulatedEngine(5000, 64, admission=AdmissionConfig(gather_s=0.005),
                             session=PlanningSession(CFG, max_prefix_tokens=2500))
    engine.arrive(0.0, PlanRequest("big", [3_000_000 + i for i in range(600)], 2))  # ten chunked steps
    engine.arrive(0.001, req("a", 1, 0))
    engine.arrive(0.002, req("b", 1, 1))
    result = engine.run()
    assert result.gid_of["a"] == result.gid_of["b"]
    assert result.prefix_tokens_computed == {result.gid_of["a"]: 50}


def test_the_default_setting_comes_from_the_model():
    """The model behind the default (docs/scheduler.md): a small run of the issue's program
    shape through the run_batch client model finishes, and a hold changes only shared groups."""
    small = ProgramShape(documents=5)
    off = simulate(0, programs=40, threads=8, shape=small, capacity=200_000)
    on = simulate(5, programs=40, threads=8, shape=small, capacity=200_000)
    assert off.held_steps == 0 and off.makespan_s > 0 and on.makespan_s > 0
    steps = program_steps(small, 0, random.Random(0))
    assert len(steps) == 2 and steps[1][: len(steps[0])] == steps[0], "step 2 extends step 1"
    engine = SimulatedEngine(200_000, 8192)
    TrickleClients(engine, [steps], threads=4, gen_tokens=small.gen_tokens)
    res = engine.run()
    assert res.arrived_at["p0s1"] >= res.finished_at["p0s0"], "step 2 is sent when step 1 is back"


def test_closed_loop_clients_keep_mixed_steps():
    """Rule 6's arrivals clause: clients that send a program's next request when the last one
    finished make an open system, where the known waiting work is no tail; the rule mixes as
    often as mixing every round, and beats never mixing."""
    shape = ProgramShape(documents=5)
    runs = {m: simulate(5.0, programs=60, threads=16, shape=shape, mix=m) for m in ("rule", "always", "never")}
    assert runs["rule"].makespan_s <= runs["always"].makespan_s * 1.01
    assert runs["rule"].makespan_s < runs["never"].makespan_s
