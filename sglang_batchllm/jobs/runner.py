"""Run a read batch file through a `Backend`, window by window, writing lines as they finish.

Windows follow the plan: the planner orders the requests still to run (every group's members
together, groups in plan order), and windows are consecutive runs of that order. So a window
boundary only splits the group that straddles it, instead of cutting every group the way
windows of the file order would.

Writing: finished lines collect in a buffer that is written (one write, fsync) every
`flush_lines` lines or `flush_seconds` seconds, and always before returning, also on Ctrl-C.
The buffer is emptied *before* its write, so an interruption can lose buffered lines (their
requests run again on resume) but never write a line twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..planner.build import IncrementalPlanner
from ..planner.inputs import PlannerConfig
from .engines import Backend
from .output import Completion, LineFile, error_line, response_line
from .progress import ProgressBar, Tally
from .records import JobRequest

DEFAULT_WINDOW = 50_000


@dataclass(frozen=True)
class RunOptions:
    window: int = DEFAULT_WINDOW
    ordered: bool = False
    flush_lines: int = 256
    flush_seconds: float = 1.0


def plan_windows(requests: Sequence[JobRequest], config: PlannerConfig, window: int) -> list[list[JobRequest]]:
    """The requests in plan order, cut into windows of at most `window`."""
    if not requests:
        return []
    planner = IncrementalPlanner(config)
    planner.add(r.plan for r in requests)
    by_id = {r.custom_id: r for r in requests}
    order = [by_id[rid] for rid in planner.plan().order]
    return [order[i:i + window] for i in range(0, len(order), window)]


class _Sink:
    """Buffers finished lines; in `ordered` mode holds them until every earlier index is out."""

    def __init__(self, out: LineFile, errors: LineFile, options: RunOptions, indices: Sequence[int]) -> None:
        self.out, self.errors, self.options = out, errors, options
        self.buf: list[str] = []
        self.err_buf: list[str] = []
        self.last_flush = time.monotonic()
        self.waiting: dict[int, tuple[str, bool]] = {}  # ordered: index -> (line, is_error)
        self.order = sorted(indices)
        self.next = 0

    def add(self, req: JobRequest, line: str, is_error: bool) -> None:
        if not self.options.ordered:
            (self.err_buf if is_error else self.buf).append(line)
        else:
            self.waiting[req.index] = (line, is_error)
            while self.next < len(self.order) and self.order[self.next] in self.waiting:
                line, err = self.waiting.pop(self.order[self.next])
                (self.err_buf if err else self.buf).append(line)
                self.next += 1
        if len(self.buf) + len(self.err_buf) >= self.options.flush_lines or (
            time.monotonic() - self.last_flush >= self.options.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        lines, errs = self.buf, self.err_buf
        self.buf, self.err_buf = [], []  # emptied first: an interrupt never writes a line twice
        self.out.write(lines)
        self.errors.write(errs)
        self.last_flush = time.monotonic()


def job_sink(requests: Sequence[JobRequest], out: LineFile, errors: LineFile, options: RunOptions) -> _Sink:
    """The line buffer `run_windows` writes through, for a caller that awaits `run_windows` on
    an event loop of its own (the HTTP server's batch API) instead of calling `run_job`."""
    return _Sink(out, errors, options, [r.index for r in requests])


async def run_windows(windows: Sequence[Sequence[JobRequest]], backend: Backend, sink: _Sink, tally: Tally,
                      bar: ProgressBar) -> None:
    try:
        for window in windows:
            async for index, done in backend.generate(window):
                req = window[index]
                _count(tally, done)
                if done.error is not None:
                    sink.add(req, error_line(req.custom_id, "engine_error", done.error), True)
                else:
                    sink.add(req, response_line(req, done, backend.model), False)
                bar.update()
    finally:
        sink.flush()


def _count(tally: Tally, done: Completion) -> None:
    if done.error is not None:
        tally.failed += 1
        return
    tally.done += 1
    tally.prompt_tokens += done.prompt_tokens
    tally.cached_tokens += done.cached_tokens
    tally.completion_tokens += done.completion_tokens


def run_job(requests: Sequence[JobRequest], backend: Backend, out: LineFile, errors: LineFile, tally: Tally,
            bar: ProgressBar, config: PlannerConfig, options: RunOptions) -> None:
    """Run `requests` (those not yet in the output). Ctrl-C propagates after the buffer is written."""
    windows = plan_windows(requests, config, options.window)
    sink = job_sink(requests, out, errors, options)
    try:
        backend.run(run_windows(windows, backend, sink, tally, bar))
    finally:
        sink.flush()  # a KeyboardInterrupt raised outside the coroutine still writes what is done
