"""The jobs directory: SQLite state plus the files it names.

Layout (all created 0700, nothing of it is served over HTTP; files are read back only through
`GET /v1/files/{id}/content`, by the path the store recorded):

    JOBS_DIR/jobs.sqlite3        files and batches (WAL, synchronous=FULL: a committed state
                                 change survives a kill or a power cut)
    JOBS_DIR/lock                held (flock) by the one server using the directory
    JOBS_DIR/files/<random>.jsonl        uploaded input files
    JOBS_DIR/batches/<random>/output.jsonl, errors.jsonl (+ .meta.json)   a batch's results

Storage names are random and unrelated to the public ids (ids.py), and every path read from
the database is checked to lie inside the directory before use.

One connection, serialized by a lock: the event loop and the worker threads (upload
validation) both call in, and each call is a short transaction.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    purpose TEXT NOT NULL,
    filename TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    model TEXT,
    dir TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    in_progress_at INTEGER,
    finalizing_at INTEGER,
    completed_at INTEGER,
    failed_at INTEGER,
    cancelling_at INTEGER,
    cancelled_at INTEGER,
    expired_at INTEGER,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    usage TEXT
);
"""
_JSON_COLUMNS = ("metadata", "errors", "usage")
_BATCH_COLUMNS = frozenset({
    "status", "model", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at",
    "cancelled_at", "expired_at", "output_file_id", "error_file_id", "errors", "total", "completed", "failed", "usage",
})


class JobsDirError(Exception):
    """The jobs directory cannot be used; the message says why and what to do."""


def default_jobs_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sglang_batchllm", "jobs")


class Store:
    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root or default_jobs_dir())
        self._lock = threading.Lock()
        self._lock_fd = -1
        try:
            for sub in ("", "files", "batches"):
                os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
            self._hold_directory()
            self.db = sqlite3.connect(os.path.join(self.root, "jobs.sqlite3"), check_same_thread=False,
                                      isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            self._release()
            raise JobsDirError(f"cannot use the jobs directory {self.root}: {exc}; pass --batchllm-jobs-dir "
                               "a writable directory") from None

    def _migrate(self) -> None:
        # A jobs directory made before batches could expire has no expired_at column; CREATE
        # TABLE IF NOT EXISTS leaves such a table as it is, so the column is added here.
        columns = {r["name"] for r in self.db.execute("PRAGMA table_info(batches)")}
        if "expired_at" not in columns:
            self.db.execute("ALTER TABLE batches ADD COLUMN expired_at INTEGER")

    def _hold_directory(self) -> None:
        # Two servers on one jobs directory would both resume its batches: refuse the second.
        self._lock_fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise JobsDirError(f"the jobs directory {self.root} is in use by another server (pid {holder}); "
                               "stop it or pass another --batchllm-jobs-dir") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def close(self) -> None:
        with self._lock:
            self.db.close()
            self._release()

    # ---- paths -------------------------------------------------------------------------------
    def new_storage_name(self, kind: str) -> str:
        """A fresh relative path for a new input file ("files") or a batch's folder ("batches")."""
        name = secrets.token_hex(16)
        return os.path.join(kind, name + ".jsonl" if kind == "files" else name)

    def path(self, relative: str) -> str:
        """The absolute path of a stored relative path, refusing anything that leaves the directory."""
        full = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath([full, self.root]) != self.root or full == self.root:
            raise JobsDirError(f"refusing the stored path {relative!r}: it is outside {self.root}")
        return full

    # ---- files -------------------------------------------------------------------------------
    def add_file(self, row: dict[str, Any]) -> None:
        keys = ("id", "purpose", "filename", "bytes", "created_at", "path")
        self._run(f"INSERT INTO files ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                  [row[k] for k in keys])

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM files WHERE id = ?", (file_id,))

    def list_files(self, limit: int, after: str | None, purpose: str | None,
                   ascending: bool) -> tuple[list[dict[str, Any]], bool]:
        """`limit` files in upload order (newest first unless `ascending`), after the file `after`
        (excluded), only those of `purpose` if given; and whether more follow. `seq` is the
        order files were stored in, which is the order of their `created_at`."""
        where, params = [], []
        if purpose is not None:
            where.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            where.append(f"seq {'>' if ascending else '<'} (SELECT seq FROM files WHERE id = ?)")
            params.append(after)
        sql = (f"SELECT * FROM files {'WHERE ' + ' AND '.join(where) if where else ''} "
               f"ORDER BY seq {'ASC' if ascending else 'DESC'} LIMIT ?")
        rows = self._all(sql, (*params, limit + 1))
        return rows[:limit], len(rows) > limit

    def delete_file(self, file_id: str) -> None:
        self._run("DELETE FROM files WHERE id = ?", (file_id,))

    def batches_using(self, file_id: str, statuses: Iterable[str]) -> list[dict[str, Any]]:
        statuses = list(statuses)
        return self._all(f"SELECT * FROM batches WHERE input_file_id = ? AND status IN ({', '.join('?' * len(statuses))})",
                         (file_id, *statuses))

    # ---- batches -----------------------------------------------------------------------------
    def add_batch(self, row: dict[str, Any]) -> None:
        row = _encode(row)
        keys = list(row)
        self._run(f"INSERT INTO batches ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                  [row[k] for k in keys])

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM batches WHERE id = ?", (batch_id,))

    def update_batch(self, batch_id: str, **changes: Any) -> dict[str, Any]:
        unknown = set(changes) - _BATCH_COLUMNS
        if unknown:
            raise KeyError(f"not batch columns one may change: {sorted(unknown)}")
        changes = _encode(changes)
        self._run(f"UPDATE batches SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                  [*changes.values(), batch_id])
        return self.get_batch(batch_id)

    def list_batches(self, limit: int, after: str | None) -> tuple[list[dict[str, Any]], bool]:
        """Newest first, `limit` of them after the batch `after` (excluded); and whether more follow."""
        if after is None:
            rows = self._all("SELECT * FROM batches ORDER BY seq DESC LIMIT ?", (limit + 1,))
        else:
            rows = self._all("SELECT * FROM batches WHERE seq < (SELECT seq FROM batches WHERE id = ?) "
                             "ORDER BY seq DESC LIMIT ?", (after, limit + 1))
        return rows[:limit], len(rows) > limit

    def batches_with_status(self, statuses: Iterable[str]) -> list[dict[str, Any]]:
        """Oldest first: the order batches run in."""
        statuses = list(statuses)
        return self._all(f"SELECT * FROM batches WHERE status IN ({', '.join('?' * len(statuses))}) ORDER BY seq",
                         statuses)

    # ---- sqlite --------------------------------------------------------------------------------
    def _run(self, sql: str, params: Iterable[Any]) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute(sql, tuple(params))
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _one(self, sql: str, params: Iterable[Any]) -> dict[str, Any] | None:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _all(self, sql: str, params: Iterable[Any]) -> list[dict[str, Any]]:
        with self._lock:
            return [_decode(dict(r)) for r in self.db.execute(sql, tuple(params)).fetchall()]


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    return {k: json.dumps(v) if k in _JSON_COLUMNS and v is not None else v for k, v in row.items()}


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for k in _JSON_COLUMNS:
        if row.get(k) is not None:
            row[k] = json.loads(row[k])
    return row
