"""The FastAPI router of the Files and Batches API. The one router object both servers mount:
SGLang's app in `python -m sglang_batchllm.launch_server` (mount.py) and the fake-engine server
of the tests (fake_server.py). It holds no state. Its lifespan, which FastAPI's `include_router`
runs inside the app's own (after SGLang's has set up the tokenizer manager), builds the
`BatchService` with the factory `mount.install` left on `app.state`, starts it, and stops it
when the server stops; each request finds the service on `app.state`. No route serves a path:
file content is looked up by id.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from .service import FILE_LIST_MAX
from .objects import ApiError, batch_list, batch_object, file_deleted, file_list, file_object

STATE_KEY = "batchllm_batches"
FACTORY_KEY = "batchllm_batches_factory"

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _lifespan(app):
    factory = getattr(app.state, FACTORY_KEY, None)
    if factory is None:  # mounted without install(): the routes answer 503
        yield
        return
    service = factory()
    await service.start()
    setattr(app.state, STATE_KEY, service)
    logger.info("Files and Batches API on (/v1/files, /v1/batches); jobs directory %s", service.store.root)
    try:
        yield
    finally:
        setattr(app.state, STATE_KEY, None)
        await service.stop()
        service.store.close()


router = APIRouter(lifespan=_lifespan)


def _service(request: Request):
    service = getattr(request.app.state, STATE_KEY, None)
    if service is None:
        raise ApiError(503, "the batch API is not running on this server (it starts with the server; see its log)")
    return service


def _api(handler):
    """Turn an `ApiError` into OpenAI's error body."""

    @functools.wraps(handler)
    async def wrapper(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except ApiError as err:
            return err.response()

    return wrapper


@router.post("/v1/files")
@_api
async def create_file(request: Request):
    return JSONResponse(file_object(await _service(request).upload(request)))


@router.get("/v1/files")
@_api
async def list_files(request: Request):
    query = request.query_params
    limit = _int(query.get("limit", str(FILE_LIST_MAX)), f"limit must be an integer 1..{FILE_LIST_MAX}")
    rows, has_more = _service(request).list_files(limit, query.get("after"), query.get("purpose"),
                                                  query.get("order", "desc"))
    return JSONResponse(file_list(rows, has_more))


@router.get("/v1/files/{file_id}")
@_api
async def retrieve_file(file_id: str, request: Request):
    return JSONResponse(file_object(_service(request).file(file_id)))


@router.get("/v1/files/{file_id}/content")
@_api
async def file_content(file_id: str, request: Request):
    return FileResponse(_service(request).file_path(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
@_api
async def delete_file(file_id: str, request: Request):
    _service(request).delete_file(file_id)
    return JSONResponse(file_deleted(file_id))


@router.post("/v1/batches")
@_api
async def create_batch(request: Request):
    try:
        body: Any = json.loads(await request.body() or b"null")
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    return JSONResponse(batch_object(_service(request).create_batch(body)))


@router.get("/v1/batches")
@_api
async def list_batches(request: Request):
    limit = _int(request.query_params.get("limit", "20"), "limit must be an integer 1..100")
    rows, has_more = _service(request).list_batches(limit, request.query_params.get("after"))
    return JSONResponse(batch_list(rows, has_more))


@router.get("/v1/batches/{batch_id}")
@_api
async def retrieve_batch(batch_id: str, request: Request):
    return JSONResponse(batch_object(_service(request).batch(batch_id)))


@router.post("/v1/batches/{batch_id}/cancel")
@_api
async def cancel_batch(batch_id: str, request: Request):
    return JSONResponse(batch_object(await _service(request).cancel(batch_id)))


def _int(raw: str, message: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"{message}, got {raw[:64]!r}", param="limit") from None
