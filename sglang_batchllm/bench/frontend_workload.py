"""Issue 12's frontend workload for `scripts/bench_run_batch.py`: SGLang frontend programs
`system + document + question` with two dependent `gen` calls.

At scale 1: 2,000 programs; one system prompt of ~300 tokens shared by all; 100 documents of
~1,500 tokens (each program reads one, 20 programs per document); a question of ~50 tokens per
program; `gen("answer", 64)` then, after its answer, `gen("detail", 64)`.

The text is made of sentences of the bundled model's corpus (sglang_batchllm/bundled_model/
corpus.txt), so the bundled model's trained weights see the kind of text they were trained on
(the equality mode) and token counts are measured with the bundled tokenizer, which the speed
runs serve too. Every text starts with its own number ("Document 17.", "Question 1203:"), so
two documents share no prefix beyond the system prompt and two questions none beyond their
document: the sharing is exactly system (all) and system + document (per document).

Deterministic: the same seed and scale give the same programs (`fingerprint()`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

FULL_PROGRAMS = 2000
FULL_DOCUMENTS = 100
TARGET_TOKENS = {"system": 300, "document": 1500, "question": 50}
GEN_TOKENS = 64  # each of the two gen calls

_BUNDLED = Path(__file__).resolve().parents[1] / "bundled_model"
SYSTEM_HEAD = "You are a careful assistant. Read the document and answer the question from it, briefly and exactly."


@lru_cache(maxsize=1)
def tokenizer():
    """The bundled tokenizer (tokenizers' Rust tokenizer: no transformers, no torch)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_BUNDLED / "tokenizer.json"))


def count_tokens(texts: Sequence[str]) -> list[int]:
    # add_special_tokens=False: the bundled tokenizer adds no BOS (add_bos_token false), so the
    # server's prompt_tokens are these counts too.
    return [len(e.ids) for e in tokenizer().encode_batch(list(texts), add_special_tokens=False)]


@lru_cache(maxsize=1)
def corpus_sentences() -> tuple[tuple[str, int], ...]:
    """The corpus' sentences, each with its token count as it appears after a space."""
    text = (_BUNDLED / "corpus.txt").read_text()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    counts = count_tokens([" " + s for s in sentences])
    return tuple(zip(sentences, counts))


def _text(rng: random.Random, head: str, target: int) -> str:
    """`head` followed by random corpus sentences, `target` tokens long give or take a word.

    The bundled tokenizer's pre-tokenizer (ByteLevel) splits at spaces, so the tokens of
    sentences joined by spaces add up; the sum picks the sentences, one exact count at the end
    trims the last words."""
    sentences = corpus_sentences()
    parts, total = [head], count_tokens([head])[0]
    while total < target:
        s, n = sentences[rng.randrange(len(sentences))]
        parts.append(s)
        total += n
    text = " ".join(parts)
    words = text.split(" ")
    # The longest word prefix at or under the target: a binary search over exact counts.
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens([" ".join(words[:mid])])[0] <= target:
            lo = mid
        else:
            hi = mid - 1
    words = words[:lo]
    return " ".join(words)


def prompt_of(system: str, document: str, question: str) -> str:
    """What the program sends before its first gen (the program below builds the same text)."""
    return system + "\n\n" + document + "\n\nQuestion: " + question + "\nAnswer:"


FOLLOW_UP = "\nGive one more detail from the document.\nAnswer:"


def make_program():
    """The `@sgl.function` every arm runs (imports SGLang, so only when a run needs it)."""
    import sglang as sgl

    @sgl.function
    def doc_qa(s, system, document, question):
        s += system + "\n\n" + document + "\n\nQuestion: " + question + "\nAnswer:"
        s += sgl.gen("answer", max_tokens=GEN_TOKENS)
        # the second gen's prompt holds the first's answer: it is sent only once that is back
        s += FOLLOW_UP
        s += sgl.gen("detail", max_tokens=GEN_TOKENS)

    return doc_qa


GEN_NAMES = ("answer", "detail")


@dataclass
class FrontendWorkload:
    seed: int
    scale: float
    system: str
    documents: list[str]
    questions: list[str]
    doc_of: list[int]  # program i reads documents[doc_of[i]]
    _stats: dict | None = field(default=None, repr=False)

    @property
    def num_programs(self) -> int:
        return len(self.questions)

    def args(self) -> list[dict]:
        """run_batch's batch_kwargs, in program order."""
        return [dict(system=self.system, document=self.documents[d], question=q) for d, q in zip(self.doc_of, self.questions)]

    def prompts(self) -> list[str]:
        return [prompt_of(self.system, self.documents[d], q) for d, q in zip(self.doc_of, self.questions)]

    def fingerprint(self) -> str:
        key = json.dumps([self.system, self.documents, self.questions, self.doc_of])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def token_stats(self) -> dict:
        """Measured with the bundled tokenizer: per part (system, documents, questions) and the
        whole first-gen prompt of every program; the ideal prefill saving of the shared parts."""
        if self._stats is not None:
            return self._stats
        system = count_tokens([self.system])[0]
        docs = count_tokens(self.documents)
        questions = count_tokens(self.questions)
        prompts = count_tokens(self.prompts())

        def summary(xs: list[int]) -> dict:
            return {"count": len(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "total": sum(xs)}

        # Prefill with perfect prefix sharing: the system prompt once, each used document once,
        # then each program's own question and suffix.
        used = sorted(set(self.doc_of))
        unique = system + sum(docs[d] for d in used) + sum(questions) + self.num_programs * count_tokens(
            ["\n\nQuestion: \nAnswer:"])[0]
        self._stats = {
            "targets": dict(TARGET_TOKENS),
            "system": summary([system]),
            "document": summary(docs),
            "question": summary(questions),
            "first_gen_prompt": summary(prompts),
            "programs": self.num_programs,
            "documents": len(self.documents),
            "programs_per_document": self.num_programs / max(1, len(used)),
            "gen_calls": len(GEN_NAMES),
            "gen_tokens": GEN_TOKENS,
            "ideal_first_step_prefill_saving": 1 - min(1.0, unique / max(1, sum(prompts))),
        }
        return self._stats

    def workload_info(self) -> dict:
        return {"seed": self.seed, "scale": self.scale, "fingerprint": self.fingerprint(), "tokens": self.token_stats()}


def build(seed: int = 0, scale: float = 1.0) -> FrontendWorkload:
    """Issue 12's workload; `scale` multiplies the number of programs and documents (token
    lengths stay), so a scaled-down run keeps 20 programs per document."""
    if not scale > 0:
        raise ValueError(f"--scale must be > 0, got {scale}")
    n_programs = max(1, round(FULL_PROGRAMS * scale))
    n_docs = max(1, min(n_programs, round(FULL_DOCUMENTS * scale)))
    rng = random.Random(seed)
    system = _text(rng, SYSTEM_HEAD, TARGET_TOKENS["system"])
    documents = [_text(rng, f"Document {d}.", TARGET_TOKENS["document"]) for d in range(n_docs)]
    questions = [_text(rng, f"Question {i}: what does the document say here?", TARGET_TOKENS["question"])
                 for i in range(n_programs)]
    # Every document gets the same number of programs (give or take one), in a seeded shuffled
    # order: SGLang's run_batch starts programs in input order, and neither "all programs of a
    # document together" nor "never two together" is what a user's list looks like.
    doc_of = [i % n_docs for i in range(n_programs)]
    rng.shuffle(doc_of)
    return FrontendWorkload(seed, scale, system, documents, questions, doc_of)


def warmup_args(count: int, seed: int) -> list[dict]:
    """Programs of the same shape with texts of their own (another seed, other numbers), so the
    warm-up compiles and captures what the timed run uses but leaves none of its prefixes."""
    rng = random.Random(f"warmup-{seed}")
    system = _text(rng, "Warm-up system prompt.", TARGET_TOKENS["system"])
    docs = [_text(rng, f"Warm-up document {d}.", TARGET_TOKENS["document"]) for d in range(max(1, count // 4))]
    return [dict(system=system, document=docs[i % len(docs)],
                 question=_text(rng, f"Warm-up question {i}:", TARGET_TOKENS["question"])) for i in range(count)]


def format_token_stats(stats: dict) -> str:
    lines = [f"{stats['programs']:,} programs, {stats['documents']:,} documents "
             f"({stats['programs_per_document']:.1f} programs per document), {stats['gen_calls']} gen calls of "
             f"{stats['gen_tokens']} tokens each; tokens measured with the bundled tokenizer:"]
    for part in ("system", "document", "question", "first_gen_prompt"):
        s = stats[part]
        target = stats["targets"].get(part)
        tail = f" (target ~{target:,})" if target else ""
        lines.append(f"  {part:<17} mean {s['mean']:8.1f}  min {s['min']:6,}  max {s['max']:6,}  "
                     f"n {s['count']:5,}{tail}")
    lines.append(f"  ideal prefill saving of the first step (each shared part computed once): "
                 f"{stats['ideal_first_step_prefill_saving']:.1%}")
    return "\n".join(lines)
