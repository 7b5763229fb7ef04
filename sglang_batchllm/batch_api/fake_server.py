"""`python -m sglang_batchllm.batch_api.fake_server --jobs-dir DIR --port N [--api-key KEY] [--fake-delay S]`

The batch API's router (the same object `launch_server` mounts on SGLang's app) on a plain
FastAPI app with the job runner's fake engine (`jobs.engines.FakeBackend`), served by uvicorn:
the CPU stand-in for the GPU server in tests and demos. `--api-key` adds SGLang's own API-key
middleware (`sglang.srt.utils.auth.add_api_key_middleware`), as SGLang's server does.
`POST /generate` answers at once, a stand-in for ordinary traffic served while a job runs.
Texts are tokenized with the bundled model's tokenizer unless `--tokenizer-path` says otherwise;
chats are rendered with the template SGLang's own loading picks (`--chat-template` as the real
server takes it). `--clock-offset S` runs the service's clock S seconds ahead of the wall clock,
which is how a test restarts a server "a day later" without waiting a day.
"""

from __future__ import annotations

import argparse
import sys

from ..argtypes import positive_int
from ..config import BatchLLMConfig
from ..jobs.runner import RunOptions


def _parser() -> argparse.ArgumentParser:
    defaults = BatchLLMConfig()
    p = argparse.ArgumentParser(prog="python -m sglang_batchllm.batch_api.fake_server", description=__doc__.split("\n\n")[1])
    p.add_argument("--jobs-dir", required=True, help="the jobs directory (as --batchllm-jobs-dir)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=positive_int, required=True)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY', as SGLang's --api-key")
    p.add_argument("--fake-delay", type=float, default=0.0, help="seconds the fake engine takes per request")
    p.add_argument("--max-upload-mb", type=positive_int, default=defaults.max_upload_mb)
    p.add_argument("--tokenizer-path", help="tokenizer for text lines (default: the bundled model's)")
    p.add_argument("--flush-seconds", type=float, default=RunOptions().flush_seconds,
                   help="how often finished lines are written (the job runner's default)")
    p.add_argument("--chat-template", help="as SGLang's --chat-template: a built-in name or a .jinja/.json file")
    p.add_argument("--clock-offset", type=float, default=0.0, help="seconds added to the service's clock")
    p.add_argument("--expiry-poll", type=float, default=1.0, help="seconds between expiry checks")
    return p


def build_app(args: argparse.Namespace):
    from fastapi import FastAPI

    from .. import bundled_model
    from ..jobs.engines import FakeBackend
    from ..jobs.tokenizer import model_context_len
    from .mount import install
    from .service import BatchService, Settings
    from .store import Store

    import time

    from transformers import AutoTokenizer

    from .chat import sglang_chat_rendering

    store = Store(args.jobs_dir)  # opened (and locked) before serving, as on the real server
    tokenizer = args.tokenizer_path or bundled_model.model_dir()
    chat = sglang_chat_rendering(AutoTokenizer.from_pretrained(tokenizer), tokenizer, args.chat_template)
    settings = Settings(max_upload_bytes=args.max_upload_mb << 20, tokenizer_path=tokenizer, model="fake",
                        context_len=model_context_len(tokenizer),
                        run=RunOptions(flush_seconds=args.flush_seconds),
                        chat_template=chat.template, chat_refused=chat.refused)
    offset = args.clock_offset
    app = FastAPI()

    @app.post("/generate")
    async def generate(request: dict):
        return {"text": "fake", "meta_info": {"finish_reason": {"type": "length"}}}

    @app.get("/health")
    async def health():
        return {}

    install(app, lambda: BatchService(store, settings, FakeBackend(delay=args.fake_delay),
                                      clock=lambda: time.time() + offset, expiry_poll=args.expiry_poll))
    if args.api_key:
        from sglang.srt.utils.auth import add_api_key_middleware

        add_api_key_middleware(app, api_key=args.api_key, admin_api_key=None)
    return app


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import uvicorn

    from .store import JobsDirError

    try:
        app = build_app(args)
    except JobsDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
