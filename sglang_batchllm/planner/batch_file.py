"""The bad-line record of batch files, shared by the planner's report and the reader.

The reader itself lives in `sglang_batchllm/jobs/reader.py` (one reader for the batch runner,
the plan CLI and the benchmark); this pure type stays here because `planner/report.py` lists
skipped lines and the planner must not import the layers above it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based line number in the file (0: the file as a whole)
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}" if where else self.message
