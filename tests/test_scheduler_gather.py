"""The gather hold inside the adapter, on real SGLang pieces (CPU), and its TP determinism.

Every TP rank runs its own adapter; wall clocks differ per rank. `patches/scheduler.py` makes
rank 0 stamp its clock on what it received (`stamp_clock`), SGLang's broadcast carries the stamp
to every rank, and each rank takes it out (`take_clock`) and hands it to its adapter. Two ranks
are played here by two `MiniScheduler`s (tests/test_scheduler_adapter.py: real Req,
PrefillAdder, ScheduleBatch, radix cache) fed the same requests, each with its own local clock.
"""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from patches import scheduler as patch
from sglang_batchllm.runtime.scheduler import AdapterSettings, SchedulerAdapter
from test_scheduler_adapter import (  # noqa: F401  (fixtures)
    MiniScheduler, assert_all_finished_once, cpu_paged_kernels, fresh_stats, member, published_config,
)

GATHER_MS = 20


def _rank(gather_ms=GATHER_MS) -> MiniScheduler:
    sched = MiniScheduler(page_size=1, pool_tokens=2048)
    sched.adapter = SchedulerAdapter(
        AdapterSettings(page_size=1, capacity=2048, min_prefix_tokens=32, gather_ms=gather_ms), sched.tree_cache)
    # a 48-token prefix computes in under 1 ms at the H200 rate, which would end every hold
    # before the next 4 ms iteration; a slow engine's rate lets the 20 ms bound be the limit
    sched.adapter.admission = dataclasses.replace(sched.adapter.admission, prefill_tokens_per_s=1000.0)
    return sched


def _trickle():
    """A long lone request (its prefill takes 5 chunked steps, so the queue backs up), then one
    request per loop iteration: members of 3 groups interleaved, then another lone one."""
    order = [(g, m) for m in range(3) for g in range(3)]
    return [[(8, 0)]] + [[(g, m)] for g, m in order] + [[]] * 4 + [[(9, 0)]]


def _req(g, m):
    return member(g, m, prefix_len=300) if g == 8 else member(g, m)


def _run(ranks, clocks, stamped: bool, monkeypatch):
    """Drive every rank through the same iterations. Rank 0 reads its clock and stamps what it
    received; the stamp crosses to the other ranks pickled, as broadcast_pyobj sends it. With
    stamped=False each rank uses its own clock instead (what the patch exists to avoid)."""
    arrivals = _trickle()
    held = [[] for _ in ranks]
    for it in range(400):
        batch = arrivals[it] if it < len(arrivals) else []
        monkeypatch.setattr(patch, "_adapter", ranks[0].adapter)
        recv0 = patch.stamp_clock([_req(g, m) for g, m in batch], clock=lambda: clocks[0](it))
        wire = pickle.loads(pickle.dumps(recv0))
        for r, sched in enumerate(ranks):
            got = recv0 if r == 0 else [_req(g, m) for g, m in batch] + [
                x for x in wire if isinstance(x, patch.ClockStamp)]
            reqs, now = patch.take_clock(got)
            assert not any(isinstance(x, patch.ClockStamp) for x in reqs), "SGLang never sees a stamp"
            if not stamped:
                now = clocks[r](it)
            if now is not None:
                sched.adapter.set_clock(now)
            sched.submit(reqs)
            sched.step()
            held[r].append(sched.adapter.last_held)
        if it > len(arrivals) and all(s.idle() for s in ranks):
            break
    return held


def test_ranks_with_different_clocks_decide_identically(monkeypatch):
    ranks = [_rank(), _rank()]
    clocks = [lambda it: 1000.0 + it * 0.004, lambda it: 7.5 + it * 0.0061]  # offset and rate differ
    held = _run(ranks, clocks, stamped=True, monkeypatch=monkeypatch)
    a, b = ranks
    assert a.admitted_order == b.admitted_order and a.extend_by_rid == b.extend_by_rid
    assert held[0] == held[1] and any(held[0]), "the hold ran, the same way on both ranks"
    for sched in ranks:
        assert sched.tree_cache.live_pins() == 0
        sched.assert_drained()


def test_local_clocks_would_make_ranks_diverge(monkeypatch):
    """The control: the same run with each rank on its own clock decides differently, so the
    test above shows the stamp at work (it could fail)."""
    ranks = [_rank(), _rank()]
    clocks = [lambda it: 1000.0 + it * 0.004, lambda it: 7.5 + it * 0.0061]
    held = _run(ranks, clocks, stamped=False, monkeypatch=monkeypatch)
    assert held[0] != held[1]


def test_gathered_trickle_requests_compute_their_prefix_once(monkeypatch):
    sched = _rank()
    held = _run([sched], [lambda it: it * 0.004], stamped=True, monkeypatch=monkeypatch)
    assert any(held[0])
    # every group's prefix (48 tokens) once: each leader its whole prompt, every other member its suffix
    per_group: dict[str, list[str]] = {}
    for rid in sched.admitted_order:
        per_group.setdefault(rid.split("m")[0], []).append(rid)
    for g, rids in per_group.items():
        if g in ("g8", "g9"):
            continue
        assert sched.extend_by_rid[rids[0]] == 56, (g, rids, sched.extend_by_rid)
        assert all(sched.extend_by_rid[r] == 8 for r in rids[1:]), (g, rids, sched.extend_by_rid)
    sched.assert_drained()


def test_a_lone_request_is_never_held(monkeypatch):
    sched = _rank()
    sched.adapter.set_clock(0.0)
    sched.submit([member(5, 0)])
    sched.step()
    assert sched.adapter.last_held == 0 and sched.admitted_order == ["g5m0"], "admitted at once"


def test_no_stamp_without_anything_to_time(monkeypatch):
    monkeypatch.setattr(patch, "_adapter", None)
    assert patch.stamp_clock([], clock=lambda: 1.0) == []
    assert patch.stamp_clock(None, clock=lambda: 1.0) is None, "other ranks get it through the broadcast"
    out = patch.stamp_clock(["req"], clock=lambda: 2.5)
    assert out[-1] == patch.ClockStamp(2.5)
    assert patch.take_clock(out) == (["req"], 2.5)
