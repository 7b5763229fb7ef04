"""Per-step measurement inside SGLang's scheduler process, identical for every engine.

How it reaches the scheduler: SGLang spawns the scheduler, so a patch made in the benchmark
process never reaches it. `sglang.Engine.run_scheduler_process_func` is the documented seam for
that (engine.py, "allow people to override ... for their private forks"): `with_step_recorder`
subclasses an engine class with a `functools.partial` of `record_and_run_scheduler`, which
installs the recorder and then calls the class's own function (SGLang's
`run_scheduler_process` for both `sglang.Engine` and `sglang_batchllm.Engine`; a class that
brings its own is chained, not replaced). The partial pickles by reference, so spawn works.

What it wraps (SGLang 0.5.17; measurement only: each wrapper reads plain ints and list
lengths, never syncs the GPU, never changes arguments or results, and switches itself off on
the first error instead of disturbing the scheduler):

- `Scheduler.run_batch`: one call per forward step, after the step's KV is allocated. Records
  time, forward mode, requests, prefill tokens computed (extend tokens, i.e. not served from
  the radix cache; for MIXED minus its decode tokens), decode tokens, KV slots in use and
  evictable.
- `ScheduleBatch.retract_decode`: the only retraction path of a decode batch. Records the
  number of requests retracted.
- `Scheduler.on_idle`: the scheduler has nothing to run. Writes an "idle" marker and flushes.
- Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook` / `jit_post_compile_hook`, chained
  to any hook already set): a "compile" record per kernel variant compiled in this process,
  with its name and seconds. A compile inside the timed window is a step that stalled for it
  (a kernel specialized on a value that varies per step, e.g. a pointer's alignment).

`BATCHLLM_BENCH_PROFILE=MODE:SKIP:COUNT:PATH` (a diagnosis aid, off by default) runs
torch's profiler over COUNT steps from the (SKIP+1)-th step of forward mode MODE (e.g.
`DECODE:300:5:/tmp/prof`), then writes PATH.txt (device time by kernel, host time by op) and
PATH.json.gz (a chrome trace). The profiled steps are slower: such a run times nothing.

In a BatchLLM run each step record also carries BatchLLM's own counters
(`sglang_batchllm.runtime.stats`, read before the step runs): `BATCHLLM_STEP_FIELDS`. They are
left out when no BatchLLM scheduler adapter runs in the process (`STATS.active` false, e.g. the
vanilla runs) and whenever reading them fails, which never stops the recorder.

There is no official per-step callback in 0.5.17, hence wrappers; the class is looked up after
`load_plugins()` so a plugin that REPLACEs `Scheduler` is wrapped too. Only TP rank 0 / PP rank
0 records. Times are `time.monotonic()`, the same clock in every process, so the benchmark
cuts the timed window out of the log by its own monotonic start and end. Tested in
tests/test_bench_step_recorder.py.

File format: JSON lines, `{"kind": "header"|"step"|"retract"|"idle", "t": ..., ...}`; flushed
every 0.5 s and whenever the scheduler goes idle (the engine kills the scheduler with SIGKILL on
shutdown, so nothing may wait for exit). step_log.py reads it back.
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5


class StepWriter:
    """Appends records to a JSONL file; the only thing the scheduler side writes with."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._file = open(path, "a", buffering=1 << 16)
        self._last_flush = clock()
        self._unflushed = False
        self._since_idle = False  # records written since the last idle marker
        self.enabled = True

    def write(self, kind: str, **fields: Any) -> None:
        now = self.clock()
        self._file.write(json.dumps({"kind": kind, "t": now, **fields}, separators=(",", ":")) + "\n")
        self._unflushed = True
        self._since_idle = kind != "idle"
        if now - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def idle(self) -> None:
        """Mark the end of a burst of records (once per burst) and make everything readable."""
        if self._since_idle:
            self.write("idle")
        if self._unflushed:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._last_flush = self.clock()
        self._unflushed = False

    def safely(self, fn: Callable[..., None], *args: Any) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception:  # a measurement bug must never take the scheduler down
            self.enabled = False
            logger.exception("step recorder disabled after an error")


# ---- scheduler side ---------------------------------------------------------------------


def step_fields(scheduler: Any, batch: Any) -> dict:
    """What one forward step computes and how full the KV pool is when it runs."""
    mode = batch.forward_mode
    reqs = batch.batch_size()
    if mode.is_extend():
        decode = len(batch.decoding_reqs or ()) if mode.is_mixed() else 0
        prefill = (batch.extend_num_tokens or 0) - decode
    elif mode.is_decode():
        prefill, decode = 0, reqs
    else:
        prefill = decode = 0
    total = scheduler.max_total_num_tokens
    return {
        "mode": mode.name,
        "reqs": reqs,
        "prefill": prefill,
        "decode": decode,
        "kv_used": total - scheduler.token_to_kv_pool_allocator.available_size(),
        "kv_evictable": scheduler.tree_cache.evictable_size(),
    }


# sglang_batchllm.runtime.stats.SchedulerStats fields in a step record. Gauges: groups_live,
# pinned_tokens. Counters since the process started: prefix_tokens_planned (the shared prefixes
# of the groups opened), prefix_tokens_computed (what the group leaders prefilled of them),
# prefix_recomputations (a member prefilled part of its group's prefix again).
BATCHLLM_GAUGES = ("groups_live", "pinned_tokens")
# decode_rows / cascade_rows / cascade_shared_rows: decode rows the batchllm attention backend
# planned, ran on the fused kernel, and of those read a prefix shared with other rows;
# extend_rows / extend_shared_rows: prefill rows on the fused kernel, and of those sharing.
ATTENTION_COUNTERS = ("decode_rows", "cascade_rows", "cascade_shared_rows", "extend_rows", "extend_shared_rows")
BATCHLLM_COUNTERS = ("prefix_tokens_planned", "prefix_tokens_computed", "prefix_recomputations") + ATTENTION_COUNTERS
BATCHLLM_STEP_FIELDS = BATCHLLM_GAUGES + BATCHLLM_COUNTERS


def batchllm_step_fields(stats: Any) -> dict:
    """BatchLLM's counters for a step record; {} when its scheduler adapter is not active here
    or when they cannot be read (a measurement extra must not cost the step record)."""
    try:
        if stats is None or not stats.active:
            return {}
        snap = stats.snapshot()
        return {k: int(snap[k]) for k in BATCHLLM_STEP_FIELDS}
    except Exception:
        return {}


def _batchllm_stats() -> Any:
    """The scheduler process's `SchedulerStats`, or None where the module cannot be imported:
    imported when the recorder is installed, not with this module, so that a broken or missing
    runtime module costs the BatchLLM fields only, never the recorder."""
    try:
        from sglang_batchllm.runtime.stats import STATS

        return STATS
    except Exception:
        return None


def install_compile_recorder(writer: StepWriter) -> None:
    """A "compile" record per Triton kernel variant compiled in this process."""
    try:
        from triton import knobs
    except Exception:  # no Triton here (or an older one): nothing to record
        return
    runtime = knobs.runtime
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook
    started: dict[str, float] = {}

    def cache_hook(*, key, fn, **kwargs):
        started[str(key)] = writer.clock()
        return before(key=key, fn=fn, **kwargs) if before else None

    def post_compile_hook(*, key, fn, **kwargs):
        t0 = started.pop(str(key), None)
        name = getattr(fn, "name", None) or str(fn)
        seconds = None if t0 is None else round(writer.clock() - t0, 4)
        writer.safely(lambda: writer.write("compile", name=name, s=seconds))
        return after(key=key, fn=fn, **kwargs) if after else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = cache_hook, post_compile_hook


PROFILE_ENV = "BATCHLLM_BENCH_PROFILE"


class StepProfiler:
    """torch's profiler over a few steps of one forward mode (`PROFILE_ENV`, module doc)."""

    def __init__(self, spec: str):
        try:
            mode, skip, count, path = spec.split(":", 3)
            self.mode, self.skip, self.count, self.path = mode.upper(), int(skip), int(count), path
        except ValueError:
            raise ValueError(f"{PROFILE_ENV}={spec!r}: expected MODE:SKIP:COUNT:PATH, e.g. DECODE:300:5:/tmp/prof")
        self.seen = 0  # steps of `mode` seen so far
        self.left = None  # steps still to profile once started
        self.prof = None
        self.step_t: list[float] = []
        self.enabled = True

    def before_step(self, batch: Any) -> None:
        if self.left is None and batch.forward_mode.name == self.mode:
            self.seen += 1
            if self.seen > self.skip:
                import torch

                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.left = self.count
        if self.left is not None and self.prof is not None:
            self.step_t.append(time.monotonic())
            if self.left == 0:
                self._finish()
            self.left -= 1

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        averages = prof.key_averages()
        gaps = [round((b - a) * 1e3, 2) for a, b in zip(self.step_t, self.step_t[1:])]
        with open(self.path + ".txt", "w") as f:
            f.write(f"{self.count} {self.mode} steps after {self.skip}; launch-to-launch ms: {gaps}\n\n")
            f.write(averages.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90))
            f.write("\n\n")
            f.write(averages.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=90))
        prof.export_chrome_trace(self.path + ".json")
        with open(self.path + ".json", "rb") as src, gzip.open(self.path + ".json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.unlink(self.path + ".json")
        logger.warning("step profile written to %s.txt", self.path)


_writer: StepWriter | None = None


def install_step_recorder(path: str | Path) -> StepWriter:
    """Wrap the scheduler's step, retraction and idle paths in this process (idempotent)."""
    global _writer
    if _writer is not None:
        return _writer
    from sglang.srt.managers import scheduler as scheduler_module
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.plugins import load_plugins

    load_plugins()  # idempotent; run_scheduler_process calls it again as a no-op
    plugin = _plugin_state()
    stats = _batchllm_stats()
    writer = _writer = StepWriter(path)
    scheduler_cls = scheduler_module.Scheduler
    run_batch, on_idle, retract_decode = scheduler_cls.run_batch, scheduler_cls.on_idle, ScheduleBatch.retract_decode

    header_written = False
    install_compile_recorder(writer)
    spec = os.environ.get(PROFILE_ENV)
    profiler = StepProfiler(spec) if spec else None

    def record_step(self: Any, batch: Any) -> None:
        nonlocal header_written
        if not header_written:
            header_written = True
            writer.write("header", kv_total=self.max_total_num_tokens, page_size=self.page_size, **plugin)
        writer.write("step", **step_fields(self, batch), **batchllm_step_fields(stats))

    @functools.wraps(run_batch)
    def recorded_run_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        writer.safely(record_step, self, batch)
        if profiler is not None and profiler.enabled:
            try:
                profiler.before_step(batch)
            except Exception:  # a diagnosis aid: never the step record, never the scheduler
                profiler.enabled = False
                logger.exception("step profiler disabled after an error")
        return run_batch(self, batch, *args, **kwargs)

    @functools.wraps(on_idle)
    def recorded_on_idle(self: Any, *args: Any, **kwargs: Any) -> Any:
        writer.safely(writer.idle)
        return on_idle(self, *args, **kwargs)

    @functools.wraps(retract_decode)
    def recorded_retract_decode(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = retract_decode(self, *args, **kwargs)
        writer.safely(lambda: writer.write("retract", reqs=len(result[0])))
        return result

    scheduler_cls.run_batch = recorded_run_batch
    scheduler_cls.on_idle = recorded_on_idle
    ScheduleBatch.retract_decode = recorded_retract_decode
    return writer


def _plugin_state() -> dict:
    """Whether BatchLLM's plugin is active in this scheduler process (the benchmark checks
    that it is in the BatchLLM run and is not in the vanilla run)."""
    try:
        from sglang_batchllm.plugin import active_config

        config = active_config()
        return {"batchllm_active": config is not None, "batchllm_config": repr(config) if config else None}
    except Exception as exc:  # report, never break the scheduler
        return {"batchllm_active": None, "batchllm_config": f"unknown ({type(exc).__name__}: {exc})"}


def record_and_run_scheduler(steps_path: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A `run_scheduler_process_func`: install the recorder (rank 0 only), then run `inner`."""
    ranks = inspect.signature(inner).bind_partial(*args, **kwargs).arguments
    if not ranks.get("tp_rank") and not ranks.get("pp_rank"):
        install_step_recorder(steps_path)
    return inner(*args, **kwargs)


def with_step_recorder(engine_cls: type, steps_path: str | Path) -> type:
    """`engine_cls` whose scheduler process records its steps to `steps_path`."""
    inner = engine_cls.run_scheduler_process_func
    func = functools.partial(record_and_run_scheduler, str(steps_path), inner)
    return type(
        f"StepRecorded{engine_cls.__name__}",
        (engine_cls,),
        {"run_scheduler_process_func": staticmethod(func), "__module__": __name__},
    )
