"""The JSON bodies of the Files and Batches API, field for field as the `openai` package's
`FileObject`, `FileDeleted` and `Batch` types name them, and the error body OpenAI clients parse
(`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# Batch statuses (openai.types.Batch.status).
VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, CANCELLING, CANCELLED, EXPIRED = "completed", "cancelling", "cancelled", "expired"
TERMINAL = (FAILED, COMPLETED, CANCELLED, EXPIRED)
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          409: "invalid_request_error", 413: "invalid_request_error", 503: "server_error"}


class ApiError(Exception):
    """A refused request: HTTP status, a message that says what was wrong and what to do."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 line: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.line = status, message, param, code, line

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                 "param": self.param, "code": self.code}
        if self.line is not None:
            error["line"] = self.line
        return JSONResponse({"error": error}, status_code=self.status)


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed",
            "status_details": None, "expires_at": None}


def file_deleted(file_id: str) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "deleted": True}


def batch_object(row: dict[str, Any]) -> dict[str, Any]:
    errors = row.get("errors")
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "model": row.get("model"),
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row.get("output_file_id"),
        "error_file_id": row.get("error_file_id"),
        "created_at": row["created_at"],
        "in_progress_at": row.get("in_progress_at"),
        "expires_at": row.get("expires_at"),
        "finalizing_at": row.get("finalizing_at"),
        "completed_at": row.get("completed_at"),
        "failed_at": row.get("failed_at"),
        "expired_at": row.get("expired_at"),
        "cancelling_at": row.get("cancelling_at"),
        "cancelled_at": row.get("cancelled_at"),
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "usage": row.get("usage"),
        "metadata": row.get("metadata"),
    }


def file_list(rows: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """`GET /v1/files`: the cursor page `openai.pagination.SyncCursorPage` reads (`data`,
    `has_more`; the next page is asked for with `after` = the last item's id)."""
    return _page([file_object(r) for r in rows], has_more)


def batch_list(rows: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return _page([batch_object(r) for r in rows], has_more)


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
