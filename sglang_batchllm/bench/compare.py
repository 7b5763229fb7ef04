"""Do an arm's outputs match vanilla SGLang's? Greedy token ids, compared per request.

Exact equality is the wrong test: both runs are greedy (temperature 0) over the same dummy
weights, but bf16 results depend on the batch a request lands in (kernel splits, CUDA-graph
batch padding, chunk boundaries), and BatchLLM changes batch composition by design. A near-tie
in the logits can then flip one token, and every later token of that request follows the flip.
So the rule is:

- hard (any violation fails): every request comes back from both runs with exactly
  `max_new_tokens` tokens (the benchmark sets ignore_eos);
- tolerant: a request *agrees* when its first K output tokens (K = `first_tokens`, or all of
  them if fewer) are identical in both runs; the runs agree when at least `min_fraction` of the
  requests agree. Defaults K = 16, 0.95: a bug in prefix sharing (a member reading the wrong or
  missing prefix KV) changes the very first tokens of every affected request, whereas numeric
  flips are rare per token and mostly land later in the sequence.

The report also gives the first-token agreement and the mean matched fraction, so a tolerance
that turns out too tight or too loose on a GPU can be re-chosen from data (an A/A run with
`--arms vanilla,vanilla-again` measures the noise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from .workloads import common_prefix_len

_SHOW = 5  # request ids listed in a failure message


@dataclass(frozen=True)
class OutputTolerance:
    first_tokens: int = 16
    min_fraction: float = 0.95

    def __post_init__(self) -> None:
        if isinstance(self.first_tokens, bool) or not isinstance(self.first_tokens, int) or self.first_tokens < 1:
            raise ValueError(f"--match-tokens must be an integer >= 1, got {self.first_tokens!r}")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"--match-fraction must be within [0, 1], got {self.min_fraction!r}")


@dataclass(frozen=True)
class OutputComparison:
    requests: int
    missing: tuple[str, ...]
    wrong_length: tuple[str, ...]
    agreeing: int
    first_token_agreeing: int
    identical: int
    mean_matched_fraction: float
    tolerance: OutputTolerance

    @property
    def agree_fraction(self) -> float:
        return self.agreeing / self.requests if self.requests else 1.0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.wrong_length and self.agree_fraction >= self.tolerance.min_fraction

    def summary(self) -> str:
        if self.missing:
            return f"FAIL: {len(self.missing)} request(s) missing from a run, e.g. {list(self.missing[:_SHOW])}"
        if self.wrong_length:
            return (
                f"FAIL: {len(self.wrong_length)} request(s) did not return max_new_tokens tokens, "
                f"e.g. {list(self.wrong_length[:_SHOW])}"
            )
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{verdict}: {self.agree_fraction:.1%} of requests agree on their first {self.tolerance.first_tokens} tokens "
            f"(need {self.tolerance.min_fraction:.0%}); first token {self.first_token_agreeing}/{self.requests}, "
            f"identical {self.identical}/{self.requests}, mean matched {self.mean_matched_fraction:.1%}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(missing=list(self.missing[:_SHOW]), num_missing=len(self.missing))
        d.update(wrong_length=list(self.wrong_length[:_SHOW]), num_wrong_length=len(self.wrong_length))
        d.update(agree_fraction=self.agree_fraction, ok=self.ok, summary=self.summary())
        return d


def compare_outputs(
    reference: Mapping[str, Sequence[int]],
    candidate: Mapping[str, Sequence[int]],
    expected_len: Mapping[str, int],
    tolerance: OutputTolerance = OutputTolerance(),
) -> OutputComparison:
    """`expected_len` maps every request id of the workload to its max_new_tokens."""
    missing = tuple(rid for rid in expected_len if rid not in reference or rid not in candidate)
    wrong = tuple(
        rid
        for rid, n in expected_len.items()
        if rid in reference and rid in candidate and (len(reference[rid]) != n or len(candidate[rid]) != n)
    )
    agreeing = first = identical = 0
    matched = 0.0
    for rid, n in expected_len.items():
        if rid not in reference or rid not in candidate:
            continue
        a, b = reference[rid], candidate[rid]
        common = common_prefix_len(a, b)
        agreeing += common >= min(tolerance.first_tokens, n)
        first += common >= 1
        identical += list(a) == list(b)
        matched += common / n if n else 1.0
    compared = len(expected_len) - len(missing)
    return OutputComparison(
        requests=len(expected_len),
        missing=missing,
        wrong_length=wrong,
        agreeing=agreeing,
        first_token_agreeing=first,
        identical=identical,
        mean_matched_fraction=matched / compared if compared else 0.0,
        tolerance=tolerance,
    )
