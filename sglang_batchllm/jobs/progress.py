"""The progress bar (stderr) and the end-of-run summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Tally:
    total: int  # requests this run submits
    skipped_done: int = 0  # already in the output (resume)
    done: int = 0
    failed: int = 0
    bad_lines: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def saving(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class ProgressBar:
    """`[####......] 1,234/10,000  812 tok/s  ETA 0:42  prefill saved 61%`, redrawn at most
    every `interval` seconds; off unless `enabled` (the CLI turns it on for a terminal)."""

    def __init__(self, tally: Tally, *, enabled: bool, stream: TextIO = sys.stderr, interval: float = 0.5) -> None:
        self.tally, self.enabled, self.stream, self.interval = tally, enabled, stream, interval
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        t = self.tally
        finished = t.done + t.failed
        frac = finished / t.total if t.total else 1.0
        bar = "#" * int(frac * 20)
        rate = t.completion_tokens / t.elapsed if t.elapsed > 0 else 0.0
        eta = (t.total - finished) * t.elapsed / finished if finished else None
        self.stream.write(
            f"\r[{bar:<20}] {finished:,}/{t.total:,}  {rate:,.0f} tok/s  ETA {_clock(eta)}"
            f"  prefill saved {t.saving:.0%}" + (f"  failed {t.failed:,}" if t.failed else "") + "  "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            self.stream.write("\n")
            self.stream.flush()


def summary(t: Tally, *, output: str, errors: str | None, retractions: int | None, interrupted: bool) -> str:
    head = "interrupted" if interrupted else "done"
    lines = [
        f"{head}: {t.done:,} requests answered, {t.failed:,} failed"
        + (f", {t.skipped_done:,} already in the output" if t.skipped_done else "")
        + (f", {t.bad_lines:,} bad lines skipped" if t.bad_lines else ""),
        f"  tokens     {t.prompt_tokens:,} prompt ({t.cached_tokens:,} from cache: prefill saving {t.saving:.1%}),"
        f" {t.completion_tokens:,} generated",
        f"  wall time  {_clock(t.elapsed)} ({t.completion_tokens / t.elapsed if t.elapsed > 0 else 0:,.0f} output tok/s)",
        f"  retractions {'not reported by the engine' if retractions is None else f'{retractions:,}'}",
        f"  output     {output}" + (f"; failures in {errors}" if errors and (t.failed or t.bad_lines) else ""),
    ]
    if interrupted:
        lines.append("  nothing written is lost; run the same command again to finish the rest")
    return "\n".join(lines)


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
