"""The scheduler adapter: SGLang's `Scheduler` <-> the planning session and the policy.

One `SchedulerAdapter` per scheduler process (every TP rank has its own, and they all make the
same calls in the same order, so they reach the same decisions). `patches/scheduler.py` calls it
from four places of SGLang's scheduler:

- `on_queued(req)`: a request entered the waiting queue (new, or back after a retraction).
  New requests are buffered and planned as ONE batch at the next scheduling round, so a batch
  that arrived in one message (`Engine.generate(list)`, a batch `/generate`) is planned whole.
- `prefill_round(scheduler, running_batch, run)`: SGLang is about to form a prefill batch.
  The adapter plans the buffered arrivals, pins the prefixes that became cached, asks the
  policy which waiting requests may run, shows SGLang only those (in that order) while
  `run(mix)` builds the batch, then records who was admitted. `mix` says whether the running
  decodes ride with this prefill: as `policy/admission.py` rule 6 says (unless a known tail of
  waiting work carries them), or always when `always_mix` is set (the user asked for SGLang's
  `--enable-mixed-chunk`).
- `on_released(req)`: SGLang released a request's KV (finished, aborted or retracted).
- `on_retract(n)`: a decode batch retracted n requests (counted and logged: the policy's
  reservations are meant to make this never happen on a batch job).
- `set_clock(t)`: the clock value for this loop iteration, read by TP rank 0 and broadcast with
  the received requests (`patches/scheduler.py`), so the gather hold decides the same on every
  rank; the adapter never reads a clock itself.

Pins go through the tree cache's `pin`/`unpin` (`runtime/pinned_cache.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from sglang_batchllm.planner import PlanInputError, PlannerConfig, PlanRequest
from sglang_batchllm.planner.session import GroupState, Pin, PlanningSession, Unpin
from sglang_batchllm.policy.admission import AdmissionConfig, PoolView, mixes, plan_admission, running_need

from .stats import STATS

logger = logging.getLogger(__name__)

# A prefix longer than this share of the KV pool is not pinned for its group's lifetime: it
# would starve everything else; its requests run as unshared ones.
MAX_PIN_FRACTION = 0.5

# Decode budget reserved for a request that may stop early (no ignore_eos): its whole
# max_new_tokens up to this, then this. A batch job's budgets are known and reserved whole; an
# online chat request with max_tokens unset (the context length) would otherwise reserve 4,096
# slots and cut concurrency far below vanilla SGLang's (which reserves 0.1-0.7 of the budget and
# retracts when wrong). Above it, a request that really decodes that long can be retracted:
# counted and logged, its group's pin kept.
EOS_RESERVE_TOKENS = 1024


@dataclass(frozen=True)
class AdapterSettings:
    page_size: int
    capacity: int  # KV slots of the pool
    levels: int = 1
    min_prefix_tokens: int = 32
    clip_max_new_tokens: int = 4096
    gather_ms: int = 0  # the gather hold's bound (0: off); see policy/admission.py rule 4


def decode_budget(req: Any, clip: int) -> int:
    """The decode tokens admission reserves for `req` (see EOS_RESERVE_TOKENS)."""
    params = req.sampling_params
    budget = clip if params.max_new_tokens is None else min(int(params.max_new_tokens), clip)
    return budget if getattr(params, "ignore_eos", False) else min(budget, EOS_RESERVE_TOKENS)


def _plan_request(req: Any, clip: int) -> PlanRequest:
    return PlanRequest(req.rid, req.origin_input_ids, decode_budget(req, clip))


def _shareable(req: Any) -> bool:
    """Requests whose KV depends on more than their token ids (images, embeddings, a cache
    namespace) never share a group prefix."""
    return (
        getattr(req, "multimodal_inputs", None) is None
        and getattr(req, "input_embeds", None) is None
        and getattr(req, "extra_key", None) is None
        and getattr(req, "positional_embed_overrides", None) is None
    )


class SchedulerAdapter:
    def __init__(self, settings: AdapterSettings, tree_cache: Any, tp_rank: int = 0):
        for name in ("pin", "unpin", "pinned_tokens"):
            if not callable(getattr(tree_cache, name, None)):
                raise SystemExit(
                    f"sglang_batchllm: the radix cache is {type(tree_cache).__name__}, which cannot pin "
                    "prefixes; BatchLLM needs --radix-cache-backend batchllm (sglang_batchllm.Engine and "
                    "the launcher set it unless another backend is given)."
                )
        self.settings = settings
        self.tree = tree_cache
        self.log = tp_rank == 0
        planner = PlannerConfig(settings.page_size, settings.levels, settings.min_prefix_tokens)
        self.session = PlanningSession(planner, max_prefix_tokens=int(settings.capacity * MAX_PIN_FRACTION))
        self.admission = AdmissionConfig(settings.clip_max_new_tokens, gather_s=settings.gather_ms / 1000)
        # rank 0's clock value of this iteration (set_clock); None until one came: no hold then
        self.now: float | None = None
        self.last_held = 0  # groups held back to gather in the last round
        self._arrived: list[Any] = []  # queued, not yet planned
        self._reqs: dict[str, Any] = {}  # rid -> Req of every request the session knows
        self._pins: dict[int, Any] = {}  # gid -> the cache's pin handle
        self._unmanaged: set[str] = set()  # requests the session could not take (logged)
        self.metrics = None  # a runtime.metrics.BatchLLMMetrics when --enable-metrics is on
        self.may_mix = False  # mixed steps possible at all (backend, chunked prefill, settings)
        self.always_mix = False  # mix decodes into every prefill round, whatever rule 6 says
        STATS.active = True

    # ---- arrivals -------------------------------------------------------------------------
    def set_clock(self, now: float) -> None:
        self.now = now

    @property
    def _arrival_time(self) -> float:
        return 0.0 if self.now is None else self.now

    def on_queued(self, req: Any, is_retracted: bool) -> None:
        if is_retracted and req.rid in self.session:
            self.session.retracted(req.rid)
            return
        self._arrived.append(req)

    def _plan_arrivals(self) -> None:
        if not self._arrived:
            return
        batch, self._arrived = self._arrived, []
        clip = self.settings.clip_max_new_tokens
        shared = [r for r in batch if _shareable(r)]
        unshared = [r for r in batch if not _shareable(r)]
        try:
            now = self._arrival_time
            created = self.session.add([_plan_request(r, clip) for r in shared], now=now)
            self.session.add_unshared([_plan_request(r, clip) for r in unshared], now=now)
        except PlanInputError as err:
            # all-or-nothing failed (a duplicate id): take them one by one, keep the rest
            created = []
            for r in batch:
                try:
                    add = self.session.add if _shareable(r) else self.session.add_unshared
                    created += add([_plan_request(r, clip)], now=self._arrival_time)
                except PlanInputError as one:
                    logger.warning("sglang_batchllm: request %r runs unplanned: %s", r.rid, one)
                    self._unmanaged.add(r.rid)
            logger.warning("sglang_batchllm: batch planned request by request: %s", err)
        for r in batch:
            if r.rid not in self._unmanaged:
                self._reqs[r.rid] = r
        shared_groups = [self.session.group(g) for g in created if self.session.group(g).is_shared]
        STATS.batches += 1
        STATS.prefix_tokens_planned += sum(g.prefix_len for g in shared_groups)
        if self.log:
            m = self.session.last_plan
            logger.info(
                "sglang_batchllm: batch of %d requests -> %d shared groups (%d requests joined live groups), "
                "planned prefill saving %.1f%%",
                len(batch), len(shared_groups), len(batch) - sum(
                    len(self.session.group(g).pending) for g in created),
                100 * (m.saving if m is not None and shared else 0.0),
            )

    # ---- one prefill round -------------------------------------------------------------------
    def prefill_round(self, scheduler: Any, running_batch: Any, run: Callable[[bool], Any]) -> Any:
        arrivals = bool(self._arrived)  # requests came in since the last round (rule 6)
        self._plan_arrivals()
        if self.session.pending == 0 and not self._unmanaged:
            # nothing waits (a decode stretch, or the last chunks of a prompt): keep the step's
            # CPU time flat; no known work waits, so decodes ride with any chunk (rule 6)
            result = run(self.may_mix)
            self._update_gauges()
            return result
        self._forget_aborted(scheduler.waiting_queue)
        self._pin_cached_prefixes()
        pool = self.pool_view(scheduler, running_batch)
        decision = plan_admission(self.session, pool, self.admission, now=self.now)
        self.last_held = len(decision.held)
        full_queue = scheduler.waiting_queue
        offered = [self._reqs[rid] for rid in decision.offer]
        offered += [r for r in full_queue if r.rid in self._unmanaged]
        scheduler.waiting_queue = offered
        budget = scheduler.chunked_prefill_size or 0
        mix = self.may_mix and (self.always_mix or mixes(decision, budget, arrivals))
        try:
            result = run(mix)
        finally:
            left = scheduler.waiting_queue  # what SGLang did not take (plus anything it re-queued)
            taken = {id(r) for r in offered} - {id(r) for r in left}
            known = {id(r) for r in full_queue}
            scheduler.waiting_queue = [r for r in full_queue if id(r) not in taken] + [
                r for r in left if id(r) not in known]
        for req in offered:
            if id(req) in taken:
                self._admitted(req)
        batch = result[0] if isinstance(result, tuple) else result
        if batch is not None:
            STATS.last_step_tokens = int(getattr(batch, "extend_num_tokens", 0) or 0)
        self._update_gauges()
        return result

    def pool_view(self, scheduler: Any, running_batch: Any) -> PoolView:
        clip = self.settings.clip_max_new_tokens
        free = scheduler.token_to_kv_pool_allocator.available_size() + self.tree.evictable_size()
        need = 0
        reqs = list(running_batch.reqs)
        chunked = getattr(scheduler, "chunked_req", None)
        if chunked is not None and all(r is not chunked for r in reqs):
            reqs.append(chunked)
        page = self.settings.page_size
        for r in reqs:
            if r.finished():
                continue
            prompt_left = len(r.origin_input_ids) - _computed_prompt(r)
            left = running_need(prompt_left, decode_budget(r, clip), len(r.output_ids), clip)
            # KV is allocated by whole pages: what a request still needs is the pages between
            # what it holds now and what it will hold at the end
            kv = getattr(r, "kv", None)
            held = kv.kv_allocated_len if kv is not None else 0
            need += _ceil_page(held + left, page) - _ceil_page(held, page)
        return PoolView(self.settings.capacity, free, need, self.settings.page_size)

    def _admitted(self, req: Any) -> None:
        group = self.session.group_of(req.rid)
        if group is None:
            return
        cached = len(req.prefix_indices)
        if group.is_shared:
            if group.state is GroupState.WAITING:
                STATS.prefix_tokens_computed += max(0, group.prefix_len - cached)
            elif cached < group.prefix_len:
                # the pinned prefix should always match in full; count it if it did not
                STATS.prefix_recomputations += 1
                STATS.prefix_tokens_computed += group.prefix_len - cached
                logger.warning("sglang_batchllm: request %s recomputes %d tokens of its group's prefix",
                               req.rid, group.prefix_len - cached)
        self._apply(self.session.admitted(req.rid))

    def _pin_cached_prefixes(self) -> None:
        for g in list(self.session.groups()):
            if g.state is not GroupState.PREFILLING:
                continue
            leader = self._reqs.get(g.leader)
            if leader is not None and not leader.finished() and not leader.output_ids:
                continue  # its prefill is not done yet
            handle = self.tree.pin(g.prefix_ids, g.prefix_len)
            if handle is None:  # the leader's KV is gone before it could be pinned
                logger.warning("sglang_batchllm: group %d lost its prefix before the pin; computing it again", g.gid)
                self._apply(self.session.leader_lost(g.gid))
                continue
            self._pins[g.gid] = handle
            self.session.prefix_cached(g.gid)

    def _forget_aborted(self, waiting_queue: list) -> None:
        """Requests SGLang dropped from the waiting queue without running them (abort_request,
        queue limits) leave the session, releasing their share of a pin."""
        if self.session.pending <= len(waiting_queue):
            return  # nothing vanished (the count is the cheap check; the set only when needed)
        queued = {r.rid for r in waiting_queue}
        for g in list(self.session.groups()):
            for rid in [r for r in g.pending if r not in queued]:
                self._reqs.pop(rid, None)
                self._apply(self.session.aborted(rid))

    # ---- releases -------------------------------------------------------------------------
    def on_released(self, req: Any) -> None:
        if req.finished():
            self._unmanaged.discard(req.rid)
        if not req.finished() or req.rid not in self.session:
            return  # a retraction (the request comes back through on_queued) or not ours
        group = self.session.group_of(req.rid)
        self._reqs.pop(req.rid, None)
        events = self.session.finished(req.rid)
        self._apply(events)
        if self.log and any(isinstance(e, Unpin) for e in events):
            logger.info("sglang_batchllm: group %d done (prefix %d tokens, %d groups live)", group.gid,
                        group.prefix_len, len(self._pins))

    def on_retract(self, num_reqs: int) -> None:
        STATS.retractions += num_reqs
        if num_reqs and self.log:
            logger.warning("sglang_batchllm: %d requests retracted (their groups' pins stay)", num_reqs)

    def _apply(self, events) -> None:
        for ev in events:
            if isinstance(ev, Unpin):
                self.tree.unpin(self._pins.pop(ev.gid))
                STATS.groups_done += 1
            elif isinstance(ev, Pin):
                raise AssertionError("pins are taken by _pin_cached_prefixes")

    def _update_gauges(self) -> None:
        STATS.groups_live = len(self._pins)
        STATS.pinned_tokens = self.tree.pinned_tokens()
        if self.metrics is not None:
            self.metrics.export()

    def check_invariants(self) -> None:
        self.session.check_invariants()
        pinned = {g.gid for g in self.session.groups() if g.pinned}
        assert pinned == set(self._pins), f"pins {sorted(self._pins)} != pinned groups {sorted(pinned)}"


def _ceil_page(n: int, page: int) -> int:
    return -(-n // page) * page


def _computed_prompt(req: Any) -> int:
    """Prompt tokens of a running request whose KV exists (cached prefix + prefilled chunks)."""
    if req.output_ids:
        return len(req.origin_input_ids)
    end = getattr(getattr(req, "extend_range", None), "end", None)
    return len(req.prefix_indices) if end is None else max(end, len(req.prefix_indices))
