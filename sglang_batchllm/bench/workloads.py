"""Named, seeded benchmark workloads: lists of requests (input_ids, max_new_tokens, rid).

Every workload is a pure function of (name, seed, scale, ordered, model vocabulary): the parent
process and each engine process build the same requests from a `WorkloadSpec` and compare
fingerprints, so 14M prompt tokens never cross a process boundary.

Token ids are random ordinary ids (`ModelShape.token_range()`). The first token(s) of every
unit that must *not* be shared (a group's prefix, a member's distinct part, a control request)
are drawn without replacement, so the sharing structure is exact: members of a group share
exactly `prefix` tokens, and nothing else shares anything by accident.

| name | requests | structure (tokens) |
|---|---|---|
| authors | 400 groups x 16 = 6400 | prefix 2000 / distinct 200 / output 100 (the paper's benchmark) |
| w1 | 64 groups x 16 = 1024 | prefix 2000 / distinct 200 / output 100 (docs/baseline.md's W1: all prefixes fit the cache) |
| decode-heavy | 100 groups x 16 = 1600 | prefix 2000 / distinct 200 / output 500 |
| short-prefix | 128 groups x 8 = 1024 | prefix 128 / distinct 300 / output 100 (little to share: a cost rule that shares anyway loses) |
| step-256, step-512 | 16 / 32 groups x 16 | prefix 2000 / distinct 200 / output 200: every request fits at once, so decode steps run at batch 256 / 512 (the report's decode step time) |
| sweep | 9 x 256 | group size 4/16/64 x output 10/100/500; prefix 2000 / distinct 200 |
| control | 512 | 2200 distinct tokens each, output 100: no sharing at all |
| two-level | 64 docs x 8 questions = 512 | system 1000 + document 1500 + question 100, output 100 |
| run-batch-shape | 100 docs x 20 questions = 2000 | system 300 + document 1500 + question 50, output 64: the first `gen` of scripts/bench_run_batch.py's programs as token ids |
| jsonl:PATH | one per line | a batch file of token ids (`jobs/reader.py`: `{"input_ids": [...], "max_new_tokens": N, "id": ...}` or OpenAI lines) |

`scale` (the CLI's --quick sets 1/8) multiplies the number of groups, documents or control
requests (at least 1); JSONL files are not scaled. All workloads are shuffled (seeded) unless
`ordered`.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .model import ModelShape, TokenRange


@dataclass(frozen=True)
class BenchRequest:
    rid: str
    input_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    requests: tuple[BenchRequest, ...]
    params: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.input_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_new_tokens for r in self.requests)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.requests:
            h.update(f"{r.rid}\0{r.max_new_tokens}\0".encode())
            h.update(array("q", r.input_ids).tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload as named on the command line; `build` turns it into requests."""

    name: str
    seed: int = 0
    scale: float = 1.0
    ordered: bool = False

    def __post_init__(self) -> None:
        check_workload_name(self.name)
        if not self.scale > 0:
            raise ValueError(f"workload scale must be > 0, got {self.scale}")

    def build(self, model: ModelShape) -> list[Workload]:
        if self.name.startswith(JSONL_PREFIX):
            return [load_jsonl(self.name[len(JSONL_PREFIX):], self.seed, self.ordered, model.vocab)]
        return WORKLOADS[self.name](_Gen(self, model.token_range()))

    def to_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "scale": self.scale, "ordered": self.ordered}


JSONL_PREFIX = "jsonl:"


def check_workload_name(name: str) -> None:
    if name.startswith(JSONL_PREFIX):
        path = Path(name[len(JSONL_PREFIX):])
        if not path.is_file():
            raise ValueError(f"workload {name!r}: no such file {path}; give jsonl:PATH to a JSONL file")
        return
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)} or jsonl:PATH")


# ---- generators -------------------------------------------------------------------------


class _Gen:
    """Random tokens for one workload, seeded by (workload name, seed)."""

    def __init__(self, spec: WorkloadSpec, tokens: TokenRange, key: str | None = None):
        self.spec = spec
        self.tokens = tokens
        # str seeds are hashed with sha512: stable across processes and PYTHONHASHSEED
        self.rng = random.Random(f"{key or spec.name}:{spec.seed}")

    def name(self, base: str) -> str:
        return base if self.spec.scale == 1 else f"{base}[x{self.spec.scale:g}]"

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.spec.scale))

    def body(self, n: int) -> list[int]:
        lo, span = self.tokens.lo, self.tokens.size
        rnd = self.rng.random
        return [lo + int(rnd() * span) for _ in range(n)]

    def heads(self, k: int) -> list[list[int]]:
        """k distinct short token sequences (1 token while the range allows, else 2, ...)."""
        span, width = self.tokens.size, 1
        while span**width < k:
            width += 1
        heads = []
        for code in self.rng.sample(range(span**width), k):
            digits = []
            for _ in range(width):
                code, d = divmod(code, span)
                digits.append(self.tokens.lo + d)
            heads.append(digits)
        return heads

    def unit(self, head: list[int], n: int) -> list[int]:
        if n < len(head):
            raise ValueError(f"workload {self.spec.name}: a segment of {n} tokens is shorter than its head {len(head)}")
        return head + self.body(n - len(head))

    def finish(self, base: str, description: str, reqs: list[BenchRequest], params: dict) -> Workload:
        if not self.spec.ordered:
            self.rng.shuffle(reqs)
        params = {**params, "seed": self.spec.seed, "scale": self.spec.scale, "ordered": self.spec.ordered}
        return Workload(self.name(base), description, tuple(reqs), params)


def shared_prefix(gen: _Gen, base: str, groups: int, group_size: int, prefix: int, distinct: int, output: int) -> Workload:
    name = gen.name(base)
    reqs = []
    for g, head in enumerate(gen.heads(groups)):
        shared = gen.unit(head, prefix)
        for m, own in enumerate(gen.heads(group_size)):
            ids = tuple(shared + gen.unit(own, distinct))
            reqs.append(BenchRequest(f"{name}/g{g:04d}-m{m:03d}", ids, output))
    description = f"{groups} groups x {group_size}, prefix {prefix} / distinct {distinct} / output {output}"
    params = dict(groups=groups, group_size=group_size, prefix=prefix, distinct=distinct, output=output)
    return gen.finish(base, description, reqs, params)


def authors(gen: _Gen) -> list[Workload]:
    return [shared_prefix(gen, "authors", gen.scaled(400), 16, 2000, 200, 100)]


def w1(gen: _Gen) -> list[Workload]:
    return [shared_prefix(gen, "w1", gen.scaled(64), 16, 2000, 200, 100)]


def decode_heavy(gen: _Gen) -> list[Workload]:
    return [shared_prefix(gen, "decode-heavy", gen.scaled(100), 16, 2000, 200, 500)]


def short_prefix(gen: _Gen) -> list[Workload]:
    return [shared_prefix(gen, "short-prefix", gen.scaled(128), 8, 128, 300, 100)]


def step_256(gen: _Gen) -> list[Workload]:
    return [shared_prefix(gen, "step-256", gen.scaled(16), 16, 2000, 200, 200)]


def step_512(gen: _Gen) -> list[Workload]:
    return [shared_prefix(gen, "step-512", gen.scaled(32), 16, 2000, 200, 200)]


SWEEP_GROUP_SIZES = (4, 16, 64)
SWEEP_OUTPUTS = (10, 100, 500)
SWEEP_REQUESTS = 256  # per cell; prefix 2000 / distinct 200 as in the paper's benchmark


def sweep(gen: _Gen) -> list[Workload]:
    cells = []
    for size in SWEEP_GROUP_SIZES:
        for output in SWEEP_OUTPUTS:
            base = f"sweep/g{size}-o{output}"
            cell = _Gen(gen.spec, gen.tokens, key=base)
            cells.append(shared_prefix(cell, base, gen.scaled(SWEEP_REQUESTS // size), size, 2000, 200, output))
    return cells


def control(gen: _Gen) -> list[Workload]:
    n, length, output = gen.scaled(512), 2200, 100
    name = gen.name("control")
    reqs = [BenchRequest(f"{name}/r{i:05d}", tuple(gen.unit(h, length)), output) for i, h in enumerate(gen.heads(n))]
    params = dict(requests=n, prompt=length, output=output)
    return [gen.finish("control", f"{n} requests, {length} distinct tokens each / output {output}, no sharing", reqs, params)]


def documents_and_questions(gen: _Gen, base: str, docs: int, questions: int, system_len: int, doc_len: int,
                            question_len: int, output: int) -> Workload:
    """One system prompt shared by all, `docs` documents after it, `questions` questions per document."""
    name = gen.name(base)
    system = gen.body(system_len)
    reqs = []
    for d, doc_head in enumerate(gen.heads(docs)):
        doc = system + gen.unit(doc_head, doc_len)
        for q, q_head in enumerate(gen.heads(questions)):
            reqs.append(BenchRequest(f"{name}/d{d:03d}-q{q:02d}", tuple(doc + gen.unit(q_head, question_len)), output))
    description = (
        f"1 system prompt {system_len}, {docs} documents x {questions} questions, "
        f"document {doc_len} / question {question_len} / output {output}"
    )
    params = dict(documents=docs, questions=questions, system=system_len, document=doc_len, question=question_len, output=output)
    return gen.finish(base, description, reqs, params)


def two_level(gen: _Gen) -> list[Workload]:
    return [documents_and_questions(gen, "two-level", gen.scaled(64), 8, 1000, 1500, 100, 100)]


def run_batch_shape(gen: _Gen) -> list[Workload]:
    # The first `gen` of scripts/bench_run_batch.py's programs as one token-id batch: it puts
    # the frontend's 2,000-row steps on the step recorder (and its profiler).
    return [documents_and_questions(gen, "run-batch-shape", gen.scaled(100), 20, 300, 1500, 50, 64)]


WORKLOADS: dict[str, Callable[[_Gen], list[Workload]]] = {
    "authors": authors,
    "w1": w1,
    "decode-heavy": decode_heavy,
    "short-prefix": short_prefix,
    "step-256": step_256,
    "step-512": step_512,
    "sweep": sweep,
    "control": control,
    "two-level": two_level,
    "run-batch-shape": run_batch_shape,
}


def load_jsonl(path: str | Path, seed: int, ordered: bool, vocab: int) -> Workload:
    """A batch file read by the one reader (`sglang_batchllm.jobs.reader`: native or OpenAI
    batch lines with token ids; text needs a tokenizer, which the benchmark does not load)."""
    from sglang_batchllm.jobs.reader import read_file
    from sglang_batchllm.jobs.records import BatchFileError

    path = Path(path)
    try:
        result = read_file(str(path))
    except BatchFileError as exc:
        raise ValueError(str(exc)) from None
    reqs = []
    for r in result.requests:
        ids = r.plan.input_ids
        if max(ids) >= vocab:
            raise ValueError(f"{path}:{r.line}: token id {max(ids)} is outside the model's vocabulary [0, {vocab})")
        if r.max_new_tokens < 1:
            raise ValueError(f"{path}:{r.line}: max_new_tokens must be >= 1 for a benchmark, got {r.max_new_tokens}")
        reqs.append(BenchRequest(r.custom_id, tuple(ids), r.max_new_tokens))
    if not ordered:
        random.Random(f"jsonl:{seed}").shuffle(reqs)
    name = f"jsonl:{path.name}"
    return Workload(name, f"{len(reqs)} requests from {path}", tuple(reqs), {"path": str(path), "seed": seed, "ordered": ordered})


# ---- sharing structure ------------------------------------------------------------------


@dataclass(frozen=True)
class Sharing:
    """How much prefill a perfect prefix cache needs: each distinct prefix of any prompt
    (a node of the prompts' token trie) computed once.

    unique_tokens: trie nodes; unique_attention_pairs: sum over those tokens of (position + 1),
    the causal (query, key) pairs their attention computes."""

    logical_tokens: int
    unique_tokens: int
    unique_attention_pairs: int

    @property
    def ideal_saving(self) -> float:
        return 1 - self.unique_tokens / self.logical_tokens if self.logical_tokens else 0.0


def sharing(prompts: Iterable[Sequence[int]]) -> Sharing:
    """Sorted order puts every prompt next to the one it shares most with, so each prompt's
    new trie nodes are its tokens past the longest common prefix with its predecessor."""
    ordered = sorted(tuple(p) for p in prompts)
    logical = unique = pairs = 0
    prev: tuple[int, ...] = ()
    for p in ordered:
        n, shared = len(p), common_prefix_len(prev, p)
        logical += n
        unique += n - shared
        pairs += (n * (n + 1) - shared * (shared + 1)) // 2
        prev = p
    return Sharing(logical, unique, pairs)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; binary search over slice comparisons (C speed)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
