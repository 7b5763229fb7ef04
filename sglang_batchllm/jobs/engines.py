"""The seam between the job runner and an engine: submit a window, get completions as they finish.

`Backend.generate(window)` gets the whole window at once (so the scheduler sees it as one batch
and plans it together) and yields `(index in window, Completion)` in finishing order.
`FakeBackend` is deterministic and CPU-only (tests, `--fake-engine`); `SGLangBackend` wraps
`sglang_batchllm.Engine` and is the only place that imports SGLang.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Coroutine, Sequence
from typing import Any, Protocol

from ..planner.tokens import common_prefix_len
from .output import Completion
from .records import JobRequest


class Backend(Protocol):
    model: str  # the name response bodies carry
    retractions: int | None  # requests the scheduler retracted, if the engine says

    def generate(self, window: Sequence[JobRequest]) -> AsyncIterator[tuple[int, Completion]]: ...

    def run(self, main: Coroutine[Any, Any, Any]) -> Any:
        """Run the runner's coroutine on the loop the engine needs."""

    def shutdown(self) -> None: ...


class FakeBackend:
    """Answers in submission order, `delay` seconds a request. The text is a function of the
    prompt; `cached_tokens` is the prefix shared with the request before (an ideal prefix cache
    over the plan order). A request whose custom_id contains `fake-fail` fails."""

    model = "fake"
    retractions = 0

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.submitted: list[list[str]] = []  # custom_ids of each window, for tests

    def run(self, main):
        return asyncio.run(main)

    async def generate(self, window):
        self.submitted.append([r.custom_id for r in window])
        previous = b""
        for i, req in enumerate(window):
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
            packed = req.plan.input_ids.packed
            cached = common_prefix_len(previous, 0, packed, 0, min(len(previous), len(packed)) // 4)
            previous = packed
            if "fake-fail" in req.custom_id:
                yield i, Completion("", None, req.prompt_len, 0, error="the fake engine fails this request")
                continue
            n = min(req.max_new_tokens, 4)
            digest = hashlib.sha256(packed).hexdigest()
            text = " ".join(digest[k * 4:(k + 1) * 4] for k in range(n))
            yield i, Completion(text, "length" if n == req.max_new_tokens else "stop", req.prompt_len, n, cached)

    def shutdown(self) -> None:
        pass


class SGLangBackend:
    """`sglang_batchllm.Engine` behind the seam. One `async_generate` call per window with all
    its token ids: SGLang sends a batch of token-id requests to the scheduler as one message
    (`TokenizerManager._handle_batch_request` -> `_send_batch_request`), and with `stream=True`
    yields each request's chunks tagged with its `index`. `stream_interval` is set past each
    request's budget so a request sends one chunk, when it finishes, not one per token."""

    def __init__(self, server_args: Any, batchllm: Any, model: str) -> None:
        from sglang_batchllm.engine import Engine

        self.engine = Engine(server_args=server_args, batchllm=batchllm)
        self.model = model
        self.retractions = None

    def run(self, main):
        return self.engine.loop.run_until_complete(main)

    async def generate(self, window):
        pending = set(range(len(window)))
        try:
            stream = await self.engine.async_generate(
                input_ids=[r.plan.input_ids.tolist() for r in window],
                sampling_params=[{**r.sampling_params(), "stream_interval": r.max_new_tokens + 1} for r in window],
                stream=True,
            )
            async for chunk in stream:
                meta = chunk.get("meta_info", {})
                reason = meta.get("finish_reason")
                if reason is None:
                    continue
                index = chunk["index"]
                pending.discard(index)
                yield index, _completion(chunk, window[index])
        except Exception as exc:  # noqa: BLE001 - the engine's failure fails what is left of the window
            for index in sorted(pending):
                yield index, Completion("", None, window[index].prompt_len, 0, error=f"engine error: {exc}")

    def shutdown(self) -> None:
        self.retractions = self._scheduler_retractions()
        self.engine.shutdown()

    def _scheduler_retractions(self) -> int | None:
        """Requests the scheduler retracted, summed over DP ranks, from the counters our patch adds
        to SGLang's internal state (patches/scheduler.py); None when it cannot be read (an engine
        that is failing, or a rank without the counters), which the summary says."""
        try:
            states = self.run(asyncio.wait_for(self.engine.tokenizer_manager.get_internal_state(), 30))
        except Exception:  # noqa: BLE001 - a count is not worth failing the job's end over
            return None
        return retractions_of(states)


def retractions_of(states: Sequence[dict]) -> int | None:
    counts = [state.get("batchllm", {}).get("retractions") for state in states]
    return None if not counts or any(c is None for c in counts) else sum(counts)


def _completion(chunk: dict[str, Any], req: JobRequest) -> Completion:
    meta = chunk["meta_info"]
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    prompt = int(meta.get("prompt_tokens", req.prompt_len))
    if kind == "abort":
        return Completion("", None, prompt, 0, error=str(reason.get("message") or "aborted by the engine"))
    return Completion(chunk.get("text", ""), "length" if kind == "length" else "stop", prompt,
                      int(meta.get("completion_tokens", 0)), int(meta.get("cached_tokens", 0) or 0))
