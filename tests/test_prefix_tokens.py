"""Shared-prefix tokenizing (jobs/prefix_tokens.py): the ids are exactly those of tokenizing
each text whole, on the bundled tokenizer, for texts built to stress the cut points; a
tokenizer the exactness argument does not cover is not cut, and a guard turns sharing off on
a difference."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_batchllm.bundled_model import model_dir
from sglang_batchllm.jobs.prefix_tokens import SharedPrefixTokenizer, cut_points, eligible
from sglang_batchllm.jobs.tokenizer import HFEncoder

ENC = HFEncoder(model_dir(), share_prefixes=False)


def _sharer(special: bool, stride: int, **kw) -> SharedPrefixTokenizer:
    sharing = HFEncoder(model_dir())
    sharing.encode_batch(["probe"], add_special_tokens=special)  # builds the sharer
    base = sharing._sharers[special]
    assert base is not None, sharing.sharing_off_because
    return SharedPrefixTokenizer(base.encode_pieces, base.wrap, base.encode_whole, stride=stride, **kw)


def _whole(texts, special):
    return ENC.encode_batch(texts, add_special_tokens=special)


def test_the_bundled_tokenizer_is_cut_and_gives_the_same_ids_on_shared_prefix_batches():
    words = (Path(model_dir()) / "corpus.txt").read_text().split()
    rng = random.Random(0)
    prefixes = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(6)]
    texts = [rng.choice(prefixes) + rng.choice(["\n", " ", "  ", "", "'s ", "9 "]) +
             " ".join(rng.choice(words) for _ in range(rng.randrange(0, 60))) for _ in range(300)]
    for special in (True, False):
        enc = HFEncoder(model_dir())
        got = []
        for i in range(0, len(texts), 64):
            got += enc.encode_batch(texts[i:i + 64], add_special_tokens=special)
        assert got == _whole(texts, special)
        assert enc.reused_tokens > sum(map(len, got)) // 2, "the prefixes were reused"
        assert enc._sharers[special].enabled


_ALPHABET = st.sampled_from(list("ab Zz  \n\t.,'!?-09é中") + ["'s", "'ll", " the", "<|eot|>", "<|start_header|>", "  "])
_TEXT = st.lists(_ALPHABET, max_size=60).map("".join)


@settings(max_examples=150, deadline=None)
@given(prefix=_TEXT, tails=st.lists(_TEXT, min_size=1, max_size=6), special=st.booleans())
def test_any_text_gets_the_ids_of_tokenizing_it_whole(prefix, tails, special):
    sharer = _sharer(special, stride=3, guard_lines=0)  # cut often; no guard to hide a difference
    texts = [prefix + t for t in tails] + [prefix]
    assert sharer.encode_batch(texts) == _whole(texts, special)
    assert sharer.encode_batch(list(reversed(texts))) == _whole(list(reversed(texts)), special)


def test_cut_points_are_spaces_between_ascii_letters_at_most_one_per_stride():
    text = "ab cd  ef.gh ij é kl mn" * 20
    cuts = cut_points(text, stride=10)
    assert cuts and all(text[c] == " " and text[c - 1].isascii() and text[c - 1].isalpha()
                        and text[c + 1].isascii() and text[c + 1].isalpha() for c in cuts)
    assert len({c // 10 for c in cuts}) == len(cuts) and cuts == sorted(cuts) and min(cuts) >= 10


def test_tokenizers_outside_the_argument_are_not_cut():
    spec = json.loads((Path(model_dir()) / "tokenizer.json").read_text())
    assert eligible(json.dumps(spec)) == (True, "")
    for change, why in ((lambda s: s.update(normalizer={"type": "NFC"}), "normalizer"),
                        (lambda s: s.update(pre_tokenizer={"type": "Metaspace"}), "pre-tokenizer"),
                        (lambda s: s["pre_tokenizer"].update(use_regex=False), "pre-tokenizer"),
                        (lambda s: s["model"].update(type="Unigram"), "BPE"),
                        (lambda s: s["added_tokens"].append({"content": "<a b>"}), "whitespace")):
        changed = json.loads(json.dumps(spec))
        change(changed)
        ok, reason = eligible(json.dumps(changed))
        assert not ok and why in reason


def test_a_difference_turns_sharing_off_and_the_batch_is_tokenized_whole():
    calls = []

    def whole(texts):
        calls.append(len(texts))
        return [[len(t)] for t in texts]

    def pieces(texts):  # not exact: one id per piece
        return [[1] for _ in texts]

    sharer = SharedPrefixTokenizer(pieces, lambda ids: ids, whole, stride=4, guard_lines=2)
    first = sharer.encode_batch(["abc def ghi jkl mno"])  # a miss: nothing to compare yet
    assert sharer.enabled and first == [[1, 1, 1, 1]]
    again = sharer.encode_batch(["abc def ghi jkl mno pqr", "zzz"])
    assert not sharer.enabled and again == [[23], [3]] and not sharer.cache
    assert sharer.encode_batch(["abc def"]) == [[7]]


def test_the_cache_stays_within_its_bound():
    sharer = SharedPrefixTokenizer(lambda ps: [[len(p)] for p in ps], lambda ids: ids,
                                   lambda ts: [[len(t)] for t in ts], stride=2, cache_cuts=5, guard_lines=0)
    sharer.encode_batch([f"ab cd ef gh ij kl mn op qr st {i}" for i in range(20)])
    assert len(sharer.cache) <= 5
