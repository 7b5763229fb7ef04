"""Tokenize a text's shared prefix once: lines of a batch file that begin with the same long
text (a document asked many questions) reuse the token ids of that text instead of running the
tokenizer over it again. On one core the tokenizer is what bounds reading a text file
(README, "Reading at scale"), and most of a shared-prefix batch's text is its prefixes.

Exactness, not approximation: the ids are the ones tokenizing the whole text gives. A text is
cut only at a *safe boundary*: a space with an ASCII letter on each side. For a byte-level BPE
whose pre-tokenizer is GPT-2's regex (`ByteLevel(use_regex=True)`, no normalizer), every
pre-token holding the letter before the space ends at the space (no alternative of that regex
takes a letter and then a space) and the next pre-token starts there, whatever follows; BPE
merges never cross pre-tokens, so `ids(a + b) == ids(a) + ids(b)` when `a` ends at such a
boundary. Other tokenizers (normalizers, SentencePiece-style prefixes, other split regexes) are
not cut: `eligible` says which are. The first `GUARD_LINES` lines that reuse ids are also
tokenized whole and compared; one difference turns sharing off for the rest of the run.

Cut points lie every `STRIDE` characters (the first safe boundary at or after each multiple),
each named by a digest of the text before it, computed incrementally in one pass. A cache
(LRU, `CACHE_CUTS` entries) maps a cut's digest to the ids before it; a new text reuses its
longest cached cut and tokenizes the rest in pieces, one batched call for the whole batch.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence

STRIDE = 512  # characters between cut points: about 100-150 tokens of English
CACHE_CUTS = 4096  # cached cuts; each holds a reference to one line's ids (<= ~40 MB at 2,200 ids)
GUARD_LINES = 8  # first lines that reuse ids, also tokenized whole and compared
_SAFE = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")

EncodePieces = Callable[[list[str]], list[list[int]]]  # texts -> ids, no special tokens added


def eligible(tokenizer_json: str) -> tuple[bool, str]:
    """Whether texts may be cut at safe boundaries for this tokenizer (its tokenizer.json
    text), and why not if not."""
    spec = json.loads(tokenizer_json)
    if (spec.get("model") or {}).get("type") != "BPE":
        return False, "not a BPE model"
    if spec.get("normalizer") is not None:
        return False, "has a normalizer"
    pre = spec.get("pre_tokenizer") or {}
    if not (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)):
        return False, "pre-tokenizer is not GPT-2's byte-level regex"
    for token in spec.get("added_tokens") or []:
        if any(c.isspace() for c in token.get("content", "")):
            return False, f"added token {token.get('content')!r} holds whitespace"
    return True, ""


def cut_points(text: str, stride: int = STRIDE) -> list[int]:
    """Safe boundaries, at most one per stride: the first at or after each multiple of it."""
    cuts, start = [], stride
    while start < len(text):
        m = _SAFE.search(text, start)
        if m is None:
            break
        cuts.append(m.start())
        start = (m.start() // stride + 1) * stride
    return cuts


def _digests(text: str, cuts: Sequence[int]) -> list[bytes]:
    h, at, out = hashlib.blake2b(digest_size=16), 0, []
    for c in cuts:
        h.update(text[at:c].encode("utf-8", "surrogatepass"))
        at = c
        out.append(h.copy().digest())
    return out


class SharedPrefixTokenizer:
    """`encode_batch(texts)` == `[special(ids(t)) for t in texts]`, tokenizing each shared
    prefix once. `encode_pieces` tokenizes without special tokens; `wrap` adds the ones the
    caller's setting adds (a prefix and a suffix found by probing, see `special_wrapper`)."""

    def __init__(self, encode_pieces: EncodePieces, wrap: Callable[[list[int]], list[int]],
                 encode_whole: Callable[[list[str]], list[list[int]]], *, stride: int = STRIDE,
                 cache_cuts: int = CACHE_CUTS, guard_lines: int = GUARD_LINES) -> None:
        self.encode_pieces, self.wrap, self.encode_whole = encode_pieces, wrap, encode_whole
        self.stride, self.cache_cuts, self.guard_left = stride, cache_cuts, guard_lines
        self.cache: OrderedDict[bytes, tuple[array, int]] = OrderedDict()
        self.enabled = True
        self.reused_tokens = 0  # ids taken from the cache instead of the tokenizer

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not self.enabled:
            return self.encode_whole(list(texts))
        texts = list(texts)
        cuts = [cut_points(t, self.stride) for t in texts]
        digests = [_digests(t, c) for t, c in zip(texts, cuts)]
        # Two rounds, so that lines of one batch share with each other too (a file whose lines
        # come grouped puts a group's members in the same batch): first the lines that share
        # nothing cached nor with an earlier line of the batch, then the rest, which then find
        # the first round's cuts in the cache.
        first, later, seen = [], [], set()
        for i, ds in enumerate(digests):
            if any(d in self.cache for d in ds) or any(d in seen for d in ds):
                later.append(i)
            else:
                first.append(i)
                seen.update(ds)
        out: list[list[int] | None] = [None] * len(texts)
        guard: list[int] = []
        for round_ in (first, later):
            if round_:
                self._round(round_, texts, cuts, digests, out, guard)
        if guard:
            whole = self.encode_whole([texts[i] for i in guard])
            if any(out[i] != w for i, w in zip(guard, whole)):
                self.enabled = False  # a tokenizer the argument does not cover: never cut again
                self.cache.clear()
                return self.encode_whole(texts)
        return out  # type: ignore[return-value]

    def _round(self, indices, texts, cuts, digests, out, guard) -> None:
        plans, pieces = [], []
        for i in indices:
            text, cs, ds = texts[i], cuts[i], digests[i]
            hit = next((k for k in range(len(cs) - 1, -1, -1) if ds[k] in self.cache), None)
            rest = cs if hit is None else cs[hit + 1:]
            bounds = [0 if hit is None else cs[hit], *rest, len(text)]
            at = len(pieces)
            pieces += [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
            plans.append((i, hit, at, len(pieces)))
        got = self.encode_pieces(pieces) if pieces else []
        for i, hit, at, end in plans:
            ds = digests[i]
            ids = array("i")
            if hit is not None:
                source, n = self.cache[ds[hit]]
                self.cache.move_to_end(ds[hit])
                ids.extend(source[:n])
                self.reused_tokens += n
            marks = []  # ids before each cut this text adds to the cache
            for piece_ids in got[at:end]:
                ids.extend(piece_ids)
                marks.append(len(ids))
            # the last mark is the text's end, which is no cut: zip leaves it out
            for digest, n in zip(ds if hit is None else ds[hit + 1:], marks):
                self.cache[digest] = (ids, n)
                self.cache.move_to_end(digest)
            while len(self.cache) > self.cache_cuts:
                self.cache.popitem(last=False)
            out[i] = self.wrap(ids.tolist())
            if hit is not None and self.guard_left > 0:
                self.guard_left -= 1
                guard.append(i)


def special_wrapper(encode: Callable[[list[str], bool], list[list[int]]]) -> Callable[[list[int]], list[int]] | None:
    """How `encode(texts, add_special_tokens=True)` wraps the bare ids: a fixed prefix and
    suffix of special ids, found on two probe texts; None if it does not look like that (then
    only the no-special-tokens setting is shared)."""
    probes = ["the shared part of a prompt", "another text to tokenize"]
    full, bare = encode(probes, True), encode(probes, False)
    wraps = set()
    for f, b in zip(full, bare):
        for i in range(len(f) - len(b) + 1):
            if f[i:i + len(b)] == b:
                wraps.add((tuple(f[:i]), tuple(f[i + len(b):])))
                break
        else:
            return None
    if len(wraps) != 1:
        return None
    head, tail = (list(x) for x in wraps.pop())
    return lambda ids: head + ids + tail
