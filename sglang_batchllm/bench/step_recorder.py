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

There is no official per-step callback in 0.5.17, hence wrappers; the class is looked up after
`load_plugins()` so a plugin that REPLACEs `Scheduler` is wrapped too. Only TP rank 0 / PP rank
0 records. Times are `time.monotonic()`, the same clock in every process, so the benchmark
cuts the timed window out of the log by its own monotonic start and end. Tested in
tests/test_bench_step_recorder.py.

File format: JSON lines, `{"kind": "header"|"step"|"retract"|"idle", "t": ..., ...}`; flushed
every 0.5 s and whenever the scheduler goes idle (the engine kills the scheduler with SIGKILL on
shutdown, so nothing may wait for exit).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
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
    writer = _writer = StepWriter(path)
    scheduler_cls = scheduler_module.Scheduler
    run_batch, on_idle, retract_decode = scheduler_cls.run_batch, scheduler_cls.on_idle, ScheduleBatch.retract_decode

    header_written = False

    def record_step(self: Any, batch: Any) -> None:
        nonlocal header_written
        if not header_written:
            header_written = True
            writer.write("header", kv_total=self.max_total_num_tokens, page_size=self.page_size, **plugin)
        writer.write("step", **step_fields(self, batch))

    @functools.wraps(run_batch)
    def recorded_run_batch(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        writer.safely(record_step, self, batch)
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


# ---- benchmark side ---------------------------------------------------------------------


@dataclass(frozen=True)
class StepSummary:
    steps: int
    prefill_tokens: int
    decode_tokens: int
    retractions: int
    retracted_requests: int
    kv_total: int
    peak_kv_used: int
    peak_kv_held: int
    max_step_tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepLog:
    """A recorder file read back: steps, retractions and idle markers in time order."""

    header: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    retractions: list[dict] = field(default_factory=list)
    idle_times: list[float] = field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path) -> "StepLog":
        log = cls()
        p = Path(path)
        if p.exists():
            for rec in parse_lines(p.read_text()):
                log.add(rec)
        return log

    def add(self, rec: dict) -> None:
        kind = rec.get("kind")
        if kind == "header":
            self.header = rec
        elif kind == "step":
            self.steps.append(rec)
        elif kind == "retract":
            self.retractions.append(rec)
        elif kind == "idle":
            self.idle_times.append(rec["t"])

    def window(self, t0: float, t1: float) -> "StepLog":
        inside = lambda r: t0 <= r["t"] <= t1  # noqa: E731
        return StepLog(
            self.header,
            [s for s in self.steps if inside(s)],
            [r for r in self.retractions if inside(r)],
            [t for t in self.idle_times if t0 <= t <= t1],
        )

    def summary(self) -> StepSummary:
        s = self.steps
        return StepSummary(
            steps=len(s),
            prefill_tokens=sum(x["prefill"] for x in s),
            decode_tokens=sum(x["decode"] for x in s),
            retractions=sum(1 for r in self.retractions if r["reqs"] > 0),
            retracted_requests=sum(r["reqs"] for r in self.retractions),
            kv_total=self.header.get("kv_total", 0),
            peak_kv_used=max((x["kv_used"] for x in s), default=0),
            peak_kv_held=max((x["kv_used"] - x["kv_evictable"] for x in s), default=0),
            max_step_tokens=max((x["prefill"] + x["decode"] for x in s), default=0),
        )

    def series(self, t0: float) -> dict[str, list]:
        """Columns for the charts; KV held = in use and not evictable (running requests, pins)."""
        s = self.steps
        return {
            "t": [round(x["t"] - t0, 4) for x in s],
            "mode": [x["mode"] for x in s],
            "reqs": [x["reqs"] for x in s],
            "prefill": [x["prefill"] for x in s],
            "decode": [x["decode"] for x in s],
            "kv_used": [x["kv_used"] for x in s],
            "kv_held": [x["kv_used"] - x["kv_evictable"] for x in s],
        }


def parse_lines(text: str) -> list[dict]:
    """Complete JSON lines only: the last one may be half-written while the scheduler runs."""
    out = []
    for line in text.split("\n"):
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


class StepTail:
    """Reads records appended to a recorder file since the last call (for progress bars)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0
        self._partial = ""

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        text = self._partial + chunk
        complete, _, self._partial = text.rpartition("\n")
        return parse_lines(complete)
