"""DP dispatch by group (patches/dp_dispatch.py) against a fake DataParallelController, on the CPU.

What is checked: a batch message reaches each replica as one message holding whole groups, in
the batch's order; loads are balanced; late single requests follow their group; requests the
planner does not take keep SGLang's dispatch; DP attention keeps SGLang's dispatch. What is not:
a real multi-GPU run (see docs/parallel.md).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from sglang.srt.managers.io_struct import BatchTokenizedGenerateReqInput, TokenizedGenerateReqInput
from sglang.srt.sampling.sampling_params import SamplingParams

from sglang_batchllm.patches import dp_dispatch
from sglang_batchllm.patches.dp_dispatch import GroupRouter
from sglang_batchllm.planner import PlanRequest, PlannerConfig


def tokenized(rid, ids, max_new=100, **extra):
    fields = dict(input_text=None, input_ids=list(ids), input_embeds=None, mm_inputs=None, token_type_ids=None,
                  sampling_params=SamplingParams(max_new_tokens=max_new), return_logprob=False,
                  logprob_start_len=-1, top_logprobs_num=0, token_ids_logprob=None, stream=False)
    fields.update(extra)
    return TokenizedGenerateReqInput(rid=rid, **fields)


def workload(rng, groups, size, prefix=256, own=32, tag="r"):
    reqs = []
    for g in range(groups):
        pre = [rng.randrange(1, 30000) for _ in range(prefix)]
        for m in range(size):
            reqs.append(tokenized(f"{tag}{g}_{m}", pre + [rng.randrange(1, 30000) for _ in range(own)]))
    return reqs


class FakeController:
    """The attributes of DataParallelController that the patch reads, and a log of messages."""

    def __init__(self, replicas=2, dp_attention=False):
        self.server_args = SimpleNamespace(enable_dp_attention=dp_attention, disaggregation_mode="null", page_size=1)
        self.workers = [f"worker{i}" for i in range(replicas)]
        self._active_workers = list(range(replicas))
        self.status = [True] * replicas
        self.sglang_dispatched = []  # requests SGLang's own dispatch got

    def dispatching_with_trace(self, req, refresh_load_budget=True):
        dp_dispatch._around_dispatching_with_trace(lambda s, r, *a, **k: s.sglang_dispatched.append(r.rid),
                                                   self, req, refresh_load_budget=refresh_load_budget)

    def dispatch_batch_generate(self, batch):
        def original(s, b):
            for r in b:
                s.dispatching_with_trace(r, refresh_load_budget=False)

        dp_dispatch._around_dispatch_batch_generate(original, self, batch)


@pytest.fixture
def sent(monkeypatch):
    log = []
    monkeypatch.setattr(dp_dispatch, "_sock_send", lambda socket, obj: log.append((socket, obj)))
    return log


def rids_by_worker(sent):
    out = {}
    for socket, msg in sent:
        items = list(msg) if isinstance(msg, BatchTokenizedGenerateReqInput) else [msg]
        out.setdefault(socket, []).extend(r.rid for r in items)
    return out


def group_of(rid):
    return rid.split("_")[0]


def test_batch_goes_by_whole_groups_one_message_per_replica(sent):
    ctrl = FakeController(2)
    batch = workload(random.Random(0), groups=10, size=4)
    ctrl.dispatch_batch_generate(BatchTokenizedGenerateReqInput(batch=batch, rids=[r.rid for r in batch]))
    assert len(sent) == 2 and all(isinstance(m, BatchTokenizedGenerateReqInput) for _, m in sent)
    by_worker = rids_by_worker(sent)
    assert sorted(r for rids in by_worker.values() for r in rids) == sorted(r.rid for r in batch)
    homes = {}
    for worker, rids in by_worker.items():
        order = [r.rid for r in batch if r.rid in set(rids)]
        assert rids == order  # the batch's order within a replica
        for rid in rids:
            assert homes.setdefault(group_of(rid), worker) == worker  # never split
    assert sorted(len(r) for r in by_worker.values()) == [20, 20]  # 10 equal groups: 5 and 5
    assert ctrl.sglang_dispatched == []
    assert all(r.time_stats is not None for r in batch)  # dispatch times recorded as SGLang does
    ctrl._batchllm_router.check_invariants()


def test_late_single_request_follows_its_group(sent):
    ctrl = FakeController(2)
    rng = random.Random(1)
    batch = workload(rng, groups=6, size=3)
    ctrl.dispatch_batch_generate(BatchTokenizedGenerateReqInput(batch=batch))
    home = {group_of(rid): w for w, rids in rids_by_worker(sent).items() for rid in rids}
    sent.clear()
    for g in range(6):
        prefix = list(batch[3 * g].input_ids[:256])
        ctrl.dispatching_with_trace(tokenized(f"r{g}_late", prefix + [7, 8, 9]))
        (worker, msg), = sent
        assert worker == home[f"r{g}"] and msg.rid == f"r{g}_late"
        sent.clear()
    # a request that shares nothing goes to the least-loaded replica
    ctrl.dispatching_with_trace(tokenized("alone", [1, 2, 3]))
    router = ctrl._batchllm_router
    assert len(sent) == 1 and ctrl.sglang_dispatched == []
    router.check_invariants()


def test_unplannable_requests_keep_sglang_dispatch(sent):
    ctrl = FakeController(2)
    batch = workload(random.Random(2), groups=2, size=2)
    odd = [tokenized("routed", [1, 2, 3], routed_dp_rank=1), tokenized("embeds", [1, 2], input_embeds=[[0.0]])]
    ctrl.dispatch_batch_generate(BatchTokenizedGenerateReqInput(batch=batch + odd))
    assert sorted(ctrl.sglang_dispatched) == ["embeds", "routed"]
    assert sum(len(r) for r in rids_by_worker(sent).values()) == 4


def test_dp_attention_keeps_sglang_dispatch(sent):
    ctrl = FakeController(2, dp_attention=True)
    batch = workload(random.Random(3), groups=2, size=2)
    ctrl.dispatch_batch_generate(BatchTokenizedGenerateReqInput(batch=batch))
    assert sent == [] and ctrl.sglang_dispatched == [r.rid for r in batch]


def test_replica_set_change_falls_back(sent):
    ctrl = FakeController(2)
    ctrl.dispatching_with_trace(tokenized("a", [1, 2, 3]))
    ctrl.status[1] = False
    ctrl.dispatching_with_trace(tokenized("b", [1, 2, 3]))
    assert ctrl.sglang_dispatched == ["b"]


def test_repeated_id_falls_back_without_losing_requests(sent):
    ctrl = FakeController(2)
    batch = workload(random.Random(4), groups=1, size=3)
    ctrl.dispatch_batch_generate(BatchTokenizedGenerateReqInput(batch=batch))
    again = workload(random.Random(4), groups=1, size=3)  # the same ids, still remembered
    ctrl.dispatch_batch_generate(BatchTokenizedGenerateReqInput(batch=again))
    assert ctrl.sglang_dispatched == [r.rid for r in again]


# ---- the pure router ------------------------------------------------------------------------

def plan_reqs(rng, groups, size, prefix, own, out, tag="r"):
    reqs = []
    for g in range(groups):
        pre = [rng.randrange(1, 30000) for _ in range(prefix)]
        reqs += [PlanRequest(f"{tag}{g}_{m}", pre + [rng.randrange(1, 30000) for _ in range(own)], out)
                 for m in range(size)]
    return reqs


def test_router_balances_the_authors_shape():
    """400 groups x 16, prefix 2000, own 200, output 100 on 2 replicas: 200 groups each."""
    router = GroupRouter(2)
    reqs = plan_reqs(random.Random(5), 400, 16, 2000, 200, 100)
    replicas = router.route(reqs)
    per_group = {}
    for req, r in zip(reqs, replicas):
        assert per_group.setdefault(group_of(req.rid), r) == r
    assert sorted(list(per_group.values()).count(r) for r in (0, 1)) == [200, 200]
    assert router.placer.loads[0] == router.placer.loads[1] == 200 * (2000 + 16 * 200 + 16 * 100)
    router.check_invariants()


def test_router_forgets_by_capacity_and_stays_consistent():
    router = GroupRouter(2, PlannerConfig(), max_groups=3)
    rng = random.Random(6)
    for batch in range(5):
        router.route(plan_reqs(rng, 2, 3, 64, 8, 10, tag=f"b{batch}g"))
        router.check_invariants()
        assert len(router.placer) <= 3
    assert len(router.session) <= 3 * 3  # forgotten groups left the session


def test_router_is_deterministic():
    reqs = plan_reqs(random.Random(7), 30, 5, 128, 16, 50)
    assert GroupRouter(3).route(reqs) == GroupRouter(3).route(reqs)


def test_patch_record():
    patch = dp_dispatch.PATCH
    assert patch.name == "dp_dispatch" and patch.sglang_version == "0.5.17"
    import sglang_batchllm.patches as patches

    assert "dp_dispatch" not in patches._MODULES  # the lead decides when it is installed
    for target in patch.targets[:2]:
        cls_path, attr = target.rsplit(".", 1)
        import pkgutil

        assert callable(getattr(pkgutil.resolve_name(cls_path), attr))


def test_controller_target_pickles_by_its_own_name():
    """spawn pickles the process target by name: ours must resolve to itself in a new process."""
    import pickle

    assert pickle.loads(pickle.dumps(dp_dispatch.run_dp_controller_process)) is dp_dispatch.run_dp_controller_process
