"""The OpenAI Files and Batches API on `python -m sglang_batchllm.launch_server`.

`POST /v1/files` stores a batch file (validated line by line with the batch command's reader),
`POST /v1/batches` runs it through the job runner of `python -m sglang_batchllm.batch`: the
whole file goes to the engine as one batch, so the scheduler plans its shared prefixes
together. State lives in SQLite in the jobs directory (`--batchllm-jobs-dir`), outputs beside
it; a server killed mid-job resumes the job when it starts again (docs/batch-api.md).

Modules: `ids` (opaque ids), `store` (SQLite and the jobs directory), `objects` (the JSON
bodies and errors), `uploads` (size-limited multipart), `chat` (which chat template chats render with), `service` (the batch lifecycle and its
worker), `engine` (the in-process SGLang backend), `routes` (the FastAPI router), `mount`
(putting the router on SGLang's app), `fake_server` (the same router with the fake engine, for
tests and demos). Nothing here imports SGLang at module level except `mount`'s callers.
"""

from .routes import router

__all__ = ["router"]
