"""Read a batch file (JSONL) into `PlanRequest`s, reporting bad lines by number.

Two line formats:
- native: `{"input_ids": [...]}` or `{"text": "..."}`, with optional `"id"` (str or int) and
  `"max_new_tokens"` (or SGLang-style `"sampling_params": {"max_new_tokens": N}`);
  any other field is an error (a typo such as `"max_tokens"` must not pass unnoticed);
- OpenAI batch API: `{"custom_id": ..., "method": "POST", "url": "/v1/completions" or
  "/v1/chat/completions", "body": {...}}` with `body.prompt` (a string or token ids) or
  `body.messages` (needs a tokenizer with a chat template), and `body.max_tokens` or
  `body.max_completion_tokens`. Other body fields (model, temperature, ...) are ignored.

Text needs a `TextEncoder`; the CLI builds one from a Hugging Face tokenizer. A line without
an id gets `line-N`. Blank lines are not requests and are passed over.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .inputs import PlanInputError, PlanRequest

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default for a request that does not say
NATIVE_FIELDS = frozenset({"id", "input_ids", "text", "max_new_tokens", "sampling_params"})
OPENAI_FIELDS = frozenset({"custom_id", "method", "url", "body"})
OPENAI_URLS = ("/v1/completions", "/v1/chat/completions")
ON_ERROR_CHOICES = ("stop", "skip")


class TextEncoder(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> Sequence[int]: ...


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based line number in the file
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class BatchFileError(PlanInputError):
    """A bad line under `on_error="stop"`; `.error` has the line number and the reason."""

    def __init__(self, source: str, error: LineError) -> None:
        super().__init__(f"{source}: {error}")
        self.error = error


def read_batch(
    lines: Iterable[str],
    *,
    encoder: TextEncoder | None = None,
    on_error: str = "stop",
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    source: str = "<batch>",
) -> tuple[list[PlanRequest], list[LineError]]:
    """Parse every line; return the requests and the errors of the lines skipped.

    `on_error="stop"` raises `BatchFileError` at the first bad line; `"skip"` leaves the line
    out and records why. Either way no line is dropped without a `LineError`.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    requests: list[PlanRequest] = []
    errors: list[LineError] = []
    first_line_of: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            req = parse_line(line, number, encoder, default_max_new_tokens)
            if req.rid in first_line_of:
                raise PlanInputError(
                    f"duplicate id {req.rid!r} (first on line {first_line_of[req.rid]}); ids must be unique"
                )
        except PlanInputError as exc:
            error = LineError(number, str(exc))
            if on_error == "stop":
                raise BatchFileError(source, error) from None
            errors.append(error)
            continue
        first_line_of[req.rid] = number
        requests.append(req)
    return requests, errors


def parse_line(line: str, number: int, encoder: TextEncoder | None, default_max_new_tokens: int) -> PlanRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PlanInputError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise PlanInputError(f"expected a JSON object, got {type(obj).__name__}")
    if "body" in obj or "custom_id" in obj:
        rid, ids, max_new, name = _openai_line(obj, encoder)
    else:
        rid, ids, max_new, name = _native_line(obj, encoder)
    if not isinstance(ids, (list, tuple)):
        raise PlanInputError(f"'{name}' must be a list of token ids")
    if ("true" in line or "false" in line) and any(isinstance(t, bool) for t in ids):
        raise PlanInputError(f"'{name}' contains true/false; token ids are integers")
    rid = f"line-{number}" if rid is None else rid
    return PlanRequest(rid, ids, default_max_new_tokens if max_new is None else max_new)


def _native_line(obj: dict[str, Any], encoder: TextEncoder | None) -> tuple[str | None, Any, Any, str]:
    unknown = sorted(set(obj) - NATIVE_FIELDS)
    if unknown:
        raise PlanInputError(
            f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(NATIVE_FIELDS))}"
            " (or an OpenAI batch line with custom_id/body)"
        )
    if ("input_ids" in obj) == ("text" in obj):
        raise PlanInputError("give exactly one of 'input_ids' and 'text'")
    max_new = obj.get("max_new_tokens")
    params = obj.get("sampling_params")
    if params is not None:
        if not isinstance(params, dict):
            raise PlanInputError("'sampling_params' must be an object")
        if "max_new_tokens" in params:
            if max_new is not None:
                raise PlanInputError("max_new_tokens given twice (top level and sampling_params); keep one")
            max_new = params["max_new_tokens"]
    ids = obj["input_ids"] if "input_ids" in obj else _encode(encoder, obj["text"], "text")
    return _rid(obj.get("id"), "id"), ids, max_new, "input_ids" if "input_ids" in obj else "text"


def _openai_line(obj: dict[str, Any], encoder: TextEncoder | None) -> tuple[str | None, Any, Any, str]:
    unknown = sorted(set(obj) - OPENAI_FIELDS)
    if unknown:
        raise PlanInputError(
            f"unknown field(s) {', '.join(map(repr, unknown))} in an OpenAI batch line;"
            f" allowed: {', '.join(sorted(OPENAI_FIELDS))}"
        )
    url = obj.get("url", "/v1/chat/completions" if "messages" in obj.get("body", {}) else "/v1/completions")
    if url not in OPENAI_URLS:
        raise PlanInputError(f"url {url!r} is not supported; use one of {', '.join(OPENAI_URLS)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise PlanInputError("an OpenAI batch line needs a 'body' object")
    if ("prompt" in body) == ("messages" in body):
        raise PlanInputError("the body needs exactly one of 'prompt' and 'messages'")
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise PlanInputError("'body.messages' must be a list of message objects")
        ids = _encode(encoder, messages, "body.messages")
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            ids = _encode(encoder, prompt, "body.prompt")
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise PlanInputError("'body.prompt' must be a string or a list of token ids (one prompt per line)")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise PlanInputError("give one of body.max_tokens and body.max_completion_tokens")
    max_new = body.get("max_tokens", body.get("max_completion_tokens"))
    return _rid(obj.get("custom_id"), "custom_id"), ids, max_new, "body.messages" if "messages" in body else "body.prompt"


def _rid(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PlanInputError(f"'{name}' must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _encode(encoder: TextEncoder | None, what: Any, name: str) -> Sequence[int]:
    if encoder is None:
        raise PlanInputError(f"'{name}' needs a tokenizer; pass --tokenizer PATH (or give token ids)")
    if name != "body.messages" and not isinstance(what, str):
        raise PlanInputError(f"'{name}' must be a string")
    try:
        ids = encoder.encode_chat(what) if name == "body.messages" else encoder.encode(what)
    except PlanInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the tokenizer's own error, e.g. no chat template
        raise PlanInputError(f"the tokenizer failed on '{name}': {exc}") from None
    return list(ids)
