"""What the reader hands on: one validated request per good line, one `LineError` per bad one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..planner.batch_file import LineError
from ..planner.inputs import PlanInputError, PlanRequest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
URLS = (COMPLETIONS, CHAT)

__all__ = ["COMPLETIONS", "CHAT", "URLS", "JobRequest", "LineError", "BatchFileError"]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One good line. `plan` holds the id (`custom_id`), the packed prompt token ids and the
    decode budget, so the planner reads the same object the runner submits (no copy of the
    tokens). `sampling` is SGLang's sampling params without `max_new_tokens`."""

    line: int  # 1-based line number in the input file
    index: int  # 0-based position among the good lines, the order `--ordered` writes in
    url: str  # COMPLETIONS or CHAT: which response body to write
    plan: PlanRequest
    sampling: Mapping[str, Any]

    @property
    def custom_id(self) -> str:
        return self.plan.rid

    @property
    def prompt_len(self) -> int:
        return self.plan.prompt_len

    @property
    def max_new_tokens(self) -> int:
        return self.plan.max_new_tokens

    def sampling_params(self) -> dict[str, Any]:
        """What SGLang's `sampling_params` gets for this request."""
        return {**self.sampling, "max_new_tokens": self.plan.max_new_tokens}


class BatchFileError(PlanInputError):
    """A bad line under `on_error="stop"`, or a file that is not a batch at all (empty,
    unreadable). The message reads `FILE:LINE: reason`."""

    def __init__(self, message: str, error: LineError | None = None) -> None:
        super().__init__(message)
        self.error = error
