"""Coalescing of concurrent `/generate` calls into batch requests (client side of issue 12).

SGLang's frontend runs each program of `run_batch` in its own thread and every `gen` (and each
step of a `select`) is one HTTP `/generate` request, so the server never sees a step of all
programs at once. `CoalescingRuntimeEndpoint` is a `RuntimeEndpoint` whose request-making calls
hand their request body to a `Coalescer`; the coalescer gathers the bodies of many threads and
sends them as ONE batch `/generate` (lists of `text` / `input_ids`, one `sampling_params` dict per
item, per-item logprob fields), then gives each caller its own item(s) of the response.

Flush policy (see docs/frontend.md):

* lock step: `sglang_batchllm.run_batch` tells the coalescer which threads belong to the batch
  (program threads and the interpreter's per-program worker threads). A batch is sent as soon as
  none of them is running: every one is waiting in a coalesced call, blocked on another program
  state (`s["var"]`, `fork`, `join`, `text()`), idle with nothing queued, or finished, and no
  batch is in flight (its callers come back with their next calls). Programs submitted to the
  pool but not started yet count as running while the pool has a free thread for them; a program
  that finishes or fails leaves the count.
* timeout: when for `flush_timeout` seconds nothing happened — no new call, no program started or
  finished, no expression ran or was queued on any program of the batch (a garbage collection,
  which stops all threads, does not count as a stall) — so a program doing slow client-side
  work never holds up the others for long; not while programs of the batch are still starting
  (thread start-up of thousands of programs stalls for longer); and at the latest `max_wait`
  seconds after the oldest waiting call came. Calls from threads the coalescer does not know
  (plain `program.run_batch` with this backend as default backend) use only this rule and the
  cap;
* size cap: at once when `max_batch_size` items are waiting; no batch request carries more.

Calls that cannot share a batch are sent as they are (see `CoalescingRuntimeEndpoint`). When a
batch request fails (HTTP error, connection error, malformed reply), each of its calls is retried
alone, so a bad item fails only its own program, with the error plain `RuntimeEndpoint` raises.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional

from sglang.global_config import global_config
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint, compute_normalized_prompt_logprobs
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.ir import SglSamplingParams
from sglang.utils import http_request

__all__ = ["BatchCancelled", "Coalescer", "CoalescingRuntimeEndpoint"]

DEFAULT_FLUSH_TIMEOUT_S = 0.05
DEFAULT_MAX_BATCH_SIZE = 2048
DEFAULT_MAX_WAIT_S = 10.0
_POLL_S = 0.002

# Top-level request fields a batch item may carry; anything else is sent per request.
_LOGPROB_FIELDS = (("return_logprob", False), ("logprob_start_len", -1), ("top_logprobs_num", 0))
_KNOWN_FIELDS = {"text", "input_ids", "sampling_params", "return_text_in_logprobs"} | {
    f for f, _ in _LOGPROB_FIELDS
}


_LIVE: "weakref.WeakSet[Coalescer]" = weakref.WeakSet()


def _after_gc(phase, info):
    # A garbage collection stops every thread (with torch imported a full one takes ~0.2 s):
    # count it as progress, so it is never mistaken for a program's slow client-side work.
    if phase == "stop":
        now = time.monotonic()
        for co in list(_LIVE):
            co._progress = now


gc.callbacks.append(_after_gc)


class BatchCancelled(RuntimeError):
    """Raised in a program whose backend call was cut short because `run_batch` was interrupted."""


class _Call:
    """One caller's request body: one item (`single`) or several (a list of texts/ids)."""

    __slots__ = ("data", "key", "items", "single", "rec", "tracked", "arrived", "event", "result", "error", "done")

    def __init__(self, data: Dict[str, Any], key, items, single: bool, rec):
        self.data = data
        self.key = key
        self.items = items
        self.single = single
        self.rec = rec
        self.tracked = rec is not None
        self.arrived = time.monotonic()
        self.event = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.done = False


def split_request(data: Dict[str, Any]):
    """(group key, items, single) of a `/generate` body, or None when it cannot join a batch.

    Bodies join one batch when their key is equal: same input kind (`text` or `input_ids`) and the
    same `return_text_in_logprobs` (a scalar in SGLang's `GenerateReqInput`); everything else is
    per item."""
    if set(data) - _KNOWN_FIELDS or ("text" in data) == ("input_ids" in data):
        return None
    kind = "text" if "text" in data else "input_ids"
    inp = data[kind]
    if kind == "text":
        single = isinstance(inp, str)
    else:
        single = not inp or not isinstance(inp[0], list)
    inputs = [inp] if single else list(inp)
    if not inputs:
        return None
    sp = data.get("sampling_params") or {}
    if isinstance(sp, list):
        if len(sp) != len(inputs):
            return None
        sps = sp
    else:
        sps = [sp] * len(inputs)
    if any(int(p.get("n", 1) or 1) != 1 for p in sps):
        return None  # parallel sampling changes the shape of a batch reply
    items = []
    for i, x in enumerate(inputs):
        item = {"input": x, "sampling_params": sps[i]}
        for f, _ in _LOGPROB_FIELDS:
            v = data.get(f)
            if isinstance(v, list):
                if len(v) != len(inputs):
                    return None
                v = v[i]
            item[f] = v
        items.append(item)
    return (kind, bool(data.get("return_text_in_logprobs", False))), items, single


def batch_body(key, calls: List[_Call]) -> Dict[str, Any]:
    """The one `/generate` body for `calls` (all with the same key): lists, one entry per item."""
    if len(calls) == 1:
        return calls[0].data  # exactly what the plain endpoint sends
    kind, text_in_logprobs = key
    items = [it for c in calls for it in c.items]
    body: Dict[str, Any] = {
        kind: [it["input"] for it in items],
        "sampling_params": [it["sampling_params"] for it in items],
    }
    for f, default in _LOGPROB_FIELDS:
        vals = [it[f] for it in items]
        if any(v is not None for v in vals):
            body[f] = [default if v is None else v for v in vals]
    if text_in_logprobs:
        body["return_text_in_logprobs"] = True
    return body


class _Rec:
    """A thread the lock-step rule waits for: a program thread, or a program's worker thread
    (`exe` is its StreamExecutor; the worker has work when its queue has unfinished tasks).

    `waiting` counts its calls in the coalescer (cleared by the dispatcher when it hands the reply
    over, so no window exists where the woken thread still looks like waiting); `blocked` is a
    stack of "is the wait over?" tests for its waits on other program states (a thread whose
    wait is over is about to run, so it counts as running before it is scheduled)."""

    __slots__ = ("exe", "blocked", "waiting", "done")

    def __init__(self, exe=None):
        self.exe = exe
        self.blocked: list = []
        self.waiting = 0
        self.done = False

    def running(self) -> bool:
        if self.done or self.waiting:
            return False
        if self.blocked:
            try:
                return bool(self.blocked[-1]())
            except Exception:
                return True
        if self.exe is None:
            return True  # a program thread running user code
        q = getattr(self.exe, "queue", None)
        return q is None or q.unfinished_tasks > 0


class Coalescer:
    """Gathers request bodies from many threads and sends them as batch requests.

    `post(body)` sends one `/generate` body and returns the decoded JSON reply, raising on an
    HTTP error (as `RuntimeEndpoint._assert_success` does)."""

    def __init__(
        self,
        post: Callable[[Dict[str, Any]], Any],
        *,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_wait: float = DEFAULT_MAX_WAIT_S,
    ):
        if flush_timeout < 0:
            raise ValueError("flush_timeout must be >= 0")
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.post = post
        self.flush_timeout = float(flush_timeout)
        self.max_wait = max(float(max_wait), self.flush_timeout)
        self.max_batch_size = int(max_batch_size)
        self._cond = threading.Condition()
        self._pending: List[_Call] = []
        self._pending_items = 0
        self._inflight: set = set()
        self._closed = False
        self._cancelled = False
        self._thread: Optional[threading.Thread] = None
        self._local = threading.local()
        # Lock-step accounting.
        self._records: set = set()
        self._capacity = 0  # program threads of the pool
        self._starting = 0  # programs submitted to the pool and not started yet
        self._active = 0  # programs running in the pool
        self._progress = time.monotonic()  # last arrival, program start / end, worker start / end
        _LIVE.add(self)
        # Counters for tests and reports.
        self.stats = {"batches": 0, "batched_calls": 0, "direct_calls": 0, "retried_calls": 0}

    # -- state -------------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def closed(self) -> bool:
        return self._closed

    def check_cancelled(self) -> None:
        if self._cancelled:
            raise BatchCancelled("run_batch was interrupted")

    def close(self) -> None:
        """Send what is waiting; later calls go straight to the server, one request each."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel(self) -> None:
        """Fail every waiting and in-flight call, and every later one, with BatchCancelled."""
        with self._cond:
            self._cancelled = True
            self._closed = True
            calls = self._pending + list(self._inflight)
            self._pending = []
            self._pending_items = 0
            self._inflight.clear()
            for c in calls:
                if not c.done:
                    c.done = True
                    if c.rec is not None:
                        c.rec.waiting -= 1
                    c.error = BatchCancelled("run_batch was interrupted")
                    c.event.set()
            records = list(self._records)
            self._cond.notify_all()
        for r in records:  # let orphaned workers (e.g. fork branches never joined) exit
            if r.exe is not None:
                try:
                    r.exe.end()
                except Exception:
                    pass

    # -- lock-step accounting (called by sglang_batchllm.run_batch) --------------------------

    def set_capacity(self, num_threads: int) -> None:
        with self._cond:
            self._capacity = int(num_threads)

    def program_submitted(self, count: int = 1) -> None:
        """`count` programs will start on the pool: call before submitting the first of them."""
        with self._cond:
            self._starting += count

    def program_unsubmitted(self, count: int) -> None:
        with self._cond:
            self._starting = max(0, self._starting - count)
            self._cond.notify_all()

    def program_started(self) -> _Rec:
        rec = _Rec()
        with self._cond:
            self._starting = max(0, self._starting - 1)
            self._active += 1
            self._records.add(rec)
            self._progress = time.monotonic()
        self._local.rec = rec
        return rec

    def program_finished(self, rec: _Rec) -> None:
        self._local.rec = None
        with self._cond:
            self._active -= 1
            rec.done = True
            self._records.discard(rec)
            self._progress = time.monotonic()
            self._cond.notify_all()

    def register_worker(self, exe) -> _Rec:
        """Called by the creating thread before the worker starts, so no window is uncounted."""
        rec = _Rec(exe)
        with self._cond:
            self._records.add(rec)
            self._progress = time.monotonic()
        return rec

    def bind_worker(self, rec: _Rec) -> None:
        self._local.rec = rec

    def finish(self, rec: _Rec) -> None:
        self._local.rec = None
        with self._cond:
            rec.done = True
            self._records.discard(rec)
            self._progress = time.monotonic()
            self._cond.notify_all()

    def progress(self) -> None:
        """A thread of the batch did something (ran or queued an expression): not a stall."""
        self._progress = time.monotonic()  # a plain store: no lock needed

    def current(self) -> Optional[_Rec]:
        return getattr(self._local, "rec", None)

    def blocked(self, over: Callable[[], bool]):
        """Context manager: the current thread waits on another program state until `over()`."""
        return _Blocked(self, over)

    def _someone_running(self) -> bool:
        if self._starting and self._active < self._capacity:
            return True  # a program is about to start on a free pool thread
        for r in self._records:
            if r.running():
                return True
        return False

    # -- calls ----------------------------------------------------------------------------------

    def request(self, data: Dict[str, Any]) -> Any:
        """Send `data` (a `/generate` body) as part of a batch; return this call's reply."""
        self.check_cancelled()
        split = split_request(data)
        if split is None or self._closed:
            return self._direct(data)
        key, items, single = split
        rec = self.current()
        call = _Call(data, key, items, single, rec)
        with self._cond:
            if self._cancelled:
                raise BatchCancelled("run_batch was interrupted")
            if self._closed:
                call = None
            else:
                if rec is not None:
                    rec.waiting += 1
                self._pending.append(call)
                self._pending_items += len(items)
                self._ensure_thread()
                self._cond.notify_all()
        if call is None:
            return self._direct(data)
        call.event.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _direct(self, data):
        with self._cond:
            self.stats["direct_calls"] += 1
        return self.post(data)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="batchllm-coalescer", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    if self._closed:
                        self._thread = None
                        return
                    self._cond.wait()
                now = time.monotonic()
                deadline = self._pending[0].arrived + self.max_wait
                if not (self._starting and self._active < self._capacity):
                    # A stall of flush_timeout ends the wait, except while the batch's programs
                    # are still starting (thread start-up on a busy interpreter stalls for longer).
                    deadline = min(deadline, max(self._pending[-1].arrived, self._progress) + self.flush_timeout)
                reason = (
                    "closed"
                    if self._closed
                    else "size"
                    if self._pending_items >= self.max_batch_size
                    else "timeout"
                    if now >= deadline
                    else None
                )
                ready = (
                    reason is not None
                    or (
                        # lock step: nobody can add a call any more. A caller whose call is in
                        # flight counts as coming back (its next call should join this batch).
                        not self._inflight
                        and all(c.tracked for c in self._pending)
                        and not self._someone_running()
                    )
                )
                if not ready:
                    self._cond.wait(min(_POLL_S, max(0.0, deadline - now)))
                    continue
                reason = reason or "lock_step"
                self.stats[reason] = self.stats.get(reason, 0) + 1
                calls = self._pending
                self._pending = []
                self._pending_items = 0
                self._inflight.update(calls)
            for key, chunk in self._chunks(calls):
                threading.Thread(target=self._send, args=(key, chunk), name="batchllm-send", daemon=True).start()

    def _chunks(self, calls: List[_Call]):
        groups: Dict[Any, List[_Call]] = {}
        for c in calls:
            groups.setdefault(c.key, []).append(c)
        for key, group in groups.items():
            chunk: List[_Call] = []
            size = 0
            for c in group:
                if chunk and size + len(c.items) > self.max_batch_size:
                    yield key, chunk
                    chunk, size = [], 0
                chunk.append(c)
                size += len(c.items)
            if chunk:
                yield key, chunk

    def _deliver(self, call: _Call, result=None, error: Optional[BaseException] = None) -> None:
        with self._cond:
            if call.done:
                return
            call.done = True
            if call.rec is not None:
                call.rec.waiting -= 1
            call.result = result
            call.error = error
            self._inflight.discard(call)
        call.event.set()

    def _send(self, key, calls: List[_Call]) -> None:
        with self._cond:
            self.stats["batches"] += 1
            self.stats["batched_calls"] += len(calls)
        body = batch_body(key, calls)
        try:
            reply = self.post(body)
            parts = self._split_reply(calls, reply)
        except Exception as e:  # noqa: BLE001 - any failure of the batch: retry each call alone
            if len(calls) == 1:
                self._deliver(calls[0], error=e)
                return
            with self._cond:
                self.stats["retried_calls"] += len(calls)
            threads = [threading.Thread(target=self._retry, args=(c,), daemon=True) for c in calls]
            for t in threads:
                t.start()
            return
        for c, part in zip(calls, parts):
            self._deliver(c, result=part)

    def _retry(self, call: _Call) -> None:
        if call.done:
            return
        try:
            self._deliver(call, result=self.post(call.data))
        except Exception as e:  # noqa: BLE001
            self._deliver(call, error=e)

    @staticmethod
    def _split_reply(calls: List[_Call], reply) -> list:
        if len(calls) == 1:
            return [reply]
        n = sum(len(c.items) for c in calls)
        if not isinstance(reply, list) or len(reply) != n:
            raise RuntimeError(f"batch reply has {len(reply) if isinstance(reply, list) else 'no'} items, expected {n}")
        parts, i = [], 0
        for c in calls:
            k = len(c.items)
            parts.append(reply[i] if c.single else reply[i : i + k])
            i += k
        return parts


class _Blocked:
    __slots__ = ("co", "rec", "over")

    def __init__(self, co: Coalescer, over):
        self.co = co
        self.rec = co.current()
        self.over = over

    def __enter__(self):
        if self.rec is not None:
            with self.co._cond:
                self.rec.blocked.append(self.over)
                self.co._cond.notify_all()
        return self

    def __exit__(self, *exc):
        if self.rec is not None:
            with self.co._cond:
                self.rec.blocked.pop()
        return False


class CoalescingRuntimeEndpoint(RuntimeEndpoint):
    """A `RuntimeEndpoint` whose `generate`, `select` and lazy-commit (`fork`) requests from
    many threads are coalesced into batch `/generate` requests.

    Sent per request, exactly as `RuntimeEndpoint` sends them: calls of a program with an image
    or video, `n > 1`, streaming, `cache_prefix`, `concatenate_and_append`, constrained
    `gen` (regex / json_schema / dtype) when `batch_constrained=False`, and every call after
    `close()`. Use it with `sglang_batchllm.run_batch` for lock-step batches; as a default
    backend for plain `program.run_batch` it batches by `flush_timeout` only."""

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        verify: Optional[str] = None,
        chat_template_name: Optional[str] = None,
        *,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT_S,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        batch_constrained: bool = True,
        max_wait: float = DEFAULT_MAX_WAIT_S,
    ):
        super().__init__(base_url, api_key=api_key, verify=verify, chat_template_name=chat_template_name)
        self._init_coalescing(flush_timeout, max_batch_size, batch_constrained, max_wait)

    def _init_coalescing(self, flush_timeout, max_batch_size, batch_constrained, max_wait=DEFAULT_MAX_WAIT_S):
        self.flush_timeout = float(flush_timeout)
        self.max_wait = float(max_wait)
        self.max_batch_size = int(max_batch_size)
        self.batch_constrained = bool(batch_constrained)
        self.coalescer = Coalescer(
            self._post_generate, flush_timeout=flush_timeout, max_batch_size=max_batch_size, max_wait=max_wait
        )

    @classmethod
    def from_endpoint(cls, endpoint, **settings) -> "CoalescingRuntimeEndpoint":
        """A coalescing copy of `endpoint` (no HTTP call); settings default to endpoint's own
        when it is a CoalescingRuntimeEndpoint, else to the module defaults."""
        new = cls.__new__(cls)
        BaseBackend.__init__(new)
        skip = {"coalescer", "flush_timeout", "max_batch_size", "batch_constrained", "max_wait"}
        new.__dict__.update({k: v for k, v in endpoint.__dict__.items() if k not in skip})
        base = {
            "flush_timeout": getattr(endpoint, "flush_timeout", DEFAULT_FLUSH_TIMEOUT_S),
            "max_batch_size": getattr(endpoint, "max_batch_size", DEFAULT_MAX_BATCH_SIZE),
            "batch_constrained": getattr(endpoint, "batch_constrained", True),
            "max_wait": getattr(endpoint, "max_wait", DEFAULT_MAX_WAIT_S),
        }
        base.update(settings)
        new._init_coalescing(**base)
        return new

    def shutdown(self):
        self.coalescer.close()

    # -- HTTP -----------------------------------------------------------------------------

    def _post_generate(self, body):
        res = http_request(self.base_url + "/generate", json=body, api_key=self.api_key, verify=self.verify)
        self._assert_success(res)
        return res.json()

    def _request(self, s, data):
        return self.coalescer.request(data)

    # -- backend calls ----------------------------------------------------------------------

    def _constrained(self, sp: SglSamplingParams) -> bool:
        return sp.regex is not None or sp.json_schema is not None or sp.dtype is not None

    def generate(self, s, sampling_params: SglSamplingParams):
        self.coalescer.check_cancelled()
        if (
            s.images_
            or int(sampling_params.n or 1) != 1
            or (not self.batch_constrained and self._constrained(sampling_params))
        ):
            return super().generate(s, sampling_params)
        self._handle_dtype_to_regex(sampling_params)
        data = {
            "text": s.text_,
            "sampling_params": {
                "skip_special_tokens": global_config.skip_special_tokens_in_output,
                "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out,
                **sampling_params.to_srt_kwargs(),
            },
        }
        for item in ["return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"]:
            value = getattr(sampling_params, item, None)
            if value is not None:
                data[item] = value
        obj = self._request(s, data)
        return obj["text"], obj["meta_info"]

    def commit_lazy_operations(self, s):
        self.coalescer.check_cancelled()
        if s.images_:
            return super().commit_lazy_operations(s)
        self._request(s, {"text": s.text_, "sampling_params": {"max_new_tokens": 0}})

    def select(
        self,
        s,
        choices: List[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ) -> ChoicesDecision:
        # RuntimeEndpoint.select, with each of its (two or three) requests coalesced.
        self.coalescer.check_cancelled()
        if s.images_:
            return super().select(s, choices, temperature, choices_method)
        assert temperature <= 1e-5

        data = {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}
        obj = self._request(s, data)
        prompt_len = obj["meta_info"]["prompt_tokens"]
        logprob_start_len = max(prompt_len - 2, 0)  # For token healing

        data = {
            "text": [s.text_ + c for c in choices],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "return_text_in_logprobs": True,
            "logprob_start_len": logprob_start_len,
        }
        obj = self._request(s, data)

        input_token_logprobs = [r["meta_info"]["input_token_logprobs"] for r in obj]
        output_token_logprobs = [r["meta_info"]["output_token_logprobs"] for r in obj]
        normalized_prompt_logprobs = [
            compute_normalized_prompt_logprobs(r["meta_info"]["input_token_logprobs"]) for r in obj
        ]

        for i in range(len(input_token_logprobs)):
            healed_token_str = input_token_logprobs[i][0][-1]
            if s.text_.endswith(healed_token_str):
                healed_token_logprob = input_token_logprobs[i][0][0]
                normalized_prompt_logprobs[i] = (
                    normalized_prompt_logprobs[i] * len(input_token_logprobs[i]) - healed_token_logprob
                ) / (len(input_token_logprobs[i]) - 1)
                input_token_logprobs[i] = input_token_logprobs[i][1:]

        if choices_method.requires_unconditional_logprobs:
            input_ids = [[el[1] for el in subl] for subl in input_token_logprobs]
            data = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
            obj = self._request(s, data)
            unconditional_token_logprobs = [r["meta_info"]["input_token_logprobs"] for r in obj]
        else:
            unconditional_token_logprobs = None

        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized_prompt_logprobs,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
        )
