"""Putting the batch API on SGLang's HTTP server, in the launcher's process.

SGLang 0.5.17's `sglang.srt.entrypoints.http_server.app` is a module-level FastAPI app that
`launch_server` serves with uvicorn in the same process (one tokenizer worker). So the seam is
FastAPI's own: `app.include_router(router)` before the server starts adds the routes and runs
the router's lifespan inside SGLang's, after SGLang has set its global state (the tokenizer
manager). The API-key middleware SGLang adds when the server starts covers every route of the
app, these included (`--api-key` guards them as it guards /generate).

Not mounted, with a warning saying why, where the app is not what serves: several tokenizer
workers (uvicorn imports the app afresh in each worker process), gRPC, Ray, encoder-only or the
Rust server; and with `--skip-tokenizer-init` (no text to write in the output).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..config import BatchLLMConfig
from ..planner.inputs import PlannerConfig
from .chat import chat_rendering
from .routes import FACTORY_KEY, router
from .service import BatchService, Settings
from .store import JobsDirError, Store

logger = logging.getLogger(__name__)


def install(app: Any, factory: Callable[[], BatchService]) -> None:
    """Mount the router on `app`; `factory()` builds the service when the app starts."""
    setattr(app.state, FACTORY_KEY, factory)
    app.include_router(router)


def unsupported(server_args: Any) -> str | None:
    """Why the batch API cannot run on this server, or None."""
    if getattr(server_args, "tokenizer_worker_num", 1) != 1:
        return "--tokenizer-worker-num > 1 serves the app from other processes"
    for flag, on in (("--encoder-only", server_args.encoder_only), ("--smg-grpc-mode", server_args.smg_grpc_mode),
                     ("--use-ray", server_args.use_ray), ("--skip-tokenizer-init", server_args.skip_tokenizer_init)):
        if on:
            return f"{flag} is set"
    if os.environ.get("SGLANG_RUST_SERVER", "").strip().lower() in ("1", "true", "yes", "on"):
        return "SGLANG_RUST_SERVER serves HTTP without the Python app"
    return None


def mount_on_sglang(server_args: Any, config: BatchLLMConfig | None = None) -> bool:
    """Mount the batch API on SGLang's app; False (with a warning) where it cannot run. The jobs
    directory is opened now, so a bad one stops the launcher before the model loads."""
    reason = unsupported(server_args)
    if reason:
        logger.warning("the Files and Batches API (/v1/files, /v1/batches) is off: %s", reason)
        return False
    config = config or BatchLLMConfig.from_env()
    try:
        store = Store(config.jobs_dir)
    except JobsDirError as exc:
        raise SystemExit(f"error: {exc}") from None

    from sglang.srt.entrypoints import http_server
    from sglang.srt.managers.tokenizer_manager import ServerStatus

    from .engine import InProcessBackend

    def factory() -> BatchService:
        state = http_server.get_global_state()
        tm = state.tokenizer_manager
        model = tm.served_model_name
        # Read after SGLang's startup has loaded --chat-template onto the tokenizer manager's
        # tokenizer (chat.py), so chats render with the template the server's own route uses.
        chat = chat_rendering(state.template_manager, getattr(tm, "tokenizer", None))
        settings = Settings(
            max_upload_bytes=config.max_upload_mb << 20,
            tokenizer_path=server_args.tokenizer_path or server_args.model_path,
            model=model,
            context_len=tm.context_len,
            planner=PlannerConfig(page_size=server_args.page_size or 1, levels=config.levels,
                                  min_prefix_tokens=config.min_prefix_tokens),
            chat_template=chat.template,
            chat_refused=chat.refused,
        )
        return BatchService(store, settings, InProcessBackend(tm, model),
                            ready=lambda: tm.server_status == ServerStatus.Up)

    install(http_server.app, factory)
    return True
