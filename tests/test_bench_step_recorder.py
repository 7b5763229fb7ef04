"""The scheduler-side step recorder (step_recorder.py): what it records (BatchLLM's counters
too), that its wrappers change nothing, that it reaches the spawned scheduler through a
picklable `run_scheduler_process_func`, and reading the log back (step_log.py)."""

import pickle
from types import SimpleNamespace

import pytest

from sglang_batchllm.bench import step_recorder
from sglang_batchllm.bench.step_log import StepLog, StepTail
from sglang_batchllm.bench.step_recorder import (
    BATCHLLM_STEP_FIELDS,
    StepWriter,
    record_and_run_scheduler,
    step_fields,
    with_step_recorder,
)


@pytest.fixture(scope="module")
def sglang_scheduler():
    """SGLang's real classes (a ~10 s import on a CPU)."""
    from sglang.srt.managers import scheduler
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(module=scheduler, Scheduler=scheduler.Scheduler, ScheduleBatch=ScheduleBatch, ForwardMode=ForwardMode)


def fake_scheduler(total=1000, available=600, evictable=150):
    return SimpleNamespace(
        max_total_num_tokens=total,
        page_size=1,
        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: available),
        tree_cache=SimpleNamespace(evictable_size=lambda: evictable),
    )


def fake_batch(mode, reqs, extend_num_tokens=None, decoding=None):
    return SimpleNamespace(forward_mode=mode, reqs=list(range(reqs)), batch_size=lambda: reqs,
                           extend_num_tokens=extend_num_tokens, decoding_reqs=decoding)


def test_step_fields_per_forward_mode(sglang_scheduler):
    fm = sglang_scheduler.ForwardMode
    s = fake_scheduler()
    extend = step_fields(s, fake_batch(fm.EXTEND, 3, extend_num_tokens=700))
    assert extend == {"mode": "EXTEND", "reqs": 3, "prefill": 700, "decode": 0, "kv_used": 400, "kv_evictable": 150}
    # MIXED: SGLang adds one extend token per running decode request (mix_with_running)
    mixed = step_fields(s, fake_batch(fm.MIXED, 10, extend_num_tokens=508, decoding=list(range(8))))
    assert (mixed["prefill"], mixed["decode"]) == (500, 8)
    decode = step_fields(s, fake_batch(fm.DECODE, 64))
    assert (decode["prefill"], decode["decode"]) == (0, 64)
    idle = step_fields(s, fake_batch(fm.IDLE, 0))
    assert (idle["prefill"], idle["decode"]) == (0, 0)


def clocked_writer(path):
    """A StepWriter on a hand-set clock (`now[0]`), and `at(t, kind, **fields)` writing a record
    at t."""
    now = [0.0]
    w = StepWriter(path, clock=lambda: now[0])

    def at(t, kind, **fields):
        now[0] = t
        w.write(kind, **fields)

    return w, at, now


def test_writer_and_log_round_trip(tmp_path):
    path = tmp_path / "steps.jsonl"
    w, at, now = clocked_writer(path)

    at(1, "header", kv_total=1000, page_size=1, batchllm_active=False)
    at(2, "step", mode="EXTEND", reqs=2, prefill=900, decode=0, kv_used=950, kv_evictable=0)
    at(3, "step", mode="DECODE", reqs=2, prefill=0, decode=2, kv_used=952, kv_evictable=600)
    at(4, "retract", reqs=1)
    at(5, "retract", reqs=0)
    at(6, "step", mode="MIXED", reqs=3, prefill=100, decode=2, kv_used=990, kv_evictable=100)
    now[0] = 7
    w.idle()  # the last write flushed already: the marker must still be written
    log = StepLog.read(path)
    assert log.header["kv_total"] == 1000 and log.idle_times == [7]
    s = log.summary()
    assert (s.steps, s.prefill_tokens, s.decode_tokens) == (3, 1000, 4)
    assert (s.retractions, s.retracted_requests) == (1, 1)
    assert (s.peak_kv_used, s.peak_kv_held, s.max_step_tokens, s.kv_total) == (990, 950, 900, 1000)
    inside = log.window(2.5, 6.5)
    assert [x["mode"] for x in inside.steps] == ["DECODE", "MIXED"] and inside.header == log.header
    series = inside.series(t0=2.5)
    assert series["t"] == [0.5, 3.5] and series["kv_held"] == [352, 890]
    now[0] = 8
    w.idle()  # nothing new: no second marker
    assert StepLog.read(path).idle_times == [7]


def test_writer_flushes_on_a_timer_and_when_idle(tmp_path):
    now = [0.0]
    path = tmp_path / "steps.jsonl"
    w = StepWriter(path, clock=lambda: now[0])
    w.write("step", mode="DECODE", reqs=1, prefill=0, decode=1, kv_used=1, kv_evictable=0)
    assert path.read_text() == ""  # buffered: writing stays cheap
    now[0] = 0.6
    w.write("step", mode="DECODE", reqs=1, prefill=0, decode=1, kv_used=2, kv_evictable=0)
    assert len(StepLog.read(path).steps) == 2
    w.write("step", mode="DECODE", reqs=1, prefill=0, decode=1, kv_used=3, kv_evictable=0)
    w.idle()
    log = StepLog.read(path)
    assert len(log.steps) == 3 and log.idle_times == [0.6]


def test_tail_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "steps.jsonl"
    tail = StepTail(path)
    assert tail.poll() == []
    path.write_text('{"kind":"step","t":1}\n{"kind":"st')
    assert tail.poll() == [{"kind": "step", "t": 1}]
    with path.open("a") as f:
        f.write('ep","t":2}\n')
    assert tail.poll() == [{"kind": "step", "t": 2}]
    assert tail.poll() == []


def a_run_scheduler_process(server_args, port_args, gpu_id, tp_rank, attn_cp_rank, moe_dp_rank,
                            moe_ep_rank, pp_rank, dp_rank, pipe_writer):
    return ("ran", tp_rank, pp_rank)


@pytest.mark.parametrize("tp_rank, pp_rank, installs", [(0, 0, True), (1, 0, False), (0, 1, False)])
def test_only_rank_zero_records(monkeypatch, tp_rank, pp_rank, installs):
    installed = []
    monkeypatch.setattr(step_recorder, "install_step_recorder", installed.append)
    args = ("sa", "pa", 0, tp_rank, 0, 0, 0, pp_rank, None, "pipe")
    assert record_and_run_scheduler("/x.jsonl", a_run_scheduler_process, *args) == ("ran", tp_rank, pp_rank)
    assert installed == (["/x.jsonl"] if installs else [])


def test_engine_subclass_chains_the_class_function_and_pickles(sglang_scheduler):
    from sglang.srt.entrypoints.engine import Engine

    cls = with_step_recorder(Engine, "/tmp/steps.jsonl")
    assert issubclass(cls, Engine)
    func = cls.run_scheduler_process_func
    assert func.func is record_and_run_scheduler
    assert func.args == ("/tmp/steps.jsonl", sglang_scheduler.module.run_scheduler_process)
    clone = pickle.loads(pickle.dumps(func))  # spawn pickles the Process target
    assert clone.func is record_and_run_scheduler and clone.args == func.args


def test_batchllm_engine_keeps_sglang_scheduler_entry(sglang_scheduler):
    """sglang_batchllm.Engine does not override run_scheduler_process_func, so both engines are
    measured by the same wrapper around the same function."""
    import sglang_batchllm

    func = with_step_recorder(sglang_batchllm.Engine, "/tmp/s.jsonl").run_scheduler_process_func
    assert func.args[1] is sglang_scheduler.module.run_scheduler_process


def test_installed_wrappers_delegate_unchanged(monkeypatch, tmp_path, sglang_scheduler):
    calls = []

    def run_batch(self, batch, *a, **kw):
        calls.append(("run_batch", batch, a, kw))
        return "result"

    def on_idle(self):
        calls.append(("on_idle",))

    def retract_decode(self, server_args):
        calls.append(("retract", server_args))
        return (["r1", "r2"], 0.5, [])

    Scheduler, ScheduleBatch = sglang_scheduler.Scheduler, sglang_scheduler.ScheduleBatch
    monkeypatch.setattr(Scheduler, "run_batch", run_batch)
    monkeypatch.setattr(Scheduler, "on_idle", on_idle)
    monkeypatch.setattr(ScheduleBatch, "retract_decode", retract_decode)
    monkeypatch.setattr(step_recorder, "_writer", None)
    monkeypatch.setattr("sglang.srt.plugins.load_plugins", lambda: None)
    monkeypatch.setattr(step_recorder, "install_compile_recorder", lambda writer: None)
    path = tmp_path / "steps.jsonl"
    step_recorder.install_step_recorder(path)

    s, b = fake_scheduler(), fake_batch(sglang_scheduler.ForwardMode.DECODE, 4)
    assert Scheduler.run_batch(s, b, "x", k=1) == "result"
    assert ScheduleBatch.retract_decode(b, "sa") == (["r1", "r2"], 0.5, [])
    assert Scheduler.on_idle(s) is None
    assert calls == [("run_batch", b, ("x",), {"k": 1}), ("retract", "sa"), ("on_idle",)]
    log = StepLog.read(path)
    assert log.header["kv_total"] == 1000 and log.header["batchllm_active"] is False
    assert [x["decode"] for x in log.steps] == [4] and log.retractions[0]["reqs"] == 2 and len(log.idle_times) == 1

    # a batch the recorder cannot read: the scheduler's call still goes through, recording stops
    assert Scheduler.run_batch(s, SimpleNamespace()) == "result"
    assert Scheduler.run_batch(s, b) == "result"
    assert len(StepLog.read(path).steps) == 1


def test_batchllm_counters_join_the_step_record_when_active(monkeypatch, tmp_path, sglang_scheduler):
    from sglang_batchllm.runtime.stats import STATS

    Scheduler = sglang_scheduler.Scheduler
    monkeypatch.setattr(Scheduler, "run_batch", lambda self, batch: "result")
    monkeypatch.setattr(step_recorder, "_writer", None)
    monkeypatch.setattr("sglang.srt.plugins.load_plugins", lambda: None)
    monkeypatch.setattr(step_recorder, "install_compile_recorder", lambda writer: None)
    path = tmp_path / "steps.jsonl"
    writer = step_recorder.install_step_recorder(path)
    s, b = fake_scheduler(), fake_batch(sglang_scheduler.ForwardMode.DECODE, 4)

    monkeypatch.setattr(STATS, "active", False)
    Scheduler.run_batch(s, b)  # a vanilla scheduler: no BatchLLM fields
    for name, value in [("active", True), ("groups_live", 3), ("pinned_tokens", 6000), ("prefix_tokens_planned", 8000),
                        ("prefix_tokens_computed", 6000), ("prefix_recomputations", 2), ("decode_rows", 40),
                        ("cascade_rows", 32), ("cascade_shared_rows", 30), ("extend_rows", 7),
                        ("extend_shared_rows", 6)]:
        monkeypatch.setattr(STATS, name, value)
    Scheduler.run_batch(s, b)
    monkeypatch.setattr(STATS, "snapshot", lambda: {"active": True})  # unreadable: the step is still recorded
    Scheduler.run_batch(s, b)
    writer.flush()
    plain, counted, unreadable = StepLog.read(path).steps
    assert not set(BATCHLLM_STEP_FIELDS) & set(plain)
    assert {k: counted[k] for k in BATCHLLM_STEP_FIELDS} == {
        "groups_live": 3, "pinned_tokens": 6000, "prefix_tokens_planned": 8000, "prefix_tokens_computed": 6000,
        "prefix_recomputations": 2, "decode_rows": 40, "cascade_rows": 32, "cascade_shared_rows": 30,
        "extend_rows": 7, "extend_shared_rows": 6}
    assert unreadable["decode"] == 4 and "pinned_tokens" not in unreadable and writer.enabled


def test_batchllm_counters_summed_over_the_window(tmp_path):
    now = [0.0]
    path = tmp_path / "steps.jsonl"
    w = StepWriter(path, clock=lambda: now[0])

    def step(t, pinned, groups, computed, recomputed):
        now[0] = t
        w.write("step", mode="DECODE", reqs=1, prefill=0, decode=1, kv_used=10, kv_evictable=0, groups_live=groups,
                pinned_tokens=pinned, prefix_tokens_planned=computed + 100, prefix_tokens_computed=computed,
                prefix_recomputations=recomputed)

    step(1, 500, 1, 1000, 1)  # before the window (warm-up): its counts are not the workload's
    step(2, 3000, 2, 1500, 1)
    step(3, 9000, 4, 4000, 3)
    step(4, 0, 0, 4000, 3)
    w.flush()
    s = StepLog.read(path).window(1.5, 4.5).summary()
    assert (s.batchllm_prefix_tokens_computed, s.batchllm_prefix_tokens_planned, s.batchllm_prefix_recomputations) == (3000, 3000, 2)
    assert (s.peak_pinned_tokens, s.peak_groups_live) == (9000, 4)
    series = StepLog.read(path).window(1.5, 4.5).series(1.5)
    assert series["pinned_tokens"] == [3000, 9000, 0] and series["groups_live"] == [2, 4, 0]
    assert StepLog.read(path).window(0, 9).summary().batchllm_prefix_tokens_computed == 4000  # no step before: from 0


def test_attention_row_counters_summed_over_the_window_when_recorded(tmp_path):
    now = [0.0]
    path = tmp_path / "steps.jsonl"
    w = StepWriter(path, clock=lambda: now[0])
    for t, rows, fused, shared in [(1, 10, 0, 0), (2, 300, 200, 150), (3, 700, 600, 560)]:
        now[0] = t
        w.write("step", mode="DECODE", reqs=1, prefill=0, decode=1, kv_used=10, kv_evictable=0, groups_live=1,
                pinned_tokens=5, prefix_tokens_planned=1, prefix_tokens_computed=1, prefix_recomputations=0,
                decode_rows=rows, cascade_rows=fused, cascade_shared_rows=shared)
    w.flush()
    s = StepLog.read(path).window(1.5, 3.5).summary()
    assert (s.batchllm_decode_rows, s.batchllm_cascade_rows, s.batchllm_cascade_shared_rows) == (690, 600, 560)


def test_step_times_are_gaps_between_launches_without_idle_in_between(tmp_path):
    now = [0.0]
    path = tmp_path / "steps.jsonl"
    w = StepWriter(path, clock=lambda: now[0])

    def step(t, mode, reqs):
        now[0] = t
        w.write("step", mode=mode, reqs=reqs, prefill=0, decode=reqs, kv_used=1, kv_evictable=0)

    step(1.00, "MIXED", 300)
    step(1.30, "DECODE", 256)  # mixed: 300 ms
    step(1.34, "DECODE", 256)  # 40 ms
    step(1.39, "DECODE", 250)  # 50 ms, then idle
    now[0] = 1.40
    w.idle()
    step(2.00, "DECODE", 10)  # last: not timed
    w.flush()
    s = StepLog.read(path).summary()
    assert (s.decode_steps_timed, round(s.decode_step_ms, 6), s.decode_step_rows) == (2, 45.0, 256)
    assert (s.mixed_steps_timed, round(s.mixed_step_ms, 6)) == (1, 300.0)


def test_step_time_totals_per_mode_and_compiles_inside_the_window(tmp_path):
    path = tmp_path / "steps.jsonl"
    w, record, _ = clocked_writer(path)

    step = dict(prefill=0, decode=1, kv_used=1, kv_evictable=0)
    record(0.5, "compile", name="early", s=2.0)  # warm-up: outside the window
    record(1.0, "step", mode="EXTEND", reqs=4, **step)
    record(1.2, "step", mode="MIXED", reqs=8, **step)  # extend: 200 ms
    record(1.25, "compile", name="_cascade_fwd_kernel", s=0.04)
    record(1.5, "step", mode="DECODE", reqs=8, **step)  # mixed: 300 ms
    record(1.55, "step", mode="DECODE", reqs=8, **step)  # decode: 50 ms
    record(1.6, "step", mode="DECODE", reqs=8, **step)  # decode: 50 ms, last: untimed
    w.flush()
    s = StepLog.read(path).window(1.0, 2.0).summary()
    assert (s.extend_steps_s, s.mixed_steps_s, round(s.decode_steps_s, 6)) == (0.2, 0.3, 0.1)
    assert (s.triton_compiles, s.triton_compile_s) == (1, 0.04)


def test_compile_recorder_writes_a_record_per_compile_and_chains_existing_hooks(monkeypatch, tmp_path):
    from triton import knobs

    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(("cache", kw["key"])))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(("post", kw["key"])))
    now = [10.0]
    path = tmp_path / "steps.jsonl"
    writer = StepWriter(path, clock=lambda: now[0])
    step_recorder.install_compile_recorder(writer)
    fn = SimpleNamespace(name="_merge_kernel")
    assert knobs.runtime.jit_cache_hook(key="k1", fn=fn, repr="r", compile={}, is_manual_warmup=False,
                                        already_compiled=False) is None  # None: go on and compile
    now[0] = 10.75
    knobs.runtime.jit_post_compile_hook(key="k1", fn=fn, repr="r", compile={}, is_manual_warmup=False,
                                        already_compiled=False)
    writer.flush()
    assert seen == [("cache", "k1"), ("post", "k1")]
    assert [(c["name"], c["s"]) for c in StepLog.read(path).compiles] == [("_merge_kernel", 0.75)]


def test_step_profiler_covers_count_steps_of_its_mode_after_skipping(tmp_path, sglang_scheduler):
    mode = sglang_scheduler.ForwardMode
    with pytest.raises(ValueError, match="MODE:SKIP:COUNT:PATH"):
        step_recorder.StepProfiler("DECODE:5")
    prof = step_recorder.StepProfiler(f"decode:1:2:{tmp_path / 'p'}")
    for m in (mode.EXTEND, mode.DECODE, mode.DECODE, mode.MIXED, mode.DECODE, mode.DECODE):
        prof.before_step(fake_batch(m, 1))
    # started before the second DECODE step, stopped before the step two steps later
    assert prof.prof is None and len(prof.step_t) == 3
    text = (tmp_path / "p.txt").read_text()
    assert text.startswith("2 DECODE steps after 1") and (tmp_path / "p.json.gz").stat().st_size > 0
