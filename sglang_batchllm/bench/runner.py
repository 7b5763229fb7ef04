"""Run one engine over a list of workloads and collect what happened.

`run_workloads(engine, ...)` takes any object with SGLang's offline-engine methods
(`generate(input_ids=, sampling_params=, rid=)`, `flush_cache()`, `get_server_info()`), so tests
drive it with a fake. For each workload: flush the radix cache, let the arm's driver
(drivers.py) split the workload into `generate` calls (by default ONE call with the whole
workload: the scheduler then sees the whole batch at once, as in docs/baseline.md), send the
calls one after the other in one timed region (`time.monotonic()`), put the outputs back in
workload order, and cut that window out of the scheduler's step log.

`python -m sglang_batchllm.bench.runner SPEC.json` is one engine run in a process of its own:
it rebuilds the workloads from their seeds, checks their fingerprints against the parent's,
starts the engine (untimed), warms it up (untimed), runs the workloads, shuts the engine down
and writes the result JSON. One process per engine means each engine starts on an empty GPU
and a clean interpreter (SGLang's `load_plugins()` runs once per process, so a vanilla engine
and a BatchLLM engine in one process would share whatever the first one loaded); the process
exit is the guarantee that the first engine's GPU memory is gone before the second starts.
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .drivers import DRIVERS
from .model import ModelShape, TokenRange
from .step_log import StepLog, StepTail, parse_lines
from .step_recorder import with_step_recorder
from .workloads import BenchRequest, Workload, WorkloadSpec

# docs/baseline.md: what every engine of the benchmark runs with (the CLI adds model_path and
# attention_backend; `--engine-arg` may add more, for every arm alike).
BASE_ENGINE_KWARGS: dict[str, Any] = {
    "load_format": "dummy",
    "skip_tokenizer_init": True,
    "sampling_backend": "pytorch",
    "grammar_backend": "none",
    "mem_fraction_static": 0.80,
}
SAMPLING: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}


def _vanilla() -> type:
    # the class itself: `sglang.Engine` is a LazyImport proxy, which cannot be subclassed
    from sglang.srt.entrypoints.engine import Engine

    return Engine


def _batchllm() -> type:
    import sglang_batchllm

    return sglang_batchllm.Engine


def _recorded(load_class: Callable[[], type]) -> Callable[[str, dict], Any]:
    def start(steps_path: str, kwargs: dict) -> Any:
        return with_step_recorder(load_class(), steps_path)(**kwargs)

    return start


def _fake(steps_path: str, kwargs: dict) -> Any:
    from .fake import FakeEngine

    return FakeEngine(steps_path, **kwargs)


# engine name -> start(steps_path, engine kwargs) -> a started engine whose steps are recorded
ENGINES: dict[str, Callable[[str, dict], Any]] = {
    "vanilla": _recorded(_vanilla),
    "batchllm": _recorded(_batchllm),
    "fake": _fake,
}


def engine_class_name(engine: Any) -> str:
    cls = type(engine)
    if cls.__name__.startswith("StepRecorded"):
        cls = cls.__bases__[0]
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass
class RunSpec:
    """Everything an engine process needs; written by the parent as JSON."""

    engine: str
    engine_kwargs: dict
    model_dir: str
    workloads: list[dict]
    fingerprints: dict[str, str]
    steps_path: str
    result_path: str
    progress: str = "tty"  # tty | lines | off
    warmup: bool = True
    driver: str = "one-call"  # drivers.DRIVERS key

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunSpec":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class WorkloadRun:
    name: str
    fingerprint: str
    t_start: float
    t_end: float
    outputs: dict[str, list[int]]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    steps: dict  # StepSummary.to_dict()
    series: dict  # StepLog.series()
    driver: dict  # CallPlan.info: the driver, its generate calls (and for waves: W, the pool)
    complete_log: bool = True

    @property
    def wall_s(self) -> float:
        return self.t_end - self.t_start

    def to_dict(self) -> dict:
        return {**asdict(self), "wall_s": self.wall_s}


# ---- the engine-independent core ---------------------------------------------------------


def warm_up(engine: Any, tokens: TokenRange) -> None:
    """Two small batches: the second reuses the first's prefix, so prefill with a cached prefix,
    plain prefill and decode all run (and JIT-compile) before anything is timed."""
    rng = random.Random("warmup")
    prefix = [tokens.lo + rng.randrange(tokens.size) for _ in range(256)]
    for round_ in range(2):
        ids = [prefix + [tokens.lo + rng.randrange(tokens.size) for _ in range(32)] for _ in range(8)]
        engine.generate(
            input_ids=ids,
            sampling_params=[{**SAMPLING, "max_new_tokens": 8}] * len(ids),
            rid=[f"warmup/{round_}-{i}" for i in range(len(ids))],
        )


def flush_cache(engine: Any, attempts: int = 50) -> None:
    """Empty the radix cache so each workload starts cold; retried while the scheduler drains."""
    for _ in range(attempts):
        result = engine.flush_cache()
        if getattr(result, "success", result) in (True, None):
            return
        time.sleep(0.2)
    print("warning: flush_cache kept failing; the workload starts with a warm cache", file=sys.stderr)


def run_workload(engine: Any, workload: Workload, steps_path: str | Path, progress: str = "off",
                 driver: str = "one-call") -> WorkloadRun:
    reqs = workload.requests
    plan = DRIVERS[driver](engine, workload)
    calls = [_call_arguments(reqs, call) for call in plan.calls]  # built before the clock starts
    by_index: dict[int, dict] = {}
    with _Progress(steps_path, workload, progress) as bar:
        t0 = time.monotonic()
        bar.start(t0)
        for call, kwargs in zip(plan.calls, calls):
            by_index.update(zip(call, engine.generate(**kwargs)))
        t1 = time.monotonic()
    outs = [by_index[i] for i in range(len(reqs))]  # workload order, whatever the calls' order
    complete = _wait_for_idle(steps_path, t0)
    log = StepLog.read(steps_path).window(t0, t1)
    metas = [o.get("meta_info", {}) for o in outs]
    return WorkloadRun(
        name=workload.name,
        fingerprint=workload.fingerprint(),
        t_start=t0,
        t_end=t1,
        outputs={r.rid: list(o["output_ids"]) for r, o in zip(reqs, outs)},
        prompt_tokens=sum(m.get("prompt_tokens", 0) for m in metas),
        completion_tokens=sum(m.get("completion_tokens", len(o["output_ids"])) for m, o in zip(metas, outs)),
        cached_tokens=sum(m.get("cached_tokens", 0) for m in metas),
        steps=log.summary().to_dict(),
        series=log.series(t0),
        driver=plan.info,
        complete_log=complete,
    )


def _call_arguments(reqs: Sequence[BenchRequest], call: Sequence[int]) -> dict:
    return {
        "input_ids": [list(reqs[i].input_ids) for i in call],
        "sampling_params": [{**SAMPLING, "max_new_tokens": reqs[i].max_new_tokens} for i in call],
        "rid": [reqs[i].rid for i in call],
    }


def run_workloads(
    engine: Any, workloads: Sequence[Workload], steps_path: str | Path, tokens: TokenRange,
    progress: str = "off", warmup: bool = True, driver: str = "one-call",
) -> list[WorkloadRun]:
    if warmup:
        warm_up(engine, tokens)
    runs = []
    for w in workloads:
        flush_cache(engine)
        runs.append(run_workload(engine, w, steps_path, progress, driver))
    return runs


def _wait_for_idle(steps_path: str | Path, t0: float, timeout_s: float = 10.0, settle_s: float = 0.2) -> bool:
    """The scheduler flushes its log when it goes idle. Wait until the log ends in an idle
    marker written during this workload and has stopped growing (an idle moment in mid-run
    also writes a marker; the final one follows within milliseconds of the last output)."""
    path = Path(steps_path)
    deadline = time.monotonic() + timeout_s
    size, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now_size = path.stat().st_size if path.exists() else 0
        if now_size != size:
            size, stable_since = now_size, time.monotonic()
        last = _last_record(path, size)
        if last.get("kind") == "idle" and last["t"] >= t0 and time.monotonic() - stable_since >= settle_s:
            return True
        time.sleep(0.05)
    print(f"warning: the step log {steps_path} did not end in an idle marker; per-step data may be cut", file=sys.stderr)
    return False


def _last_record(path: Path, size: int, tail_bytes: int = 4096) -> dict:
    if size <= 0:
        return {}
    with path.open("rb") as f:
        f.seek(max(0, size - tail_bytes))
        text = f.read(tail_bytes).decode(errors="replace")
    records = parse_lines(text.partition("\n")[2] if size > tail_bytes else text)
    return records[-1] if records else {}


class _Progress:
    """A tqdm bar of output tokens, fed from the scheduler's step log (decode tokens, plus one
    token per request whose prefill ran), so the timed `generate` call stays untouched.
    `lines` mode (output is not a terminal) updates rarely, to keep captured logs short."""

    def __init__(self, steps_path: str | Path, workload: Workload, mode: str):
        self.mode, self.total, self.name = mode, workload.output_tokens, workload.name
        self.tail = StepTail(steps_path)
        self._stop = threading.Event()
        self._t0: float | None = None

    def __enter__(self) -> "_Progress":
        if self.mode == "off":
            return self
        from tqdm import tqdm

        self.tail.poll()  # skip what came before this workload
        self.bar = tqdm(
            total=self.total, desc=self.name, unit="tok", unit_scale=True, file=sys.stderr,
            mininterval=0.5 if self.mode == "tty" else 15.0, dynamic_ncols=True,
        )
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def start(self, t0: float) -> None:
        self._t0 = t0

    def _loop(self) -> None:
        done = 0
        while not self._stop.wait(0.5):
            for rec in self.tail.poll():
                if rec.get("kind") == "step" and self._t0 is not None and rec["t"] >= self._t0:
                    done += rec["decode"] + (rec["reqs"] - rec["decode"] if rec["prefill"] else 0)
            self.bar.update(min(done, self.total) - self.bar.n)

    def __exit__(self, *exc: Any) -> None:
        if self.mode == "off":
            return
        self._stop.set()
        self._thread.join()
        self.bar.update(self.total - self.bar.n)
        self.bar.close()


# ---- one engine in its own process -------------------------------------------------------


def engine_result(spec: RunSpec, engine: Any, startup_s: float, runs: Sequence[WorkloadRun]) -> dict:
    """What an engine process hands back (JSON): its runs plus what its scheduler reported."""
    header = StepLog.read(spec.steps_path).header
    return {
        "engine": spec.engine,
        "driver": spec.driver,
        "engine_class": engine_class_name(engine),
        "engine_kwargs": spec.engine_kwargs,
        "startup_s": startup_s,
        "scheduler": {k: v for k, v in header.items() if k not in ("kind", "t")},
        "workloads": [r.to_dict() for r in runs],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    spec = RunSpec.load(argv[0])
    model = ModelShape.from_config_dir(spec.model_dir)
    workloads = [w for s in spec.workloads for w in WorkloadSpec(**s).build(model)]
    for w in workloads:
        if spec.fingerprints.get(w.name) != w.fingerprint():
            raise SystemExit(f"workload {w.name} built differently here than in the parent: not deterministic?")
    Path(spec.steps_path).unlink(missing_ok=True)
    print(f"[{spec.engine}] starting the engine (not timed) ...", flush=True)
    t = time.monotonic()
    engine = ENGINES[spec.engine](spec.steps_path, spec.engine_kwargs)
    startup_s = time.monotonic() - t
    print(f"[{spec.engine}] engine up in {startup_s:.0f} s", flush=True)
    try:
        runs = run_workloads(engine, workloads, spec.steps_path, model.token_range(), spec.progress, spec.warmup,
                             spec.driver)
    finally:
        engine.shutdown()
    result = engine_result(spec, engine, startup_s, runs)
    Path(spec.result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
