"""What the planner accepts: requests, settings, and the error raised for bad ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .tokens import TOKEN_BYTES, TokenIds


class PlanInputError(ValueError):
    """A request, a setting or a batch the planner cannot plan. The message says what to fix."""


def _check_int(name: str, value: object, minimum: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanInputError(f"{name} must be an int, got {value!r} ({type(value).__name__}); {hint}")
    if value < minimum:
        raise PlanInputError(f"{name} must be >= {minimum}, got {value}; {hint}")


@dataclass(frozen=True)
class PlannerConfig:
    """How the planner groups requests.

    page_size: KV-cache page size of the engine (SGLang `--page-size`). Every shared prefix is
        cut down to a multiple of it; the cut tail is computed by each member.
    levels: how many nested levels of sharing a request may use (1 = the paper: one shared
        prefix per request; 2 = e.g. system prompt -> document; ...).
    min_prefix_tokens: a shared prefix shorter than this is not worth a group; its requests
        run alone. (A nested group's prefix is longer than its parent's, so it passes too.)
    """

    page_size: int = 1
    levels: int = 1
    min_prefix_tokens: int = 32

    def __post_init__(self) -> None:
        _check_int("page_size", self.page_size, 1, "use the engine's KV page size (1 if unsure)")
        _check_int("levels", self.levels, 1, "use 1 for the paper's single-level grouping")
        _check_int("min_prefix_tokens", self.min_prefix_tokens, 0, "use 0 to share any prefix")

    def to_dict(self) -> dict[str, int]:
        return {"page_size": self.page_size, "levels": self.levels, "min_prefix_tokens": self.min_prefix_tokens}


@dataclass(frozen=True)
class PlanRequest:
    """One request of the batch: a unique id, its prompt token ids, its decode budget.

    `input_ids` may be any sequence of ints (list, tuple, `array('q')` as in SGLang's `Req`,
    numpy array); it is stored as an immutable, packed `TokenIds`.
    """

    rid: str
    input_ids: Sequence[int]
    max_new_tokens: int
    _packed: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rid, str) or not self.rid:
            raise PlanInputError(f"request id must be a non-empty str, got {self.rid!r}; give every request a unique id")
        _check_int(
            f"request {self.rid!r}: max_new_tokens", self.max_new_tokens, 0, "give the request's decode budget"
        )
        try:
            tokens = TokenIds(self.input_ids)
        except (TypeError, ValueError) as exc:
            raise PlanInputError(f"request {self.rid!r}: bad input_ids: {exc}; pass a list of token ids") from None
        if len(tokens) == 0:
            raise PlanInputError(
                f"request {self.rid!r}: empty prompt; a request needs at least one token (drop it or tokenize its text)"
            )
        object.__setattr__(self, "input_ids", tokens)
        object.__setattr__(self, "_packed", tokens.packed)

    @property
    def prompt_len(self) -> int:
        return len(self._packed) // TOKEN_BYTES
