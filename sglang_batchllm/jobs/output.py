"""OpenAI batch output lines, written whole, and the record that ties an output to its input.

The record is a sidecar `<output>.meta.json` (format, input path, size, sha256), not a first
line of the output: the output then stays pure OpenAI batch output (every line a response, as
any consumer of that format expects), and the sidecar is replaced atomically (write, fsync,
rename) so it is never half written.

Whole lines only: lines are appended by one `os.write` per batch of lines, then `fsync`. A
process killed inside that write can leave a partial last line; `open_output` truncates it
away (with a notice) before resuming, so the file always ends at a line boundary.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .records import CHAT, JobRequest

FORMAT = "sglang_batchllm.batch/1"
META_SUFFIX = ".meta.json"


class ResumeError(Exception):
    """The output cannot be resumed (another input's output, or not ours); the message says what to do."""


@dataclass(frozen=True)
class Completion:
    """What an engine returns for one request (SGLang's output dict, flattened)."""

    text: str
    finish_reason: str | None  # "stop" | "length"; None with `error`
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    error: str | None = None  # the request failed: this goes to the errors file


def response_line(req: JobRequest, done: Completion, model: str) -> str:
    request_id = uuid.uuid4().hex
    usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
             "total_tokens": done.prompt_tokens + done.completion_tokens}
    if done.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": done.cached_tokens}
    if req.url == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                  "finish_reason": done.finish_reason}
        body = {"id": f"chatcmpl-{request_id}", "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
        body = {"id": f"cmpl-{request_id}", "object": "text_completion"}
    body.update(created=int(time.time()), model=model, choices=[choice], usage=usage)
    line = {"id": f"batch_req_{request_id}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}
    return json.dumps(line, ensure_ascii=False) + "\n"


def error_line(custom_id: str | None, code: str, message: str) -> str:
    """A failed request in OpenAI's batch error form: no response, `error: {code, message}`."""
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}
    return json.dumps(line, ensure_ascii=False) + "\n"


class LineFile:
    """Appends whole lines: `write(lines)` is one `os.write` of all of them, then fsync."""

    def __init__(self, path: str, *, truncate: bool = False) -> None:
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(path, flags, 0o644)
        self.lines = 0

    def write(self, lines: list[str]) -> None:
        if not lines:
            return
        data = "".join(lines).encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it all at once; loop only for the rare short write
            view = view[os.write(self.fd, view):]
        os.fsync(self.fd)
        self.lines += len(lines)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Resume:
    done: set[str] = field(default_factory=set)  # custom_ids already in the output
    notices: list[str] = field(default_factory=list)


def meta_path(output: str) -> str:
    return output + META_SUFFIX


def open_output(output: str, identity: dict[str, Any]) -> Resume:
    """Check `output` belongs to the input `identity` (size, sha256), repair a torn last line,
    and return the custom_ids it holds; a new output gets its record first."""
    resume = Resume()
    meta = meta_path(output)
    has_output = os.path.exists(output) and os.path.getsize(output) > 0
    if os.path.exists(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                record = json.load(f)
            recorded = record["input"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResumeError(f"{meta} is unreadable ({exc}); delete it and {output} to start over") from None
        if (recorded.get("sha256"), recorded.get("size")) != (identity["sha256"], identity["size"]):
            raise ResumeError(
                f"{output} holds results of another input ({recorded.get('path')}, {recorded.get('size'):,} bytes,"
                f" sha256 {str(recorded.get('sha256'))[:12]}...), not of {identity['path']} "
                f"({identity['size']:,} bytes, sha256 {identity['sha256'][:12]}...); pass another -o, or delete"
                f" {output} and {meta} to start over"
            )
    elif has_output:
        raise ResumeError(f"{output} exists but has no {META_SUFFIX} record, so it cannot be matched to this input;"
                          " pass another -o, or delete it")
    if not os.path.exists(meta):
        _write_atomically(meta, {"format": FORMAT, "input": identity, "created": int(time.time())})
    if has_output:
        _scan(output, resume)
    return resume


def _scan(output: str, resume: Resume) -> None:
    with open(output, "rb+") as f:
        data_end = f.seek(0, os.SEEK_END)
        keep = data_end
        if data_end:
            f.seek(max(0, data_end - 1))
            if f.read(1) != b"\n":  # a torn last line: find the last complete one
                keep = _last_newline_end(f, data_end)
                f.truncate(keep)
                os.fsync(f.fileno())
                resume.notices.append(f"{output}: removed a partial last line ({data_end - keep} bytes) left by an"
                                      " interrupted run; that request runs again")
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            try:
                resume.done.add(json.loads(raw)["custom_id"])
            except (ValueError, KeyError, TypeError):
                raise ResumeError(f"{output}:{number}: not a response line of this command; pass another -o") from None


def _last_newline_end(f, end: int) -> int:
    block = 1 << 16
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _write_atomically(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
