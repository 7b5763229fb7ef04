"""`POST /v1/files` bodies: multipart, size-limited while it streams, and validated line by line.

The limit is enforced on the bytes as they arrive (a `Content-Length` over it is refused before
reading anything, and a body without one is cut off when it passes the limit), so an upload
over the limit never fills the disk. The file is then checked with the batch command's reader,
the same `FILE:LINE: reason` messages, FILE being the name the client gave.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from ..jobs.reader import ReadResult, read_lines
from .objects import ApiError

MULTIPART_OVERHEAD = 64 * 1024  # room for the part headers and the purpose field around the file
_COPY_BLOCK = 1 << 20


@dataclass(frozen=True)
class Upload:
    filename: str
    purpose: str
    size: int


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than this server's limit of {limit / 2**20:,.0f} MiB; split the "
                         "batch into smaller files, or start the server with a larger --batchllm-max-upload-mb",
                    param="file", code="file_too_large")


async def receive_upload(request: Request, limit: int, dest: str) -> Upload:
    """Parse the multipart body and store its `file` part at `dest` (written whole, then renamed)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send the file as multipart/form-data with the fields 'file' and 'purpose' "
                            "(what client.files.create does)", param="file")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)

    async def limited() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit + MULTIPART_OVERHEAD:
                raise _too_large(limit)
            yield chunk

    parser = MultiPartParser(request.headers, limited(), max_files=1, max_fields=8)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, f"the multipart body cannot be read: {exc}", param="file") from None
    try:
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch' (the only purpose this server stores), got {purpose!r}",
                           param="purpose")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "the multipart body has no 'file' part; send the batch file as the field 'file'",
                           param="file")
        # the copy (up to the limit, hundreds of MiB) runs off the event loop, which keeps serving
        size = await asyncio.to_thread(_store, upload.file, dest, limit)
        return Upload(clean_filename(upload.filename), purpose, size)
    finally:
        await form.close()


def _store(source: BinaryIO, dest: str, limit: int) -> int:
    tmp = f"{dest}.part"
    size = 0
    source.seek(0)
    try:
        with open(tmp, "wb") as out:
            while block := source.read(_COPY_BLOCK):
                size += len(block)
                if size > limit:
                    raise _too_large(limit)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return size


def clean_filename(name: str | None) -> str:
    """What the file object shows as `filename`: the client's base name, printable, at most 255 chars."""
    base = os.path.basename((name or "").replace("\\", "/"))
    base = re.sub(r"[\x00-\x1f\x7f]", "", base)[:255]
    return base or "upload.jsonl"


def validate(path: str, source: str, **reader_options: Any) -> ReadResult:
    """Read every line of the stored file; raises the reader's `BatchFileError` at the first bad one."""
    with open(path, "rb") as f:
        return read_lines(f, source=source, on_error="stop", **reader_options)
