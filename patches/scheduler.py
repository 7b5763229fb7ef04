"""Run the global prefix plan inside SGLang's scheduler (`runtime/scheduler.py` does the work).

Targets (SGLang 0.5.17):
- `Scheduler._get_new_batch_prefill_raw`, AROUND: the adapter shows SGLang only the waiting
  requests the policy admits, in the policy's order, while SGLang's own PrefillAdder builds the
  batch (token budget, request slots, chunking, radix matching stay SGLang's). Mixed steps
  (running decodes riding with the prefill) are SGLang's `is_mixed_chunk`, set per round to the
  adapter's decision (`policy/admission.py` rule 6; every round with the user's own
  `--enable-mixed-chunk`); when on, the decode rows are added to the prefill token budget
  instead of taken from it.
- `Scheduler._add_request_to_queue`, AFTER: arrivals and retracted requests coming back.
- `sglang.srt.mem_cache.common.release_kv_cache`, AROUND: a request's KV was released
  (finished, aborted, retracted); HookRegistry propagates it to every module that imported it.
- `ScheduleBatch.retract_decode`, AFTER: counts retractions (also with `--batchllm-schedule`
  off, as the next one reports them).
- `Scheduler.get_internal_state`, AFTER: adds BatchLLM's counters (`runtime/stats.py`) to the
  state SGLang reports per DP rank (`Engine.get_server_info()`, `/get_server_info`); the batch
  command's summary reads its retractions there.
- `SchedulerRequestReceiver._pull_raw_reqs`, AFTER (only with `--batchllm-gather-ms` > 0): on
  the rank that reads the sockets (TP rank 0), appends a `ClockStamp` (its `time.monotonic()`)
  to what it received; SGLang's own `broadcast_pyobj` then carries it to every TP rank.
- `Scheduler.process_input_requests`, AROUND (same condition): takes the stamps out before
  SGLang sees the requests and hands the clock value to the adapter. Every rank thus decides
  the gather hold on rank 0's clock, not its own: wall clocks differ per rank, and a hold that
  ended on one rank and not another would put different requests in their batches.

Why no official seam serves: SGLang 0.5.17 has no scheduling-policy plugin point that sees the
KV pool and can hold requests back (`SchedulePolicy.calc_priority` only sorts the queue, and
everything in the queue is then tried), and no request-lifecycle callbacks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sglang_batchllm.compat import SUPPORTED_SGLANG_VERSION
from sglang_batchllm.config import BatchLLMConfig
from sglang_batchllm.patches import Patch
from sglang_batchllm.runtime.stats import STATS

logger = logging.getLogger(__name__)

MIXED_ATTENTION_BACKENDS = ("batchllm",)  # backends whose MIXED steps run decode rows as decode

@dataclass(frozen=True)
class ClockStamp:
    """Rank 0's monotonic clock at a receive; travels in the broadcast list of requests."""

    t: float


_config: BatchLLMConfig | None = None
_adapter = None  # the one SchedulerAdapter of this scheduler process


def _get_adapter(scheduler):
    global _adapter
    if _adapter is None:
        from sglang_batchllm.runtime.scheduler import AdapterSettings, SchedulerAdapter

        settings = AdapterSettings(
            page_size=scheduler.page_size,
            capacity=int(scheduler.max_total_num_tokens),
            levels=_config.levels,
            min_prefix_tokens=_config.min_prefix_tokens,
            gather_ms=_config.gather_ms,
        )
        _adapter = SchedulerAdapter(settings, scheduler.tree_cache, tp_rank=scheduler.ps.tp_rank)
        if scheduler.server_args.enable_metrics:
            from sglang_batchllm.runtime.metrics import BatchLLMMetrics

            _adapter.metrics = BatchLLMMetrics({"tp_rank": str(scheduler.ps.tp_rank)})
        _adapter.may_mix = _setup_mixed(scheduler, _adapter)
    return _adapter


def _setup_mixed(scheduler, adapter) -> bool:
    """May this scheduler mix decodes into prefill batches? With the user's own
    `--enable-mixed-chunk` (SGLang set `is_mixed_chunk` at init) it mixes every round, as SGLang
    does; otherwise BatchLLM's rule decides per round."""
    if scheduler.is_mixed_chunk:
        adapter.always_mix = True
        if scheduler.ps.tp_rank == 0:
            logger.info("sglang_batchllm: mixed steps in every prefill round (--enable-mixed-chunk)")
        return True
    backend = scheduler.server_args.attention_backend
    if not _config.mixed:
        return False
    if not scheduler.spec_algorithm.is_none() or scheduler.dllm_config is not None:
        logger.warning("sglang_batchllm: mixed steps off: SGLang does not mix with speculative decoding or dLLM")
        return False
    if scheduler.chunked_prefill_size is None:
        logger.warning("sglang_batchllm: mixed steps off: they need chunked prefill (--chunked-prefill-size > 0)")
        return False
    if backend not in MIXED_ATTENTION_BACKENDS:
        logger.warning(
            "sglang_batchllm: mixed steps off: attention backend %r runs the decode rows of a mixed step "
            "through its prefill kernel (2x slower measured on SGLang's triton backend); use "
            "--attention-backend batchllm, or --batchllm-mixed 0 to silence this", backend)
        return False
    if scheduler.ps.tp_rank == 0:
        logger.info("sglang_batchllm: mixed steps on: running decodes ride with the prefill unless "
                    "a known tail of waiting work carries them")
    return True


def _around_prefill_raw(original, self, *args, **kwargs):
    adapter = _get_adapter(self)
    running_batch = kwargs.get("running_batch", args[1] if len(args) > 1 else None)

    def run(mix: bool):
        bump = len(running_batch.reqs) if (mix and running_batch is not None) else 0
        saved = (self.is_mixed_chunk, self.chunked_prefill_size, self.max_prefill_tokens)
        self.is_mixed_chunk = mix
        if bump:
            # PrefillAdder takes the mixed decode rows out of the prefill budgets; give them
            # back: a decode row is one token of matmul work, not a prefill-sized slice.
            self.chunked_prefill_size += bump
            self.max_prefill_tokens += bump
        try:
            return original(self, *args, **kwargs)
        finally:
            self.is_mixed_chunk, self.chunked_prefill_size, self.max_prefill_tokens = saved

    return adapter.prefill_round(self, running_batch, run)


def _after_add_request_to_queue(result, self, req, is_retracted=False, *args, **kwargs):
    queue = self.waiting_queue
    if queue and queue[-1] is req:  # SGLang may refuse it (queue limit, priority rules)
        _get_adapter(self).on_queued(req, is_retracted)
    return result


def _around_release_kv_cache(original, req, tree_cache, *args, **kwargs):
    result = original(req, tree_cache, *args, **kwargs)
    if _adapter is not None:
        _adapter.on_released(req)
    return result


def stamp_clock(recv_reqs, clock=time.monotonic):
    """On the receiving rank, append its clock value to the received list (in place).

    Only when it can matter: something arrived, or requests wait in the session (a hold may be
    running). Then every iteration that could end a hold carries a fresh value; a decode stretch
    with nothing waiting sends no stamp (one pickle and broadcast less per step)."""
    if recv_reqs is None:
        return recv_reqs  # not the receiving rank: it gets the stamp through the broadcast
    if recv_reqs or (_adapter is not None and _adapter.session.pending):
        recv_reqs.append(ClockStamp(clock()))
    return recv_reqs


def take_clock(recv_reqs):
    """(the requests without stamps, the last stamp's clock value or None)."""
    if not recv_reqs:
        return recv_reqs, None
    stamps = [r for r in recv_reqs if isinstance(r, ClockStamp)]
    if not stamps:
        return recv_reqs, None
    return [r for r in recv_reqs if not isinstance(r, ClockStamp)], stamps[-1].t


def _after_pull_raw_reqs(result, self, *args, **kwargs):
    return stamp_clock(result)


def _around_process_input_requests(original, self, recv_reqs, *args, **kwargs):
    recv_reqs, now = take_clock(recv_reqs)
    if now is not None:
        _get_adapter(self).set_clock(now)
    return original(self, recv_reqs, *args, **kwargs)


def _after_retract_decode(result, self, *args, **kwargs):
    if result and result[0]:
        if _adapter is not None:
            _adapter.on_retract(len(result[0]))  # counts, logs, keeps the group's pin
        else:  # BatchLLM's scheduling is off or has not run yet: still counted
            STATS.retractions += len(result[0])
    return result


def _after_get_internal_state(result, self, *args, **kwargs):
    """BatchLLM's counters ride along SGLang's internal state (`Engine.get_server_info()`,
    `GET /get_server_info`), one dict per DP rank: how the batch command learns how many
    requests its scheduler retracted."""
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["batchllm"] = STATS.snapshot()
    return result


def _install(config: BatchLLMConfig) -> None:
    global _config
    _config = config
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    sched = "sglang.srt.managers.scheduler.Scheduler"
    # counted and reported whether or not BatchLLM schedules
    HookRegistry.register(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode", _after_retract_decode, HookType.AFTER
    )
    HookRegistry.register(f"{sched}.get_internal_state", _after_get_internal_state, HookType.AFTER)
    if not config.schedule:
        return
    HookRegistry.register(f"{sched}._get_new_batch_prefill_raw", _around_prefill_raw, HookType.AROUND)
    HookRegistry.register(f"{sched}._add_request_to_queue", _after_add_request_to_queue, HookType.AFTER)
    HookRegistry.register("sglang.srt.mem_cache.common.release_kv_cache", _around_release_kv_cache, HookType.AROUND)
    if config.gather_ms > 0:
        HookRegistry.register(f"{RECEIVER}._pull_raw_reqs", _after_pull_raw_reqs, HookType.AFTER)
        HookRegistry.register(f"{sched}.process_input_requests", _around_process_input_requests, HookType.AROUND)


def adapter():
    """This process's adapter (None before the first scheduling round or when inactive)."""
    return _adapter


RECEIVER = "sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver"

PATCH = Patch(
    name="scheduler",
    targets=(
        "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw",
        "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
        "sglang.srt.mem_cache.common.release_kv_cache",
        "sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode",
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
        f"{RECEIVER}._pull_raw_reqs",
        "sglang.srt.managers.scheduler.Scheduler.process_input_requests",
    ),
    sglang_version=SUPPORTED_SGLANG_VERSION,
    why_no_seam="no scheduling-policy seam can hold requests back by KV memory; no request-lifecycle callbacks",
    install=_install,
)
