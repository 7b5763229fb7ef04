"""The batch lifecycle: files in, batches run one at a time through the job runner, results out.

Statuses (openai.types.Batch): `validating` (its file is read and checked at once, when the
batch is created, not when its turn comes) -> `in_progress` (validated and accepted: queued
behind the batches before it, then its requests go to the engine: the whole file as one batch,
windows of `window` requests as in the batch command) -> `finalizing` (output and error files
registered) -> `completed`; `failed` when the file fails the checks or the job breaks; `cancel`
moves an active batch to `cancelling`, stops admitting its requests (the engine aborts what it
had not finished), keeps what finished, and ends in `cancelled`; a batch whose
`completion_window` passes (its `expires_at`) before it completes is stopped the same way and
ends `expired`: finished requests stay in the output file, every unfinished one gets an error
line with code `batch_expired`.

Time is `clock()` (time.time unless a test passes another); expiry is checked every
`expiry_poll` seconds, and at start, before anything resumes.

Durability: every status change is a committed SQLite row. Results are appended to the batch's
output and error files by the job runner (whole lines, fsync), and `request_counts` follow the
lines written. On start, batches whose window passed while the server was down expire; the
other `in_progress` batches resume: the custom_ids already in either file are skipped (the
batch command's resume), so a kill loses at most the lines not yet written, and those requests
run again; no line is written twice. `validating` batches are validated again. A server that
stops normally leaves its running batch `in_progress`, to resume the same way.

Reading and planning a file (tokenizing, hashing, the planner) run on one worker thread, off
the event loop that serves every other request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..jobs.engines import Backend
from ..jobs.output import LineFile, ResumeError, error_line, open_output
from ..jobs.progress import ProgressBar, Tally
from ..jobs.reader import DEFAULT_MAX_NEW_TOKENS, ReadResult
from ..jobs.records import CHAT, URLS, BatchFileError
from ..jobs.runner import DEFAULT_WINDOW, RunOptions, job_sink, plan_windows, run_windows
from ..jobs.tokenizer import HFEncoder
from ..planner.inputs import PlannerConfig
from . import ids
from .objects import (ACTIVE, CANCELLED, CANCELLING, COMPLETED, EXPIRED, FAILED, FINALIZING, IN_PROGRESS,
                      TERMINAL, VALIDATING, ApiError)
from .store import Store
from .uploads import receive_upload, validate

logger = logging.getLogger(__name__)

COMPLETION_WINDOW = "24h"  # the only window OpenAI's API accepts (openai.types.batch_create_params)
DAY = 24 * 3600
FILE_LIST_MAX = 10_000  # OpenAI's limit and default for GET /v1/files (openai.resources.files.Files.list)
_ENDED_AT = {COMPLETED: "completed_at", CANCELLED: "cancelled_at", EXPIRED: "expired_at"}


@dataclass(frozen=True)
class Settings:
    max_upload_bytes: int
    tokenizer_path: str
    model: str
    context_len: int | None = None
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    window: int = DEFAULT_WINDOW
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    run: RunOptions = field(default_factory=RunOptions)
    # The Jinja text the server renders chats with (chat.py), used in place of the tokenizer's
    # own; and, where the server renders chats in a way the batch API cannot, why chat batches
    # are refused.
    chat_template: str | None = None
    chat_refused: str | None = None


class _ServerEncoder(HFEncoder):
    """The tokenizer, rendering chats with the server's template in place of its own, so a chat
    line becomes the prompt `/v1/chat/completions` would make of it."""

    def __init__(self, path: str, template: str | None) -> None:
        super().__init__(path, lazy=True)
        self.template = template

    def _load(self) -> None:
        super()._load()
        if self.template is not None and self.tok is not None:
            self.tok.chat_template = self.template


class _CountedLines(LineFile):
    """A LineFile that reports each write, so `request_counts` follow the lines on disk."""

    def __init__(self, path: str, on_write: Callable[[], None]) -> None:
        super().__init__(path)
        self.on_write = on_write

    def write(self, lines: list[str]) -> None:
        super().write(lines)
        if lines:
            self.on_write()


class BatchService:
    def __init__(self, store: Store, settings: Settings, backend: Backend,
                 ready: Callable[[], bool] = lambda: True, *, clock: Callable[[], float] = time.time,
                 expiry_poll: float = 1.0) -> None:
        self.store, self.settings, self.backend, self.ready = store, settings, backend, ready
        self.clock, self.expiry_poll = clock, expiry_poll
        self.encoder = _ServerEncoder(settings.tokenizer_path, settings.chat_template)
        # One thread: the tokenizer is not shared across threads, and a file read never takes
        # more than one of the host's cores from the server.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchllm-batch-read")
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._job: asyncio.Task | None = None
        self._running: str | None = None  # id of the batch whose job is running
        self._cancelled: set[str] = set()  # batches a user cancelled while they ran
        self._expiring: set[str] = set()  # batches whose window passed while they ran
        self._validations: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        for row in self.store.batches_with_status((CANCELLING,)):
            await self._finish(row, CANCELLED)
        for row in self.store.batches_with_status((FINALIZING,)):
            await self._finish(row, COMPLETED)
        # A window that passed while the server was down ends the batch now, before it resumes.
        await self.expire_due()
        for row in self.store.batches_with_status((VALIDATING,)):  # stopped mid-validation
            self._spawn_validation(row["id"])
        self._worker = asyncio.create_task(self._work(), name="batchllm-batch-worker")
        self._watcher = asyncio.create_task(self._watch_expiry(), name="batchllm-batch-expiry")

    async def stop(self) -> None:
        """Stop the worker; a running batch stays `in_progress` and resumes on the next start."""
        if self._running is not None:
            logger.warning("stopping with batch %s unfinished; it resumes when the server starts again "
                           "on this jobs directory", self._running)
        tasks = (self._watcher, *self._validations, self._job, self._worker)
        for task in tasks:
            if task is not None and not task.done():
                task.cancel()
        for task in tasks:
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping regardless
                    pass
        self._reader.shutdown(wait=False, cancel_futures=True)

    async def _work(self) -> None:
        while True:
            # Only validated batches queue; `validating` ones are being read by their own task.
            queue = self.store.batches_with_status((IN_PROGRESS,))
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            while not self.ready():  # SGLang's warmup has not finished: the engine is not up yet
                await asyncio.sleep(0.5)
            row = queue[0]
            if self._past_window(row):  # the watcher may not have come round yet
                await self._expire(row)
                continue
            self._running = row["id"]
            self._job = asyncio.create_task(self._process(row), name=f"batchllm-{row['id']}")
            try:
                await self._job
            except asyncio.CancelledError:
                batch_id = row["id"]
                if batch_id in self._cancelled:
                    self._cancelled.discard(batch_id)
                    self._expiring.discard(batch_id)
                    await self._finish(self.store.get_batch(batch_id), CANCELLED)
                elif batch_id in self._expiring:
                    self._expiring.discard(batch_id)
                    current = self.store.get_batch(batch_id)
                    if current["status"] == FINALIZING:  # every request had finished: not expired
                        await self._finish(current, COMPLETED)
                    else:
                        await self._expire(current)
                else:
                    raise  # the server is stopping
            except Exception as exc:  # noqa: BLE001 - one broken job must not stop the worker
                logger.exception("batch %s failed", row["id"])
                self._fail(row["id"], "job_failed", f"the job stopped with an error: {exc}")
            finally:
                self._running, self._job = None, None

    # ---- one batch -------------------------------------------------------------------------------
    async def _process(self, row: dict[str, Any]) -> None:
        # The file was validated when the batch was created; it is read again here (its requests
        # are not kept in memory while the batch queues), and a resume needs the read anyway.
        result = await self._read_input(row)
        if result is None:
            return
        await self._run(row, result)
        await self._finish(self.store.get_batch(row["id"]), COMPLETED)

    def _spawn_validation(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._validate_batch(batch_id),
                                                      name=f"batchllm-validate-{batch_id}")
        self._validations.add(task)
        task.add_done_callback(self._validated)

    def _validated(self, task: asyncio.Task) -> None:
        self._validations.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("validating a batch failed", exc_info=task.exception())

    async def _validate_batch(self, batch_id: str) -> None:
        """Read and check the batch's file now, not when its turn comes: a bad file fails at once,
        and a good one becomes `in_progress` (queued) with its `request_counts.total`."""
        row = self.store.get_batch(batch_id)
        if row is None or row["status"] != VALIDATING:
            return
        try:
            result = await self._read_input(row)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the server goes on
            logger.exception("batch %s: validation broke", batch_id)
            self._fail(batch_id, "validation_failed", f"validating the input file stopped with an error: {exc}")
            return
        if result is None:
            return
        # Checked after the read: a cancel or an expiry may have ended the batch meanwhile.
        if self.store.get_batch(batch_id)["status"] != VALIDATING:
            return
        wrong = [r for r in result.requests if r.url != row["endpoint"]]
        if wrong:
            self._fail(batch_id, "invalid_url", [
                (r.line, f"{result.source}:{r.line}: url is {r.url} but the batch's endpoint is "
                         f"{row['endpoint']}; every line of a batch must use its endpoint") for r in wrong[:100]])
            return
        self.store.update_batch(batch_id, status=IN_PROGRESS, in_progress_at=self._now(), total=len(result.requests))
        self._wake.set()

    # ---- expiry ------------------------------------------------------------------------------
    def _past_window(self, row: dict[str, Any]) -> bool:
        return row.get("expires_at") is not None and self.clock() >= row["expires_at"]

    async def _watch_expiry(self) -> None:
        while True:
            try:
                await self.expire_due()
            except Exception:  # noqa: BLE001 - keep watching; the next round tries again
                logger.exception("checking batches for expiry failed")
            await asyncio.sleep(self.expiry_poll)

    async def expire_due(self) -> None:
        """End every batch whose window has passed and that has not completed: the running one is
        stopped as a cancel stops it (the worker then expires it), the others expire now."""
        for row in self.store.batches_with_status((VALIDATING, IN_PROGRESS)):
            if not self._past_window(row) or row["id"] in self._expiring:
                continue
            if self._running == row["id"] and self._job is not None:
                self._expiring.add(row["id"])
                self._job.cancel()
            else:
                await self._expire(row)

    async def _expire(self, row: dict[str, Any]) -> None:
        """Write a `batch_expired` error line for each request of the file that is in neither the
        output nor the error file, then register the files and end `expired`."""
        batch_id = row["id"]
        logger.warning("batch %s: its %s completion window passed before it completed; it expires",
                       batch_id, row["completion_window"])
        file = self.store.get_file(row["input_file_id"])
        result = None
        if file is not None:
            try:
                result = await self._off_loop(self._validate, self.store.path(file["path"]), file["filename"])
            except (BatchFileError, OSError) as exc:  # nothing ran from a file that cannot be read
                logger.warning("batch %s: its input cannot be read (%s); expiring without error lines",
                               batch_id, exc)
        if result is not None:
            folder = self.store.path(row["dir"])
            os.makedirs(folder, mode=0o700, exist_ok=True)
            out_path, err_path = os.path.join(folder, "output.jsonl"), os.path.join(folder, "errors.jsonl")
            identity = {"path": row["input_file_id"], "size": result.size, "sha256": result.sha256}
            try:  # also cuts a torn last line a kill left, so the files end whole
                done_out, done_err = open_output(out_path, identity), open_output(err_path, identity)
            except ResumeError as exc:
                raise RuntimeError(f"cannot expire batch {batch_id} from its own files: {exc}") from None
            done = done_out.done | done_err.done
            message = (f"the batch's {row['completion_window']} completion window ended before this request "
                       "ran; submit it again in a new batch")
            lines = [error_line(r.custom_id, "batch_expired", message)
                     for r in result.requests if r.custom_id not in done]
            err = LineFile(err_path)
            try:
                err.write(lines)
            finally:
                err.close()
            row = self.store.update_batch(batch_id, total=len(result.requests), completed=len(done_out.done),
                                          failed=len(done_err.done) + len(lines))
        await self._finish(row, EXPIRED)

    async def _read_input(self, row: dict[str, Any]) -> ReadResult | None:
        file = self.store.get_file(row["input_file_id"])
        if file is None:
            self._fail(row["id"], "missing_input", f"the input file {row['input_file_id']} was deleted; "
                                                   "upload it again and create a new batch")
            return None
        try:
            return await self._off_loop(self._validate, self.store.path(file["path"]), file["filename"])
        except BatchFileError as exc:
            self._fail(row["id"], "invalid_request", [(exc.error.line if exc.error else None, str(exc))])
        except OSError as exc:
            self._fail(row["id"], "missing_input", f"the input file {row['input_file_id']} cannot be read: {exc}")
        return None

    async def _run(self, row: dict[str, Any], result: ReadResult) -> None:
        batch_id = row["id"]
        folder = self.store.path(row["dir"])
        os.makedirs(folder, mode=0o700, exist_ok=True)
        out_path, err_path = os.path.join(folder, "output.jsonl"), os.path.join(folder, "errors.jsonl")
        identity = {"path": row["input_file_id"], "size": result.size, "sha256": result.sha256}
        try:
            done_out, done_err = open_output(out_path, identity), open_output(err_path, identity)
        except ResumeError as exc:
            raise RuntimeError(f"cannot resume from the batch's own files: {exc}") from None
        for notice in done_out.notices + done_err.notices:
            logger.warning("batch %s: %s", batch_id, notice)
        done = done_out.done | done_err.done
        todo = [r for r in result.requests if r.custom_id not in done]
        base_ok, base_failed = len(done_out.done), len(done_err.done)
        out = err = None

        def counts() -> None:
            self.store.update_batch(batch_id, completed=base_ok + out.lines, failed=base_failed + err.lines)

        out, err = _CountedLines(out_path, counts), _CountedLines(err_path, counts)
        try:
            counts()
            if done:
                logger.info("batch %s: resuming, %d of %d requests already done", batch_id, len(done),
                            len(result.requests))
            windows = await self._off_loop(plan_windows, todo, self.settings.planner, self.settings.window)
            sink = job_sink(todo, out, err, self.settings.run)
            tally = Tally(total=len(todo), skipped_done=len(done))
            await run_windows(windows, self.backend, sink, tally, ProgressBar(tally, enabled=False))
        finally:
            out.close()
            err.close()

    async def _finish(self, row: dict[str, Any], status: str) -> None:
        """Register the output and error files, sum the usage, and end in `status`."""
        batch_id, now = row["id"], self._now()
        if status == COMPLETED and row["status"] != FINALIZING:
            row = self.store.update_batch(batch_id, status=FINALIZING, finalizing_at=now)
        folder = self.store.path(row["dir"])
        changes: dict[str, Any] = {"status": status, _ENDED_AT[status]: now}
        for kind, column in (("output", "output_file_id"), ("errors", "error_file_id")):
            path = os.path.join(folder, f"{kind}.jsonl")
            if row.get(column) is None and os.path.exists(path) and os.path.getsize(path) > 0:
                changes[column] = self._register(path, f"{batch_id}_{'output' if kind == 'output' else 'error'}.jsonl")
        out_path = os.path.join(folder, "output.jsonl")
        if os.path.exists(out_path):
            changes["usage"] = await self._off_loop(_usage, out_path)
        self.store.update_batch(batch_id, **changes)

    def _register(self, path: str, filename: str) -> str:
        file_id = ids.new_id(ids.FILE_PREFIX)
        self.store.add_file({"id": file_id, "purpose": "batch_output", "filename": filename,
                             "bytes": os.path.getsize(path), "created_at": self._now(),
                             "path": os.path.relpath(path, self.store.root)})
        return file_id

    def _fail(self, batch_id: str, code: str, errors: str | list[tuple[int | None, str]]) -> None:
        if isinstance(errors, str):
            errors = [(None, errors)]
        data = [{"code": code, "line": line, "message": message, "param": None} for line, message in errors]
        self.store.update_batch(batch_id, status=FAILED, failed_at=self._now(), errors=data)

    def _validate(self, path: str, source: str) -> ReadResult:
        return validate(path, source, encoder=self.encoder, context_len=self.settings.context_len,
                        default_max_new_tokens=self.settings.default_max_new_tokens)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    def _now(self) -> int:
        return int(self.clock())

    # ---- files -------------------------------------------------------------------------------
    async def upload(self, request) -> dict[str, Any]:
        relative = self.store.new_storage_name("files")
        dest = self.store.path(relative)
        upload = await receive_upload(request, self.settings.max_upload_bytes, dest)
        try:
            await self._off_loop(self._validate, dest, upload.filename)
        except BatchFileError as exc:
            os.unlink(dest)
            raise ApiError(400, f"{exc} (the file was not stored: fix the line and upload it again)",
                           param="file", code="invalid_batch_file",
                           line=exc.error.line if exc.error else None) from None
        except BaseException:
            os.unlink(dest)
            raise
        row = {"id": ids.new_id(ids.FILE_PREFIX), "purpose": upload.purpose, "filename": upload.filename,
               "bytes": upload.size, "created_at": self._now(), "path": relative}
        self.store.add_file(row)
        return row

    def file(self, file_id: str) -> dict[str, Any]:
        row = self.store.get_file(file_id) if ids.is_id(ids.FILE_PREFIX, file_id) else None
        if row is None:
            raise ApiError(404, f"no file with id {file_id[:64]!r}; ids are what POST /v1/files returned",
                           param="file_id", code="file_not_found")
        return row

    def list_files(self, limit: int, after: str | None, purpose: str | None, order: str) -> tuple[list[dict[str, Any]], bool]:
        if not 1 <= limit <= FILE_LIST_MAX:
            raise ApiError(400, f"limit must be 1..{FILE_LIST_MAX}, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be 'asc' or 'desc', got {order[:64]!r}", param="order")
        if after is not None and (not ids.is_id(ids.FILE_PREFIX, after) or self.store.get_file(after) is None):
            raise ApiError(400, f"after={after[:64]!r} is not a file id of this server; pass the id of the last "
                                "file of the previous page", param="after")
        return self.store.list_files(limit, after, purpose, ascending=order == "asc")

    def file_path(self, file_id: str) -> str:
        path = self.store.path(self.file(file_id)["path"])
        if not os.path.exists(path):
            raise ApiError(404, f"the content of file {file_id} is gone from the jobs directory",
                           param="file_id", code="file_not_found")
        return path

    def delete_file(self, file_id: str) -> None:
        row = self.file(file_id)
        users = self.store.batches_using(file_id, ACTIVE)
        if users:
            raise ApiError(409, f"file {file_id} is the input of batch {users[0]['id']}, which is "
                                f"{users[0]['status']}; cancel it or wait for it to end, then delete the file",
                           param="file_id", code="file_in_use")
        self.store.delete_file(file_id)
        try:
            os.unlink(self.store.path(row["path"]))
        except FileNotFoundError:
            pass

    # ---- batches -------------------------------------------------------------------------------
    def create_batch(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object with input_file_id, endpoint and completion_window")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise ApiError(400, "input_file_id is required: the id POST /v1/files returned", param="input_file_id")
        file = self.file(file_id)
        if file["purpose"] != "batch":
            raise ApiError(400, f"file {file_id} has purpose {file['purpose']!r}; a batch's input must be "
                                "uploaded with purpose 'batch'", param="input_file_id")
        endpoint = body.get("endpoint")
        if endpoint not in URLS:
            raise ApiError(400, f"endpoint must be one of {', '.join(URLS)} (what this server runs in a batch), "
                                f"got {endpoint!r}", param="endpoint")
        window = body.get("completion_window")
        if window != COMPLETION_WINDOW:
            raise ApiError(400, f"completion_window must be {COMPLETION_WINDOW!r}, got {window!r}",
                           param="completion_window")
        if endpoint == CHAT and self.settings.chat_refused:
            raise ApiError(400, f"chat batches are refused on this server: {self.settings.chat_refused}",
                           param="endpoint", code="chat_template_unsupported")
        metadata = _check_metadata(body.get("metadata"))
        now = self._now()
        row = {"id": ids.new_id(ids.BATCH_PREFIX), "status": VALIDATING, "endpoint": endpoint,
               "input_file_id": file_id, "completion_window": window, "metadata": metadata,
               "model": self.settings.model, "dir": self.store.new_storage_name("batches"),
               "created_at": now, "expires_at": now + DAY}
        self.store.add_batch(row)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # created before the service started: start() validates it
            pass
        else:
            self._spawn_validation(row["id"])
        return self.store.get_batch(row["id"])

    def batch(self, batch_id: str) -> dict[str, Any]:
        row = self.store.get_batch(batch_id) if ids.is_id(ids.BATCH_PREFIX, batch_id) else None
        if row is None:
            raise ApiError(404, f"no batch with id {batch_id[:64]!r}; ids are what POST /v1/batches returned",
                           param="batch_id", code="batch_not_found")
        return row

    def list_batches(self, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be 1..100, got {limit}", param="limit")
        if after is not None and (not ids.is_id(ids.BATCH_PREFIX, after) or self.store.get_batch(after) is None):
            raise ApiError(400, f"after={after[:64]!r} is not a batch id of this server; pass the last_id "
                                "of the previous page", param="after")
        return self.store.list_batches(limit, after)

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        row = self.batch(batch_id)
        if row["status"] in TERMINAL:
            raise ApiError(409, f"batch {batch_id} is already {row['status']}; only a validating or in_progress "
                                "batch can be cancelled", param="batch_id", code="batch_not_active")
        if row["status"] in (CANCELLING, FINALIZING):
            return row
        row = self.store.update_batch(batch_id, status=CANCELLING, cancelling_at=self._now())
        if self._running == batch_id and self._job is not None:
            self._cancelled.add(batch_id)
            self._job.cancel()  # the worker finishes it as cancelled once the job has flushed
        else:
            await self._finish(row, CANCELLED)
        return self.store.get_batch(batch_id)


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in metadata.items())):
        raise ApiError(400, "metadata must be an object of at most 16 string pairs, keys up to 64 characters "
                            "and values up to 512", param="metadata")
    return metadata


def _usage(path: str) -> dict[str, Any]:
    """Token usage summed over the output's lines (OpenAI's `Batch.usage`)."""
    prompt = cached = completion = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                usage = json.loads(raw)["response"]["body"]["usage"]
            except (ValueError, KeyError, TypeError):
                continue
            prompt += usage.get("prompt_tokens", 0)
            completion += usage.get("completion_tokens", 0)
            cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


