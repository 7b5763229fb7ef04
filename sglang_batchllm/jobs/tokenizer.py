"""Text -> token ids with the model's Hugging Face tokenizer, the way SGLang tokenizes requests
(`encode` adds the tokenizer's special tokens; chats go through the chat template with
`add_generation_prompt=True`). Loaded on first use: a file of token ids never pays for it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Protocol

from ..planner.inputs import PlanInputError
from .prefix_tokens import SharedPrefixTokenizer, eligible, special_wrapper


BATCH_LINES = 256  # texts per tokenizer call: one Rust call instead of 256 Python round trips


class TextEncoder(Protocol):
    """`encode_batch(texts)` is optional: an encoder that has it gets the reader's text lines
    BATCH_LINES at a time, and must return what `encode` would for each. An encoder that also
    has `render_chat(messages)` (the chat as template text) gets its chats rendered line by line
    and then tokenized in those batches with `encode_batch(texts, add_special_tokens=False)`,
    which must return what `encode_chat` would."""

    def encode(self, text: str) -> Sequence[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> Sequence[int]: ...


class HFEncoder:
    def __init__(self, path: str, *, lazy: bool = False, share_prefixes: bool = True) -> None:
        self.path = path
        self.tok = self._raw = None
        # add_special_tokens -> whether the Rust batch call was seen to agree with `encode`
        self._fast_agrees: dict[bool, bool] = {}
        # add_special_tokens -> the shared-prefix tokenizer (prefix_tokens.py), None where the
        # tokenizer is not one texts may be cut for; built on the first batch of each setting
        self.share_prefixes = share_prefixes
        self._sharers: dict[bool, SharedPrefixTokenizer | None] = {}
        self.sharing_off_because = ""
        if not lazy:
            self._load()

    def _load(self) -> None:
        if self.tok is not None or self._raw is not None:
            return
        try:
            from transformers import AutoTokenizer  # only text input needs it
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self.tok = AutoTokenizer.from_pretrained(self.path)
        else:  # `tokenizers` alone: a tokenizer.json file or a folder holding one; no chat template
            from tokenizers import Tokenizer

            file = os.path.join(self.path, "tokenizer.json") if os.path.isdir(self.path) else self.path
            self._raw = Tokenizer.from_file(file)

    def _loaded(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - a bad path or install, said once per line
            raise PlanInputError(f"cannot load the tokenizer at {self.path}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        self._loaded()
        if self._raw is not None:
            return self._raw.encode(text).ids
        return list(self.tok.encode(text))

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """`[self.encode(t) for t in texts]`, a shared text prefix tokenized once where the
        tokenizer allows it (prefix_tokens.py: the same ids, fewer tokenizer calls)."""
        self._loaded()
        sharer = self._sharer(add_special_tokens) if self.share_prefixes else None
        if sharer is not None:
            return sharer.encode_batch(list(texts))
        return self._encode_batch(texts, add_special_tokens=add_special_tokens)

    @property
    def reused_tokens(self) -> int:
        return sum(s.reused_tokens for s in self._sharers.values() if s is not None)

    def _sharer(self, add_special_tokens: bool) -> SharedPrefixTokenizer | None:
        if add_special_tokens in self._sharers:
            return self._sharers[add_special_tokens]
        sharer = None
        rust = self._raw if self._raw is not None else getattr(self.tok, "_tokenizer", None)
        ok, why = eligible(rust.to_str()) if hasattr(rust, "to_str") else (False, "no Rust tokenizer")
        if ok:
            def encode(texts, special):
                return self._encode_batch(texts, add_special_tokens=special)

            wrap = (lambda ids: ids) if not add_special_tokens else special_wrapper(encode)
            if wrap is not None:
                sharer = SharedPrefixTokenizer(lambda p: encode(p, False), wrap,
                                               lambda t: encode(t, add_special_tokens))
            else:
                why = "special tokens are not a fixed prefix and suffix"
        self.sharing_off_because = why
        self._sharers[add_special_tokens] = sharer
        return sharer

    def _encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """`[self.encode(t) for t in texts]` in one call (with `add_special_tokens=False`: the ids
        `encode_chat` gives for a rendered chat). A fast (Rust) tokenizer encodes the batch with
        `encode_batch_fast` (no offsets: what `tokenizer(texts)` does, less the offsets and the
        BatchEncoding). The first batch also sends its first two texts through transformers'
        `encode`, which sets the Rust tokenizer up the way transformers does (special-token
        splitting, no truncation or padding), and checks that the two paths agree; if they do
        not, this falls back to `tokenizer(texts)`. The check is made once per setting, not per
        batch: repeating it would tokenize two texts of every batch twice."""
        self._loaded()
        texts = list(texts)
        if not texts:
            return []
        if self._raw is not None:
            return [e.ids for e in _fast_batch(self._raw)(texts, add_special_tokens=add_special_tokens)]
        rust = getattr(self.tok, "_tokenizer", None)
        if getattr(self.tok, "is_fast", False) and rust is not None and hasattr(rust, "encode_batch"):
            agrees = self._fast_agrees.get(add_special_tokens)
            if agrees is None:
                probe = texts[:2]
                slow = [list(self.tok.encode(t, add_special_tokens=add_special_tokens)) for t in probe]
                fast = [e.ids for e in _fast_batch(rust)(probe, add_special_tokens=add_special_tokens)]
                agrees = self._fast_agrees[add_special_tokens] = slow == fast
            if agrees:
                return [e.ids for e in _fast_batch(rust)(texts, add_special_tokens=add_special_tokens)]
        return [list(ids) for ids in self.tok(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat as the template writes it, with the assistant's header: `encode_chat` is the
        tokenizing of this text with no special tokens added (what transformers'
        `apply_chat_template(tokenize=True)` does)."""
        self._loaded()
        self._need_template()
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _need_template(self) -> None:
        if self.tok is None or not getattr(self.tok, "chat_template", None):
            raise PlanInputError(
                f"the tokenizer at {self.path} has no chat template, so 'messages' cannot be tokenized;"
                " use a chat model's tokenizer or give body.prompt"
            )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        self._loaded()
        self._need_template()
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(out, "keys") and "input_ids" in out:  # newer transformers return a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def decode(self, ids: Sequence[int]) -> str:
        self._loaded()
        if self._raw is not None:
            return self._raw.decode(list(ids))
        return self.tok.decode(list(ids), skip_special_tokens=True)


def _fast_batch(rust: Any):
    return getattr(rust, "encode_batch_fast", None) or rust.encode_batch  # tokenizers < 0.20: with offsets


def model_context_len(model_dir: str | None) -> int | None:
    """`max_position_embeddings` (or the like) from a local model's config.json; None if unknown."""
    if not model_dir:
        return None
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
