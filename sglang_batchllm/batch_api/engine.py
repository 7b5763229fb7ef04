"""The job runner's backend inside the HTTP server: SGLang's own tokenizer manager, in process.

`SGLangBackend` (jobs/engines.py) turns a window into one `async_generate` call of token ids
and reads each request's single final chunk; here the same code runs with the server's
tokenizer manager in place of an `Engine`, on the server's event loop, so the window reaches
the scheduler as one batch message, exactly as from `python -m sglang_batchllm.batch`, while
`/generate` and `/v1/*` requests go through the same tokenizer manager beside it.

Each request gets an rid of ours; when a job is cancelled (or the server stops) mid-window,
the requests of the window that had not finished are aborted in the engine, which is how a
cancel stops admitting new requests.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..jobs.engines import SGLangBackend

logger = logging.getLogger(__name__)


class _TokenizerManagerEngine:
    """What `SGLangBackend.generate` calls (`async_generate`), on a tokenizer manager."""

    def __init__(self, tokenizer_manager: Any) -> None:
        self.tokenizer_manager = tokenizer_manager
        self.rids: list[str] = []  # of the window being generated

    async def async_generate(self, *, input_ids, sampling_params, stream: bool) -> AsyncIterator[dict]:
        from sglang.srt.managers.io_struct import GenerateReqInput

        tag = uuid.uuid4().hex[:12]
        self.rids = [f"batchllm-{tag}-{i}" for i in range(len(input_ids))]
        obj = GenerateReqInput(input_ids=input_ids, sampling_params=sampling_params, stream=stream, rid=self.rids)
        return self.tokenizer_manager.generate_request(obj, None)

    def abort(self) -> None:
        for rid in self.rids:
            if rid in self.tokenizer_manager.rid_to_state:  # still running
                self.tokenizer_manager.abort_request(rid)
        self.rids = []


class InProcessBackend(SGLangBackend):
    def __init__(self, tokenizer_manager: Any, model: str) -> None:  # noqa: D107 - no Engine to start
        self.engine = _TokenizerManagerEngine(tokenizer_manager)
        self.model = model
        self.retractions = None

    async def generate(self, window):
        inner = super().generate(window)
        try:
            async for item in inner:
                yield item
        finally:
            await inner.aclose()
            try:
                self.engine.abort()
            except Exception:  # noqa: BLE001 - the server may be shutting down under us
                logger.warning("could not abort the unfinished requests of a batch window", exc_info=True)

    def run(self, main):
        raise RuntimeError("InProcessBackend runs on the server's event loop; await run_windows instead")

    def shutdown(self) -> None:
        pass  # the engine belongs to the server, which shuts it down
