"""The drivers (drivers.py): the waves split of a workload into generate calls, and the waves
arm run end to end through runner.run_workload with the fake engine."""

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_batchllm import bundled_model
from sglang_batchllm.bench.drivers import (
    WAVE_FILL,
    PrefixGroup,
    group_kv_tokens,
    kv_pool_tokens,
    one_call,
    pack_waves,
    prefix_groups,
    wave_calls,
    waves,
)
from sglang_batchllm.bench.fake import FakeEngine
from sglang_batchllm.bench.model import ModelShape
from sglang_batchllm.bench.runner import run_workload
from sglang_batchllm.bench.workloads import BenchRequest, WorkloadSpec

GROUP_KV = 2000 + 16 * (200 + 100)  # an authors' group: its prefix once, each member's own 200 + 100 output


@pytest.fixture(scope="module")
def model():
    return ModelShape.from_config_dir(bundled_model.model_dir())


@pytest.fixture(scope="module")
def authors(model):
    (w,) = WorkloadSpec("authors", scale=0.025).build(model)  # 10 groups x 16, shuffled
    return w


def group_of(rid):
    return rid.rsplit("-m", 1)[0]


class Pool:
    def __init__(self, tokens):
        self.tokens = tokens

    def get_server_info(self):
        return {"max_total_num_tokens": self.tokens}


def test_groups_come_from_the_prompts(authors):
    groups, loners = prefix_groups(authors.requests)
    assert loners == [] and len(groups) == 10
    for g in groups:
        assert g.prefix_len == 2000 and len(g.members) == 16
        assert len({group_of(authors.requests[i].rid) for i in g.members}) == 1
    assert group_kv_tokens(groups[0], authors.requests) == GROUP_KV


def test_waves_fit_the_pool_and_send_leaders_first(authors):
    pool = int(3.5 * GROUP_KV / WAVE_FILL)  # 3 groups fit per wave, not 4
    plan = waves(Pool(pool), authors)
    info = plan.info
    assert (info["kv_pool_tokens"], info["wave_groups"], info["groups_per_wave"]) == (pool, 3, [3, 3, 3, 1])
    assert info["peak_wave_kv_tokens"] == 3 * GROUP_KV <= info["budget_tokens"] == int(pool * WAVE_FILL)
    assert info["calls"] == len(plan.calls) == 8 and info["loners"] == 0
    sent = [i for call in plan.calls for i in call]
    assert sorted(sent) == list(range(authors.num_requests))  # every request exactly once
    rids = [[authors.requests[i].rid for i in call] for call in plan.calls]
    for leaders, rest in zip(rids[::2], rids[1::2]):
        wave = {group_of(r) for r in leaders}
        assert len(leaders) == len(wave)  # one member of each of the wave's groups
        assert Counter(group_of(r) for r in rest) == {g: 15 for g in wave}  # then all the others of those groups


def test_a_workload_that_shares_nothing_is_one_final_call(model):
    (control,) = WorkloadSpec("control", scale=0.02).build(model)
    plan = waves(Pool(10**6), control)
    assert plan.calls == one_call(None, control).calls and plan.info["waves"] == 0 and plan.info["loners"] == 10


def test_jsonl_groups_and_loners(tmp_path, model):
    """Groups derived from the prompts: two groups of 3 (prefix 40), 2 requests alone."""
    rows = [{"input_ids": [5 + g] * 40 + [100 + m], "max_new_tokens": 2, "rid": f"g{g}-m{m}"} for g in range(2) for m in range(3)]
    rows += [{"input_ids": [50 + i] * 10, "max_new_tokens": 3, "rid": f"alone{i}"} for i in range(2)]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (w,) = WorkloadSpec(f"jsonl:{path}").build(model)
    plan = waves(Pool(10**6), w)
    rids = [[w.requests[i].rid for i in call] for call in plan.calls]
    assert len(rids) == 3 and sorted(r[:2] for r in rids[0]) == ["g0", "g1"]
    assert sorted(rids[0] + rids[1]) == [f"g{g}-m{m}" for g in range(2) for m in range(3)]
    assert sorted(rids[2]) == ["alone0", "alone1"]


def test_the_pool_size_must_be_reported():
    with pytest.raises(RuntimeError, match="max_total_num_tokens=None"):
        kv_pool_tokens(type("NoPool", (), {"get_server_info": lambda self: {"max_total_tokens": None}})())


def test_waves_run_in_one_timed_region_with_outputs_in_workload_order(tmp_path, authors):
    steps = tmp_path / "steps.jsonl"
    pool = int(5 * GROUP_KV / WAVE_FILL) + 1  # exactly 5 groups fit into 90% of it
    engine = FakeEngine(str(steps), max_total_tokens=pool)
    run = run_workload(engine, authors, steps, driver="waves")
    assert len(engine.generate_calls) == 4 and [len(c) for c in engine.generate_calls] == [5, 75, 5, 75]
    assert run.driver["wave_groups"] == 5 and run.driver["kv_pool_tokens"] == pool
    assert list(run.outputs) == [r.rid for r in authors.requests]
    assert run.outputs == {r.rid: engine.tokens(r.input_ids, r.max_new_tokens, r.rid) for r in authors.requests}
    # the window spans all four calls: every prompt token prefilled once (the fake has no cache)
    assert run.steps["prefill_tokens"] == authors.prompt_tokens and run.completion_tokens == authors.output_tokens


def requests_of(group_shapes):
    """Requests for groups given as (prefix, [(own prompt tokens, output tokens), ...])."""
    reqs, groups = [], []
    for prefix, members in group_shapes:
        first = len(reqs)
        for own, out in members:
            reqs.append(BenchRequest(f"r{len(reqs)}", tuple(range(prefix + own)), out))
        groups.append(PrefixGroup(prefix, tuple(range(first, len(reqs)))))
    return reqs, groups


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 50), st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20)), min_size=2, max_size=5)),
             max_size=12),
    st.integers(1, 300),
    st.integers(0, 3),
)
def test_packing_laws(group_shapes, budget, num_loners):
    reqs, groups = requests_of(group_shapes)
    loners = list(range(len(reqs), len(reqs) + num_loners))
    packed = pack_waves(groups, reqs, budget)
    assert [g for wave in packed for g in wave] == groups  # every group once, in order
    costs = [[group_kv_tokens(g, reqs) for g in wave] for wave in packed]
    for wave, nxt in zip(costs, costs[1:]):
        assert sum(wave) + nxt[0] > budget  # a wave closes only when the next group does not fit
    assert all(sum(c) <= budget or len(c) == 1 for c in costs)  # fits, or is one group too big for any wave
    calls = wave_calls(packed, loners)
    assert sorted(i for call in calls for i in call) == list(range(len(reqs) + num_loners))
    assert len(calls) == 2 * len(packed) + bool(loners)
    if loners:
        assert calls[-1] == loners  # the loners go last
