"""The one batch-file reader: OpenAI batch input lines and native lines, streamed.

Line formats (one JSON object per line; blank lines are passed over):
- OpenAI batch: `{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
  "body": {...}}`; the body has `prompt` (a string or token ids) or `messages`, and may have
  `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `stop`, `seed`,
  `frequency_penalty`, `presence_penalty`, `n` (1 only), `model` and `user` (ignored);
- native: `{"input_ids": [...]}` or `{"text": "..."}`, optional `"id"` (or SGLang's name for
  it, `"rid"`), `"max_new_tokens"` and SGLang `"sampling_params"`. A line without an id gets
  `line-N`.

Every bad line becomes a `LineError` reading `FILE:LINE: reason`; `on_error="stop"` raises at
the first, `"skip"` records it and goes on. Nothing raises anything else on bad input.

Memory: the file is read line by line in binary (and hashed on the way, for the output's record
of its input); each good line keeps only its packed token ids (`TokenIds`, 4 bytes a token) and
its few sampling params. Text is tokenized here, once, so the planner and the engine get the
same ids and nothing tokenizes it again; with an encoder that has `encode_batch` (HFEncoder)
text lines are tokenized 256 at a time (`tokenizer.BATCH_LINES`), in file order, and a line the
tokenizer fails on still gets its own `FILE:LINE` error. Chats are rendered by the chat template
as each line is read and then tokenized in the same batches (`render_chat`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from ..planner.inputs import PlanInputError, PlanRequest
from .records import CHAT, COMPLETIONS, URLS, BatchFileError, JobRequest, LineError
from .tokenizer import BATCH_LINES, TextEncoder

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default for a request that does not say
ON_ERROR_CHOICES = ("stop", "skip")
BOM = b"\xef\xbb\xbf"

NATIVE_FIELDS = frozenset({"id", "rid", "input_ids", "text", "max_new_tokens", "sampling_params"})
OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
BODY_FIELDS = frozenset({
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "stop", "seed", "n", "frequency_penalty", "presence_penalty", "user", "stream",
})
# SGLang SamplingParams fields a native line may set (sglang/srt/sampling/sampling_params.py).
SGLANG_SAMPLING_FIELDS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "logit_bias", "sampling_seed", "custom_params",
})


@dataclass
class ReadResult:
    """The good lines in file order, the bad lines, and the identity of what was read."""

    source: str
    requests: list[JobRequest] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)
    lines: int = 0  # non-blank lines seen
    size: int = 0  # bytes read
    sha256: str = ""  # of every byte read

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)


class _Text(str):
    """A prompt text whose tokenizing waits for the batch (see `Reader._flush`)."""

    __slots__ = ()

    @property
    def text(self) -> str:
        return str(self)


class _ChatText(_Text):
    """A chat rendered by the template, waiting for the batch: tokenized without the special
    tokens `encode` adds (the template wrote them)."""

    __slots__ = ()


@dataclass(slots=True)
class _TextLine:
    """A parsed line whose prompt is text still to be tokenized."""

    text: str
    rid: str | None
    url: str
    max_new: int | None
    sampling: dict[str, Any]
    name: str
    chat: bool = False  # rendered by the chat template: encode with add_special_tokens=False


class Reader:
    """Reads lines one at a time (`feed`), or a whole file (`read_file`)."""

    def __init__(
        self,
        source: str,
        *,
        encoder: TextEncoder | None = None,
        on_error: str = "stop",
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        context_len: int | None = None,
    ) -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.encoder, self.on_error = encoder, on_error
        self.default_max_new_tokens, self.context_len = default_max_new_tokens, context_len
        self.result = ReadResult(source)
        self._first_line_of: dict[str, int] = {}
        self._hash = hashlib.sha256()
        # Text lines wait here to be tokenized BATCH_LINES at a time; once one waits, every later
        # line (good or bad) queues behind it, so requests and errors stay in file order.
        self._batching = callable(getattr(encoder, "encode_batch", None))
        # chats join the batches as text rendered line by line: the template's Python is per
        # line anyway, but the tokenizing then costs one Rust call a batch, not a call a line
        self._batching_chats = self._batching and callable(getattr(encoder, "render_chat", None))
        self._queue: list[tuple[int, Any]] = []
        self._queued_texts = 0

    def feed(self, number: int, raw: bytes | str) -> None:
        """Parse line `number` (1-based); raise `BatchFileError` if bad and stopping (a text line
        is tokenized in a batch, so its error may be raised a few hundred lines later, still
        naming its own line)."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        self._hash.update(raw)
        self.result.size += len(raw)
        if number == 1 and raw.startswith(BOM):
            raw = raw[len(BOM):]
        if not raw.strip():
            return
        self.result.lines += 1
        try:
            item: Any = self._parse(number, raw)
        except PlanInputError as exc:
            item = exc
        if isinstance(item, _TextLine):
            self._queued_texts += 1
        if self._queue or isinstance(item, _TextLine):
            self._queue.append((number, item))
            # full batch; or many token-id lines behind a few texts (bounded memory); or a bad
            # line under stop (stop now, reading no further)
            if (self._queued_texts >= BATCH_LINES or len(self._queue) >= 4 * BATCH_LINES
                    or (self.on_error == "stop" and isinstance(item, PlanInputError))):
                self._flush()
            return
        self._commit(number, item)

    def _commit(self, number: int, item: JobRequest | PlanInputError) -> None:
        try:
            if isinstance(item, PlanInputError):
                raise item
            first = self._first_line_of.get(item.custom_id)
            if first is not None:
                raise PlanInputError(f"duplicate custom_id {item.custom_id!r} (first on line {first}); ids must be unique")
        except PlanInputError as exc:
            error = LineError(number, str(exc), self.result.source)
            if self.on_error == "stop":
                raise BatchFileError(str(error), error) from None
            self.result.errors.append(error)
            return
        self._first_line_of[item.custom_id] = number
        if item.index != len(self.result.requests):  # parsed while earlier lines were queued
            item = dataclasses.replace(item, index=len(self.result.requests))
        self.result.requests.append(item)

    def _flush(self) -> None:
        """Tokenize the queued text lines in one call and commit the queue in file order."""
        queue, self._queue, self._queued_texts = self._queue, [], 0
        texts = [item for _, item in queue if isinstance(item, _TextLine)]
        encoded: list[Any] = self._encode_texts(texts)
        ids_of = {id(t): ids for t, ids in zip(texts, encoded)}
        for number, item in queue:
            if isinstance(item, _TextLine):
                ids = ids_of[id(item)]
                try:
                    if isinstance(ids, PlanInputError):
                        raise ids
                    item = self._request(number, item.rid, item.url, ids, item.max_new, item.sampling, item.name)
                except PlanInputError as exc:
                    item = exc
            self._commit(number, item)

    def _encode_texts(self, texts: list["_TextLine"]) -> list[Any]:
        """Token ids for each text, or the PlanInputError of the one the tokenizer failed on:
        plain texts in one call and rendered chats in another (no special tokens added); a
        failing call is redone line by line to find which line fails."""
        results: list[Any] = [None] * len(texts)
        for chat in (False, True):
            where = [i for i, t in enumerate(texts) if t.chat == chat]
            if not where:
                continue
            batch = [texts[i].text for i in where]
            out: list[Any] | None = None
            try:
                got = (self.encoder.encode_batch(batch, add_special_tokens=False) if chat
                       else self.encoder.encode_batch(batch))
                out = [ids if isinstance(ids, list) else list(ids) for ids in got]
            except Exception:  # noqa: BLE001 - one line's trouble (PlanInputError or the tokenizer's); find it below
                pass
            if out is None or len(out) != len(where):
                out = [self._encode_one(texts[i]) for i in where]
            for i, ids in zip(where, out):
                results[i] = ids
        return results

    def _encode_one(self, t: "_TextLine") -> Any:
        try:
            if t.chat:
                try:
                    return list(self.encoder.encode_batch([t.text], add_special_tokens=False)[0])
                except PlanInputError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the tokenizer's own error
                    raise PlanInputError(f"the tokenizer failed on '{t.name}': {exc}") from None
            return self._encode_now(t.text, t.name)
        except PlanInputError as exc:
            return exc

    def finish(self) -> ReadResult:
        self._flush()
        self.result.sha256 = self._hash.hexdigest()
        if not self.result.lines:
            raise BatchFileError(f"{self.result.source}: the file has no requests (it is empty or all blank lines)")
        return self.result

    # ---- one line -------------------------------------------------------------------------
    def _parse(self, number: int, raw: bytes) -> JobRequest:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanInputError(f"invalid UTF-8 at byte {exc.start + 1} of the line; save the file as UTF-8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanInputError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise PlanInputError("not valid JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise PlanInputError(f"expected a JSON object, got {_kind(obj)}")
        if "body" in obj or "custom_id" in obj or "url" in obj or "method" in obj:
            rid, url, ids, max_new, sampling, name = self._openai(obj)
        else:
            rid, url, ids, max_new, sampling, name = self._native(obj)
        if isinstance(ids, _Text):  # tokenized later, in a batch
            return _TextLine(ids.text, rid, url, max_new, sampling, name, isinstance(ids, _ChatText))
        if ("true" in text or "false" in text) and isinstance(ids, (list, tuple)) and any(isinstance(t, bool) for t in ids):
            raise PlanInputError(f"'{name}' contains true/false; token ids are integers")
        return self._request(number, rid, url, ids, max_new, sampling, name)

    def _request(self, number: int, rid: str | None, url: str, ids: Any, max_new: int | None,
                 sampling: dict[str, Any], name: str) -> JobRequest:
        if not isinstance(ids, (list, tuple)):
            raise PlanInputError(f"'{name}' must be a list of token ids")
        given = max_new is not None
        max_new = max_new if given else self.default_max_new_tokens
        rid = f"line-{number}" if rid is None else rid
        try:
            plan = PlanRequest(rid, ids, max_new)
        except PlanInputError as exc:
            raise PlanInputError(str(exc).replace(f"request {rid!r}: ", "")) from None
        if self.context_len is not None:
            n = plan.prompt_len
            if n >= self.context_len:
                raise PlanInputError(f"the prompt has {n:,} tokens; the model's context is {self.context_len:,}")
            if not given and n + max_new > self.context_len:  # the default shrinks to fit, as in SGLang
                plan = PlanRequest(rid, plan.input_ids, self.context_len - n)
            elif n + max_new > self.context_len:
                raise PlanInputError(
                    f"prompt {n:,} + max tokens {max_new:,} exceed the model's context of {self.context_len:,};"
                    " lower max_tokens"
                )
        return JobRequest(number, len(self.result.requests), url, plan, sampling)

    def _native(self, obj: dict[str, Any]):
        unknown = sorted(set(obj) - NATIVE_FIELDS)
        if unknown:
            raise PlanInputError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(NATIVE_FIELDS))}"
                " (or an OpenAI batch line with custom_id/method/url/body)"
            )
        if ("input_ids" in obj) == ("text" in obj):
            raise PlanInputError("give exactly one of 'input_ids' and 'text'")
        max_new = obj.get("max_new_tokens")
        params = obj.get("sampling_params")
        sampling: dict[str, Any] = {}
        if params is not None:
            if not isinstance(params, dict):
                raise PlanInputError(f"'sampling_params' must be an object, got {_kind(params)}")
            unknown = sorted(set(params) - SGLANG_SAMPLING_FIELDS)
            if unknown:
                raise PlanInputError(f"unknown sampling_params field(s) {', '.join(map(repr, unknown))}")
            sampling = dict(params)
            if "max_new_tokens" in sampling:
                if max_new is not None:
                    raise PlanInputError("max_new_tokens given twice (top level and sampling_params); keep one")
                max_new = sampling.pop("max_new_tokens")
            _check_n(sampling.get("n"), "sampling_params.n")
        if max_new is not None:
            _count(max_new, "max_new_tokens", 0)
        if "input_ids" in obj:
            ids, name = obj["input_ids"], "input_ids"
        else:
            ids, name = self._encode(obj["text"], "text"), "text"
        if "id" in obj and "rid" in obj:
            raise PlanInputError("give one of 'id' and 'rid' (the same thing)")
        key = "rid" if "rid" in obj else "id"
        return _rid(obj.get(key), key), COMPLETIONS, ids, max_new, sampling, name

    def _openai(self, obj: dict[str, Any]):
        unknown = sorted(set(obj) - OPENAI_FIELDS)
        if unknown:
            raise PlanInputError(
                f"unknown field(s) {', '.join(map(repr, unknown))} in an OpenAI batch line;"
                f" allowed: {', '.join(sorted(OPENAI_FIELDS))}"
            )
        body = obj.get("body")
        if not isinstance(body, dict):
            raise PlanInputError(f"'body' must be an object, got {_kind(body)}" if "body" in obj
                                 else "an OpenAI batch line needs a 'body' object")
        method = obj.get("method", "POST")
        if method != "POST":
            raise PlanInputError(f"method {method!r} is not supported; batch lines use \"POST\"")
        url = obj.get("url", CHAT if "messages" in body else COMPLETIONS)
        if url not in URLS:
            raise PlanInputError(f"url {url!r} is not supported; use one of {', '.join(URLS)}")
        unknown = sorted(set(body) - BODY_FIELDS)
        if unknown:
            raise PlanInputError(f"unknown body field(s) {', '.join(map(repr, unknown))}; supported: "
                                 f"{', '.join(sorted(BODY_FIELDS))}")
        if url == CHAT:
            if "messages" not in body or "prompt" in body:
                raise PlanInputError(f"a {CHAT} body needs 'messages' (and no 'prompt')")
            ids, name = self._encode(_messages(body["messages"]), "body.messages"), "body.messages"
        else:
            if "prompt" not in body or "messages" in body:
                raise PlanInputError(f"a {COMPLETIONS} body needs 'prompt' (and no 'messages'); chats go to {CHAT}")
            prompt = body["prompt"]
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]  # a batch of one prompt
            if isinstance(prompt, str):
                if not prompt:
                    raise PlanInputError("empty prompt; a request needs at least one token")
                ids = self._encode(prompt, "body.prompt")
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                raise PlanInputError("'body.prompt' must be a string or a list of token ids (one prompt per line)")
            name = "body.prompt"
        if body.get("stream"):
            raise PlanInputError("'stream': true is not supported in a batch file")
        _check_n(body.get("n"), "body.n")
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise PlanInputError("give one of body.max_tokens and body.max_completion_tokens")
        key = "max_tokens" if "max_tokens" in body else "max_completion_tokens"
        max_new = body.get(key)
        if max_new is not None:
            _count(max_new, f"body.{key}", 1)
        return _rid(obj.get("custom_id"), "custom_id"), url, ids, max_new, _openai_sampling(body), name

    def _encode(self, what: Any, name: str) -> list[int]:
        if self.encoder is None:
            raise PlanInputError(f"'{name}' needs a tokenizer; pass --tokenizer PATH (or give token ids)")
        if name == "body.messages" and self._batching_chats:
            try:
                return _ChatText(self.encoder.render_chat(what))
            except PlanInputError:
                raise
            except Exception as exc:  # noqa: BLE001 - the template's own error
                raise PlanInputError(f"the tokenizer failed on '{name}': {exc}") from None
        if name != "body.messages":
            if not isinstance(what, str):
                raise PlanInputError(f"'{name}' must be a string, got {_kind(what)}")
            if not what:
                raise PlanInputError(f"empty '{name}'; a request needs at least one token")
            if self._batching:
                return _Text(what)
        return self._encode_now(what, name)

    def _encode_now(self, what: Any, name: str) -> list[int]:
        try:
            ids = self.encoder.encode_chat(what) if name == "body.messages" else self.encoder.encode(what)
        except PlanInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - the tokenizer's own error, e.g. no chat template
            raise PlanInputError(f"the tokenizer failed on '{name}': {exc}") from None
        return list(ids)


def _openai_sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0),
                           ("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0)):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PlanInputError(f"body.{key} must be a number, got {value!r}")
        if not low <= value <= high or (key == "top_p" and value == 0):
            raise PlanInputError(f"body.{key} = {value} is out of range {'(0' if key == 'top_p' else f'[{low:g}'}, {high:g}]")
        out[key] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise PlanInputError("body.stop must be a non-empty string or a list of them")
        out["stop"] = stops
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PlanInputError(f"body.seed must be an integer, got {seed!r}")
        out["sampling_seed"] = seed
    return out


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise PlanInputError(f"'body.messages' must be a list of message objects, got {_kind(messages)}")
    if not messages:
        raise PlanInputError("empty 'body.messages'; a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise PlanInputError(f"body.messages[{i}] must be an object with 'role' and 'content'")
    return messages


def _check_n(n: Any, name: str) -> None:
    if n is None or (n == 1 and not isinstance(n, bool)):
        return
    raise PlanInputError(f"{name} = {n!r}: one completion per line only; repeat the line with its own custom_id")


def _count(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanInputError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise PlanInputError(f"{name} must be >= {low}, got {value}")


def _rid(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PlanInputError(f"'{name}' must be a string or an integer, got {_kind(value)}")
    if value == "":
        raise PlanInputError(f"'{name}' is empty")
    return str(value)


def _kind(value: Any) -> str:
    return {type(None): "null", dict: "an object", list: "an array", str: "a string", bool: "true/false"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


# ---- whole files --------------------------------------------------------------------------


def read_lines(lines: Iterable[bytes | str], source: str = "<batch>", **options: Any) -> ReadResult:
    """Read an iterable of lines (tests, stdin); see `Reader` for the options."""
    reader = Reader(source, **options)
    for number, raw in enumerate(lines, start=1):
        reader.feed(number, raw)
    return reader.finish()


def read_file(path: str, *, progress: Callable[[int], None] | None = None, **options: Any) -> ReadResult:
    """Read `path` ('-': stdin) line by line. `progress(bytes_so_far)` is called now and then.
    Raises `BatchFileError` for a bad line (under stop), an empty file or an unreadable one."""
    try:
        stream: BinaryIO = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise BatchFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    reader = Reader(path, **options)
    try:
        with stream if path != "-" else _nothing():
            for number, raw in enumerate(_binary_lines(stream), start=1):
                reader.feed(number, raw)
                if progress is not None and number % 1024 == 0:
                    progress(reader.result.size)
    except OSError as exc:
        raise BatchFileError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if progress is not None:
        progress(reader.result.size)
    return reader.finish()


def _binary_lines(stream: BinaryIO) -> Iterator[bytes]:
    yield from stream


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def file_identity(path: str) -> dict[str, Any]:
    """Size and sha256 of a file, streamed in 1 MiB blocks (what `ReadResult` records)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def as_identity(result: ReadResult) -> dict[str, Any]:
    return {"path": os.path.abspath(result.source), "size": result.size, "sha256": result.sha256}
