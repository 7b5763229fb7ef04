"""The step recorder's file read back on the benchmark side (step_recorder.py writes it):
steps, retractions and idle markers, cut to a timed window, summed up and turned into the
charts' columns; and a tail reader for progress bars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .step_recorder import ATTENTION_COUNTERS, BATCHLLM_COUNTERS, BATCHLLM_GAUGES, BATCHLLM_STEP_FIELDS


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
    # BatchLLM's counters over the window (None where the steps do not carry them: vanilla)
    batchllm_prefix_tokens_planned: int | None = None
    batchllm_prefix_tokens_computed: int | None = None
    batchllm_prefix_recomputations: int | None = None
    batchllm_decode_rows: int | None = None
    batchllm_cascade_rows: int | None = None
    batchllm_cascade_shared_rows: int | None = None
    batchllm_extend_rows: int | None = None
    batchllm_extend_shared_rows: int | None = None
    peak_pinned_tokens: int | None = None
    peak_groups_live: int | None = None
    # step times (a step's start to the next one's; steps before an idle marker or last in
    # the window are not timed): decode-only and mixed steps, median ms and median rows
    decode_steps_timed: int = 0
    decode_step_ms: float | None = None
    decode_step_rows: float | None = None
    mixed_steps_timed: int = 0
    mixed_step_ms: float | None = None
    # seconds in timed decode-only, mixed and prefill-only steps (the rest of the wall time is
    # idle gaps and untimed steps)
    decode_steps_s: float = 0.0
    mixed_steps_s: float = 0.0
    extend_steps_s: float = 0.0
    # Triton kernel variants compiled inside the window, and the seconds they took: each one
    # stalled a step (none is expected after warm-up)
    triton_compiles: int = 0
    triton_compile_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepLog:
    """A recorder file read back: steps, retractions and idle markers in time order."""

    header: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    retractions: list[dict] = field(default_factory=list)
    idle_times: list[float] = field(default_factory=list)
    compiles: list[dict] = field(default_factory=list)
    before: dict = field(default_factory=dict)  # after `window`: the last step before it ({} if none)

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
        elif kind == "compile":
            self.compiles.append(rec)

    def window(self, t0: float, t1: float) -> "StepLog":
        inside = lambda r: t0 <= r["t"] <= t1  # noqa: E731
        return StepLog(
            self.header,
            [s for s in self.steps if inside(s)],
            [r for r in self.retractions if inside(r)],
            [t for t in self.idle_times if t0 <= t <= t1],
            [c for c in self.compiles if inside(c)],
            next((s for s in reversed(self.steps) if s["t"] < t0), {}),
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
            triton_compiles=len(self.compiles),
            triton_compile_s=round(sum(c.get("s") or 0.0 for c in self.compiles), 3),
            **self._step_times(),
            **self._batchllm_summary(),
        )

    def _step_times(self) -> dict:
        """With overlap scheduling a step is recorded when the scheduler launches it, so in a
        steady stream the gap to the next launch is the step's GPU time."""
        timed: dict[str, list[tuple[float, int]]] = {"DECODE": [], "MIXED": [], "EXTEND": []}
        idles = sorted(self.idle_times)
        for cur, nxt in zip(self.steps, self.steps[1:]):
            if cur.get("mode") not in timed:
                continue
            if any(cur["t"] <= t <= nxt["t"] for t in idles):
                continue  # the scheduler went idle in between: not a step time
            timed[cur["mode"]].append(((nxt["t"] - cur["t"]) * 1e3, cur["reqs"]))
        decode, mixed, extend = timed["DECODE"], timed["MIXED"], timed["EXTEND"]
        total_s = lambda steps: round(sum(ms for ms, _ in steps) / 1e3, 3)  # noqa: E731
        return {
            "decode_steps_timed": len(decode),
            "decode_step_ms": _median([ms for ms, _ in decode]),
            "decode_step_rows": _median([rows for _, rows in decode]),
            "mixed_steps_timed": len(mixed),
            "mixed_step_ms": _median([ms for ms, _ in mixed]),
            "decode_steps_s": total_s(decode),
            "mixed_steps_s": total_s(mixed),
            "extend_steps_s": total_s(extend),
        }

    def _batchllm_summary(self) -> dict:
        """Counters are cumulative and read before each step runs, so the window's share is the
        last step's value minus the value at the last step before the window. The last step of
        a workload is a decode step, so everything its prefills counted is in by then."""
        carrying = [x for x in self.steps if _has_batchllm_fields(x)]
        if not carrying:
            return {}
        last = carrying[-1]
        # counters an older recorder did not write stay None
        deltas = {f"batchllm_{k}": last[k] - self.before.get(k, 0) if k in last else None
                  for k in BATCHLLM_COUNTERS}
        return {
            **deltas,
            "peak_pinned_tokens": max(x["pinned_tokens"] for x in carrying),
            "peak_groups_live": max(x["groups_live"] for x in carrying),
        }

    def series(self, t0: float) -> dict[str, list]:
        """Columns for the charts; KV held = in use and not evictable (running requests, pins)."""
        s = self.steps
        columns = {
            "t": [round(x["t"] - t0, 4) for x in s],
            "mode": [x["mode"] for x in s],
            "reqs": [x["reqs"] for x in s],
            "prefill": [x["prefill"] for x in s],
            "decode": [x["decode"] for x in s],
            "kv_used": [x["kv_used"] for x in s],
            "kv_held": [x["kv_used"] - x["kv_evictable"] for x in s],
        }
        if any(_has_batchllm_fields(x) for x in s):  # a BatchLLM run: its gauges too
            columns.update({k: [x.get(k, 0) for x in s] for k in BATCHLLM_GAUGES})
        return columns


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return float(v[mid]) if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _has_batchllm_fields(step: dict) -> bool:
    """A step of a BatchLLM run: its scheduler gauges and prefix counters are there (the
    attention backend's row counters came later and may be missing from older logs)."""
    return all(k in step for k in BATCHLLM_STEP_FIELDS if k not in ATTENTION_COUNTERS)


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
