"""SchedulerAdapter inside a mini SGLang scheduler loop, with as much real SGLang as runs on CPU.

Real SGLang (0.5.17) used here:
- `Req` with a real `SamplingParams`, token ids as `array('q')`; `init_next_round_input` (the
  radix match), `update_finish_state`, FINISH_ABORT via `to_finish` / `set_finish_with_abort`;
- `PinnedRadixCache` (SGLang's `RadixCache` + pins) over a real `MHATokenToKVPool`, a real
  (paged) token allocator and a real `ReqToTokenPool`, on CPU tensors;
- `PrefillAdder` (token budget = chunked_prefill_size, max_prefill_tokens, new_token_ratio
  from the real `NewTokenRatioTracker` with SGLang's defaults), `add_chunked_req`, `add_one_req`;
- `ScheduleBatch.init_new` / `prepare_for_extend` / `prepare_for_decode` / `filter_batch` /
  `merge_batch` / `check_decode_mem`, hence the real `alloc_for_extend` / `alloc_for_decode`
  (eviction through `evict_from_tree_cache`), `write_cache_indices` (its torch path), `ReqKvInfo`;
- `cache_unfinished_req` (via `maybe_cache_unfinished_req`) and `release_kv_cache`.

Re-implemented in the harness (`MiniScheduler`), following `Scheduler` line by line but
without what a CPU test cannot or need not have:
- `get_next_batch_to_run`: stash the chunked request, merge the last extend batch into the
  running batch, prefill first, else decode;
- `_get_new_batch_prefill_raw` in simplified form (no LoRA, hicache, mamba, PD, priority
  preemption, prefill delayer): the same admission loop around the real PrefillAdder, then the
  real ScheduleBatch construction and `prepare_for_extend`;
- `update_running_batch`: a failing `check_decode_mem` is a test failure (`WouldRetract`:
  BatchLLM's reservations promise no retraction); a test can force the real `retract_decode`
  at chosen decode steps instead (SGLang's TEST_RETRACT, by step number), the retracted
  requests going back through `_add_request_to_queue(req, is_retracted=True)`;
- the forward pass (a fake next token) and `process_batch_result_prefill/decode` (append the
  token, `update_finish_state`, `release_kv_cache` or `cache_unfinished_req`, chunk counting);
- the plugin's hooks (`patches/scheduler.py`): `on_queued` after a queue append,
  `on_released` after `release_kv_cache`, `prefill_round` around the prefill-batch builder;
- `abort_request`: pop from the waiting queue ("method 1"), `to_finish = FINISH_ABORT()` on a
  running one ("method 3"), and for the chunked request `process_pending_chunked_abort` (the
  real `prepare_abort`, then `release_kv_cache(is_insert=False)`);
- the paged allocator's two Triton kernels (no Triton on CPU): `alloc_extend_kernel` runs
  SGLang's own `alloc_extend_naive`; `alloc_decode_kernel` is a 10-line torch port.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from array import array
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.disaggregation.utils import prepare_abort
from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req, ScheduleBatch
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
from sglang.srt.managers.scheduler_components.new_token_ratio_tracker import NewTokenRatioTracker
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator import paged as paged_allocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import maybe_cache_unfinished_req, release_kv_cache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.runtime_context import get_context, get_parallel, get_server_args
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from sglang_batchllm.kernels.step_groups import NO_KEY
from sglang_batchllm.planner.session import GroupState
from sglang_batchllm.runtime import row_prefixes
from sglang_batchllm.runtime import stats as stats_module
from sglang_batchllm.runtime.pinned_cache import PinnedRadixCache
from sglang_batchllm.runtime.scheduler import AdapterSettings, SchedulerAdapter
from sglang_batchllm.runtime.stats import STATS, SchedulerStats

HUGE = 1 << 30
VOCAB = 1 << 20
OUTPUT_TOKEN_BASE = VOCAB - 100_000  # decoded tokens: never a prompt token


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def fresh_stats():
    """STATS is a module global the adapter writes: every test starts from zero."""
    for f in dataclasses.fields(SchedulerStats):
        setattr(STATS, f.name, f.default)
    assert stats_module.STATS is STATS
    yield
    for f in dataclasses.fields(SchedulerStats):
        setattr(STATS, f.name, f.default)


@pytest.fixture(autouse=True)
def published_config():
    """The process-wide config ScheduleBatch / alloc / release read (spec algorithm, the
    attention backend that picks write_cache_indices' torch path, tp rank for abort logs)."""
    with get_parallel().override(tp_rank=0), get_context().override_server_args(
        attention_backend="torch_native", speculative_algorithm=None,
    ) as server_args:
        yield server_args


class _CpuLaunch:
    """Stands in for a Triton kernel object: `kernel[grid](*args)` calls the CPU function."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        return self.fn


def _alloc_extend_cpu(prefix_lens, seq_lens, last_loc, free_pages, out_indices, bs_upper, page_size):
    paged_allocator.alloc_extend_naive(
        prefix_lens, seq_lens, last_loc, free_pages, out_indices, page_size, out_indices.device
    )


def _alloc_decode_cpu(seq_lens, last_loc, free_pages, out_indices, bs_upper, page_size):
    """`alloc_decode_kernel`: a request whose new token starts a page takes the next free page
    (in batch order), the others the slot after their last one."""
    new_pages = 0
    for i in range(len(seq_lens)):
        if (int(seq_lens[i]) - 1) % page_size == 0:
            out_indices[i] = free_pages[new_pages] * page_size
            new_pages += 1
        else:
            out_indices[i] = last_loc[i] + 1


@pytest.fixture(autouse=True)
def cpu_paged_kernels(monkeypatch):
    monkeypatch.setattr(paged_allocator, "alloc_extend_kernel", _CpuLaunch(_alloc_extend_cpu))
    monkeypatch.setattr(paged_allocator, "alloc_decode_kernel", _CpuLaunch(_alloc_decode_cpu))


# ---- requests ------------------------------------------------------------------------------


def make_req(rid: str, tokens, max_new: int) -> Req:
    params = SamplingParams(max_new_tokens=max_new)
    params.normalize(None)
    params.verify(VOCAB)
    return Req(rid, "", array("q", tokens), params, vocab_size=VOCAB)


def group_prefix(g: int, prefix_len: int) -> list[int]:
    base = (g + 1) * 10_000
    return [base + i for i in range(prefix_len)]


def member(g: int, m: int, prefix_len: int = 48, suffix_len: int = 8, max_new: int = 4) -> Req:
    """Member m of group g: the group's prefix, then a suffix whose first token is its own."""
    base = (g + 1) * 10_000 + 5_000 + m * 100
    return make_req(f"g{g}m{m}", group_prefix(g, prefix_len) + [base + j for j in range(suffix_len)], max_new)


def batch_of_groups(groups, members, seed=0, **kw) -> list[Req]:
    reqs = [member(g, m, **kw) for g in groups for m in range(members)]
    random.Random(seed).shuffle(reqs)
    return reqs


# ---- the mini scheduler --------------------------------------------------------------------


class Stuck(AssertionError):
    """The loop made no progress to completion within its step budget."""


class WouldRetract(AssertionError):
    """A decode step does not fit in the KV pool: SGLang would retract here."""


class MiniScheduler:
    """SGLang's scheduler loop, non-overlap, reduced to what drives the adapter (see the module
    docstring for what is real and what is re-implemented)."""

    def __init__(self, page_size: int = 1, pool_tokens: int = 2048, chunked_prefill_size: int = 64,
                 max_prefill_tokens: int = 16384, max_running_requests: int = 64, context_len: int = 512):
        kv = MHATokenToKVPool(
            pool_tokens, page_size, torch.float32, head_num=1, head_dim=1, layer_num=1,
            device="cpu", enable_memory_saver=False,
        )
        if page_size == 1:
            allocator = TokenToKVPoolAllocator(pool_tokens, torch.float32, "cpu", kv, need_sort=False)
        else:
            allocator = PagedTokenToKVPoolAllocator(pool_tokens, page_size, torch.float32, "cpu", kv, need_sort=False)
            allocator.debug_mode = True  # SGLANG_DEBUG_MEMORY_POOL: duplicate-page and alignment checks
        req_to_token_pool = ReqToTokenPool(
            size=max_running_requests, max_context_len=context_len, device="cpu", enable_memory_saver=False
        )
        self.tree_cache = PinnedRadixCache(CacheInitParams(
            disable=False, req_to_token_pool=req_to_token_pool, token_to_kv_pool_allocator=allocator,
            page_size=page_size, eviction_policy="lru",
        ))
        # the Scheduler attributes the adapter and the prefill builder read
        self.waiting_queue: list[Req] = []
        self.token_to_kv_pool_allocator = allocator
        self.req_to_token_pool = req_to_token_pool
        self.chunked_req: Req | None = None
        self.page_size = page_size
        self.max_total_num_tokens = pool_tokens
        self.chunked_prefill_size = chunked_prefill_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running_requests = max_running_requests
        self.is_mixed_chunk = False
        self.max_prefill_bs = 0
        self.model_config = SimpleNamespace(vocab_size=VOCAB, is_encoder_decoder=False)
        self.new_token_ratio_tracker = NewTokenRatioTracker.from_server_args(
            SimpleNamespace(schedule_conservativeness=1.0)
        )
        self.running_batch = ScheduleBatch(reqs=[], batch_is_full=False)
        self.last_batch: ScheduleBatch | None = None

        self.adapter = SchedulerAdapter(AdapterSettings(page_size=page_size, capacity=pool_tokens), self.tree_cache)

        # what the test observes
        self.holding: dict[int, Req] = {}  # id -> requests holding a req slot and KV
        self.finished: dict[str, int] = {}  # rid -> times finished
        self.extend_tokens = 0  # prompt tokens prefilled, over every prefill batch
        self.extend_by_rid: dict[str, int] = {}
        self.admitted_order: list[str] = []
        self.steps = 0
        self.prefill_steps = 0
        self.decode_steps = 0
        self.max_pinned = 0
        self.shared_rows = 0  # decode rows that share a cached prefix with another (row facts)
        self.decode_rows = 0
        self.on_step = None  # a callback(sched) run at the start of every step (arrivals, aborts)
        self.retract_at_decode: set[int] = set()  # decode steps (1-based) that retract
        self.retracted: list[str] = []
        self.mix_asks: list[bool] = []  # per prefill round: did the adapter ask for a mixed step
        self._pending_chunked_abort_req: Req | None = None
        self._next_token = OUTPUT_TOKEN_BASE

    # ---- intake: Scheduler._add_request_to_queue + the plugin's AFTER hook ----------------
    def submit(self, reqs) -> None:
        for req in reqs:
            self.waiting_queue.append(req)
            self.adapter.on_queued(req, False)

    # ---- abort_request ------------------------------------------------------------------
    def abort(self, rid: str) -> str:
        if self.chunked_req is not None and self.chunked_req.rid == rid:
            self._pending_chunked_abort_req = self.chunked_req  # torn down at the next step's top
            self.chunked_req.to_finish = FINISH_ABORT()  # it is in last_batch too (method 3)
            return "chunked"
        for i, req in enumerate(self.waiting_queue):
            if req.rid == rid:
                self.waiting_queue.pop(i)  # "Abort method 1: directly pop from the queue"
                return "waiting"
        for req in self.running_batch.reqs + (self.last_batch.reqs if self.last_batch else []):
            if req.rid == rid and not req.finished():
                req.to_finish = FINISH_ABORT()  # "Abort method 3: set to_finish"
                return "running"
        raise AssertionError(f"{rid} is neither waiting nor running")

    def _process_pending_chunked_abort(self) -> None:
        req, self._pending_chunked_abort_req = self._pending_chunked_abort_req, None
        if req is None or self.chunked_req is not req:
            return
        prepare_abort(req, "Aborted")
        req.to_finish = None
        release_kv_cache(req, self.tree_cache, is_insert=False)
        self.adapter.on_released(req)  # the AROUND hook
        self.holding.pop(id(req))
        self.finished[req.rid] = self.finished.get(req.rid, 0) + 1
        self.chunked_req = None

    # ---- get_next_batch_to_run ------------------------------------------------------------
    def step(self) -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self)
        self._process_pending_chunked_abort()
        if self.chunked_req is not None:
            if self.chunked_req.extend_range.end > len(self.chunked_req.prefix_indices):
                maybe_cache_unfinished_req(self.chunked_req, self.tree_cache, chunked=True)  # stash
        last = self.last_batch
        if last is not None and last.forward_mode.is_extend():
            exclude = [r for r in (self.chunked_req, last.chunked_req) if r is not None]
            last_bs = last.batch_size()
            last.filter_batch(chunked_req_to_exclude=exclude)
            if last.batch_size() < last_bs:
                self.running_batch.batch_is_full = False
            if not last.is_empty():
                if self.running_batch.is_empty():
                    self.running_batch = last
                else:
                    self.running_batch.merge_batch(last)

        running = self.running_batch
        def run(mix: bool):
            self.mix_asks.append(mix)  # the mini scheduler never mixes; the test reads the asks
            return self._prefill_raw(running)

        new_batch, self.running_batch = self.adapter.prefill_round(self, running, run)

        if new_batch is not None:
            self.prefill_steps += 1
            self._run_prefill(new_batch)
            self.last_batch = new_batch
        elif not self.running_batch.is_empty():
            self.running_batch = self._update_running_batch(self.running_batch)
            if self.running_batch.is_empty():
                self.last_batch = None
            else:
                self.decode_steps += 1
                self._run_decode(self.running_batch)
                self.last_batch = self.running_batch
        else:
            self.last_batch = None
            self.new_token_ratio_tracker.reset()  # on_idle
        self.check()

    # ---- _get_new_batch_prefill_raw (simplified) -------------------------------------------
    def _num_allocatable_reqs(self, running_bs: int) -> int:
        return min(self.max_running_requests - running_bs, self.req_to_token_pool.available_size())

    def _prefill_raw(self, running_batch: ScheduleBatch):
        if (running_batch.batch_is_full or len(self.waiting_queue) == 0) and self.chunked_req is None:
            return None, running_batch
        running_bs = len(running_batch.reqs)
        if self._num_allocatable_reqs(running_bs) <= 0 and self.chunked_req is None:
            running_batch.batch_is_full = True
            return None, running_batch

        adder = PrefillAdder(
            self.page_size, self.tree_cache, self.token_to_kv_pool_allocator, running_batch,
            self.new_token_ratio_tracker.current, self.max_prefill_tokens, self.chunked_prefill_size,
            running_bs if self.is_mixed_chunk else 0, 0,
            max_prefill_bs=int(self.max_prefill_bs), max_running_requests=self.max_running_requests,
            prefill_max_requests=None, waiting_queue_len=len(self.waiting_queue),
        )
        if self.chunked_req is not None:
            self.chunked_req.init_next_round_input()
            self.chunked_req = adder.add_chunked_req(self.chunked_req)

        for req in self.waiting_queue:
            if len(adder.can_run_list) >= self._num_allocatable_reqs(len(running_batch.reqs)):
                running_batch.batch_is_full = True
            if running_batch.batch_is_full:
                break
            req.init_next_round_input(self.tree_cache)
            res = adder.add_one_req(req, has_chunked_req=self.chunked_req is not None, truncation_align_size=None)
            if res != AddReqResult.CONTINUE:
                if res == AddReqResult.NO_TOKEN:
                    running_batch.batch_is_full = True
                break

        can_run_list = adder.can_run_list
        if len(can_run_list) == 0:
            return None, running_batch
        self._check_admissions(can_run_list)
        can_run_set = set(can_run_list)
        self.waiting_queue = [x for x in self.waiting_queue if x not in can_run_set]
        if adder.new_chunked_req is not None:
            assert self.chunked_req is None
            self.chunked_req = adder.new_chunked_req
        if self.chunked_req is not None:
            self.chunked_req.inflight_middle_chunks += 1

        new_batch = ScheduleBatch.init_new(
            can_run_list, self.req_to_token_pool, self.token_to_kv_pool_allocator, self.tree_cache,
            self.model_config, False, SpeculativeAlgorithm.NONE, chunked_req=self.chunked_req,
        )
        new_batch.contains_last_prefill_chunk = self.chunked_req is None or len(can_run_list) != 1
        self.max_prefill_bs = max(self.max_prefill_bs, len(can_run_list))
        new_batch.prepare_for_extend()  # allocates KV (evicting the tree's shortfall), writes req_to_token
        new_batch.decoding_reqs = None
        for req in can_run_list:
            self.holding[id(req)] = req
        return new_batch, running_batch

    def _check_admissions(self, can_run_list) -> None:
        """Prefix first: a member of a shared group enters only once the group's prefix is
        pinned, and then matches all of it (no member recomputes the prefix)."""
        session = self.adapter.session
        for req in can_run_list:
            if id(req) in self.holding:
                continue  # a later chunk of a request admitted earlier
            self.admitted_order.append(req.rid)
            group = session.group_of(req.rid)
            if group is None or not group.is_shared:
                continue
            assert group.state in (GroupState.WAITING, GroupState.CACHED), (
                f"{req.rid} admitted while its group {group.gid} is {group.state.value}")
            if group.state is GroupState.CACHED:
                assert group.pinned, f"{req.rid} admitted before its group's prefix was pinned"
                assert len(req.prefix_indices) >= group.prefix_len, (
                    f"{req.rid} matched {len(req.prefix_indices)} of its group's {group.prefix_len} prefix tokens")

    # ---- update_running_batch ------------------------------------------------------------------
    def _update_running_batch(self, batch: ScheduleBatch) -> ScheduleBatch:
        initial_bs = batch.batch_size()
        batch.filter_batch()
        if batch.is_empty():
            batch.batch_is_full = False
            return batch
        fits = batch.check_decode_mem()
        forced = self.decode_steps + 1 in self.retract_at_decode  # SGLang's TEST_RETRACT, by step
        if not fits and not forced:
            raise WouldRetract(
                f"decode of {batch.batch_size()} requests would retract: "
                f"{self.tree_cache.available_and_evictable_str()}")
        if forced:
            self._retract(batch)
        else:
            self.new_token_ratio_tracker.decay_step()
        if batch.batch_size() < initial_bs:
            batch.batch_is_full = False
        batch.prepare_for_decode()
        return batch

    def _retract(self, batch: ScheduleBatch) -> None:
        """The real `retract_decode` (release without insert, reset_for_retract), the plugin's
        AFTER hook on it, then `_add_request_to_queue(req, is_retracted=True)` + its AFTER hook."""
        retracted, new_ratio, to_abort = batch.retract_decode(get_server_args())
        assert not to_abort
        self.adapter.on_retract(len(retracted))
        self.new_token_ratio_tracker.current = new_ratio
        for req in retracted:
            self.adapter.on_released(req)  # the AROUND hook on release_kv_cache (a no-op: unfinished)
            self.holding.pop(id(req))
            self.retracted.append(req.rid)
            self.waiting_queue.append(req)
            self.adapter.on_queued(req, True)

    # ---- forward + process_batch_result_{prefill,decode} -------------------------------------
    def _token(self) -> int:
        self._next_token += 1
        return self._next_token

    def _run_prefill(self, batch: ScheduleBatch) -> None:
        row_prefixes.capture(batch.reqs)  # as patches/forward_groups.py does at ForwardBatch.init_new
        self.extend_tokens += batch.extend_num_tokens
        for req, n in zip(batch.reqs, batch.extend_lens):
            self.extend_by_rid[req.rid] = self.extend_by_rid.get(req.rid, 0) + n
        for req in batch.reqs:
            if (req.finished() and req.inflight_middle_chunks <= 0) or req.is_retracted:
                continue
            if req.inflight_middle_chunks <= 0:
                req.output_ids.append(self._token())
                req.update_finish_state()
                if req.finished():
                    self._release(req)
                else:
                    maybe_cache_unfinished_req(req, self.tree_cache)
            else:
                req.inflight_middle_chunks -= 1

    def _run_decode(self, batch: ScheduleBatch) -> None:
        self._check_row_prefixes(batch)
        for req in batch.reqs:
            req.output_ids.append(self._token())
            req.update_finish_state()
            if req.finished():
                self._release(req)

    def _release(self, req: Req) -> None:
        """`release_kv_cache` as the plugin's AROUND hook wraps it."""
        release_kv_cache(req, self.tree_cache)
        self.adapter.on_released(req)
        self.holding.pop(id(req))
        self.finished[req.rid] = self.finished.get(req.rid, 0) + 1

    # ---- checks ---------------------------------------------------------------------------
    def _check_row_prefixes(self, batch: ScheduleBatch) -> None:
        """What the attention backend relies on (kernels/step_groups.py): decode rows with one
        radix key hold identical KV slots over that prefix, after SGLang's post-prefill
        re-insertion moved every request to a node of its own."""
        facts = row_prefixes.rows_of(batch.reqs)
        rows_of_key = Counter(facts.keys)
        slots_of_key = {}
        for req, key, plen in zip(batch.reqs, facts.keys, facts.lens):
            if key == NO_KEY:
                continue
            slots = self.req_to_token_pool.req_to_token[req.req_pool_idx, :plen].clone()
            assert plen < req.seqlen, "a shared prefix leaves the row a token of its own"
            if key in slots_of_key:
                assert torch.equal(slots_of_key[key], slots), f"rows of node {key} hold other slots"
            slots_of_key[key] = slots
            self.shared_rows += rows_of_key[key] >= 2
        self.decode_rows += len(batch.reqs)

    def in_use_tokens(self) -> int:
        """KV slots the running requests hold outside the tree: their allocation (whole pages)
        past the part the tree owns (`cache_protected_len`, page-aligned)."""
        ps, total = self.page_size, 0
        for req in self.holding.values():
            assert req.kv is not None and req.req_pool_idx is not None
            total += -(-req.kv.kv_allocated_len // ps) * ps - req.cache_protected_len
        return total

    def check(self) -> None:
        self.tree_cache.check_invariants(in_use_tokens=self.in_use_tokens())
        self.adapter.check_invariants()
        assert self.tree_cache.live_pins() == len(self.adapter._pins)
        self.max_pinned = max(self.max_pinned, self.tree_cache.pinned_tokens())
        assert STATS.retractions == len(self.retracted)

    def idle(self) -> bool:
        return (not self.waiting_queue and self.chunked_req is None and not self.holding
                and not self.adapter._arrived)

    def run(self, max_steps: int = 5000) -> None:
        """Step until a step that starts idle ends idle (the adapter saw the empty queue)."""
        while True:
            if self.steps >= max_steps:
                raise Stuck(f"not done after {max_steps} steps: {len(self.waiting_queue)} waiting, "
                            f"{len(self.holding)} running, pins {self.tree_cache.live_pins()}")
            was_idle = self.idle()
            self.step()
            if was_idle and self.idle():
                return

    def assert_drained(self) -> None:
        """No request, group or pin left; flushing the tree gives every KV slot back."""
        assert self.idle()
        assert len(self.adapter.session) == 0 and self.adapter.session.num_groups == 0
        assert not self.adapter._pins and not self.adapter._reqs
        assert self.tree_cache.live_pins() == 0 and self.tree_cache.protected_size() == 0
        self.tree_cache.evict(EvictParams(num_tokens=HUGE))
        self.tree_cache.check_invariants(in_use_tokens=0)
        allocator = self.token_to_kv_pool_allocator
        assert self.tree_cache.evictable_size() == 0
        assert allocator.available_size() == allocator.size // self.page_size * self.page_size
        assert self.req_to_token_pool.available_size() == self.max_running_requests


def assert_all_finished_once(sched: MiniScheduler, reqs) -> None:
    assert sorted(sched.finished) == sorted(r.rid for r in reqs)
    assert set(sched.finished.values()) == {1}
    for req in reqs:
        assert req.finished()
        if not isinstance(req.finished_reason, FINISH_ABORT):
            assert len(req.output_ids) == req.sampling_params.max_new_tokens


def planned_prefill(groups: int, members: int, prefix_len: int = 48, suffix_len: int = 8) -> int:
    """Physical prefill of the plan: every prefix once, every member's own tokens."""
    return groups * prefix_len + groups * members * suffix_len


# ---- scenarios -----------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16])
def test_shuffled_groups_prefix_computed_once(page_size):
    sched = MiniScheduler(page_size=page_size, pool_tokens=2048)
    sched.adapter.may_mix = True
    reqs = batch_of_groups(range(6), 5)
    sched.submit(reqs)
    sched.run()
    # everything fits: the round the batch arrived in mixes (nothing runs yet), then rounds
    # mix only once the waiting work fits one step (rule 6): until then the known tail
    # carries the decodes
    assert sched.mix_asks[0]
    first_mix = sched.mix_asks.index(True, 1)
    assert first_mix > 1 and not any(sched.mix_asks[1:first_mix]) and all(sched.mix_asks[first_mix:])

    assert_all_finished_once(sched, reqs)
    assert sched.extend_tokens == planned_prefill(6, 5)
    assert STATS.prefix_recomputations == 0
    assert STATS.batches == 1 and STATS.groups_done == 6
    assert STATS.prefix_tokens_planned == STATS.prefix_tokens_computed == 6 * 48
    # the leader of each group prefilled the whole prompt, every other member only its suffix
    per_group = {}
    for rid in sched.admitted_order:
        per_group.setdefault(rid.split("m")[0], []).append(rid)
    assert len(per_group) == 6
    for rids in per_group.values():
        assert sched.extend_by_rid[rids[0]] == 56
        assert all(sched.extend_by_rid[r] == 8 for r in rids[1:])
    assert sched.max_pinned > 0
    # every member decodes as a row sharing its group's prefix, the leader (which computed
    # it, so had no cached prefix at admission) through its node's parent
    assert sched.shared_rows == sched.decode_rows > 0
    sched.assert_drained()


@pytest.mark.parametrize("page_size", [1, 16])
def test_second_turns_decode_as_rows_sharing_their_groups_prefix(page_size):
    """A frontend program's second `gen`: each request continues one of the first batch
    (its prompt, its answer, a new question), so it matches its own first turn's path, a node
    no other request holds. Its decode rows still share the group's prefix node, an ancestor
    (row facts), and the slot check holds on the real tree (`_check_row_prefixes`)."""
    sched = MiniScheduler(page_size=page_size, pool_tokens=2048)
    first = batch_of_groups(range(4), 4, suffix_len=24)
    sched.submit(first)
    sched.run()
    assert_all_finished_once(sched, first)
    sched.shared_rows = sched.decode_rows = 0
    second = [
        make_req(f"{r.rid}t2", list(r.origin_input_ids) + list(r.output_ids) + [900_000 + i, 900_001 + i], 4)
        for i, r in enumerate(first)
    ]
    sched.submit(second)
    sched.run()
    assert all(r.finished() for r in second)
    own = {getattr(r, row_prefixes._ATTR)[1] for r in second}
    assert len(own) == len(second), "each second turn was admitted from a node of its own"
    assert sched.shared_rows == sched.decode_rows > 0
    sched.assert_drained()


@pytest.mark.parametrize("page_size, pool_tokens", [(1, 600), (16, 640)])
def test_batch_far_larger_than_the_pool_runs_in_waves_without_retraction(page_size, pool_tokens):
    sched = MiniScheduler(page_size=page_size, pool_tokens=pool_tokens)
    sched.adapter.may_mix = True
    reqs = batch_of_groups(range(20), 5, seed=1)
    sched.submit(reqs)
    sched.run()
    # mixed rounds while groups wait for memory; once the last group is in, plain ones while
    # more than a step's work waits (the known tail carries the decodes)
    assert sched.mix_asks[0] and not all(sched.mix_asks)

    assert_all_finished_once(sched, reqs)
    assert sched.extend_tokens == planned_prefill(20, 5)
    assert STATS.prefix_recomputations == 0 and STATS.retractions == 0
    assert STATS.groups_done == 20
    # waves: never all 20 prefixes pinned at once (20 * 48 > 600)
    assert sched.max_pinned < 20 * 48
    sched.assert_drained()
    off = MiniScheduler(page_size=page_size, pool_tokens=pool_tokens)
    off.submit(batch_of_groups(range(20), 5, seed=1))
    off.run()
    assert off.mix_asks and not any(off.mix_asks), "never asked where mixed steps are off"


def _group(sched: MiniScheduler, g: int):
    """The live session group of token-group g (found through any of its known members)."""
    session = sched.adapter.session
    for rid in list(session._members):
        if rid.startswith(f"g{g}m"):
            return session.group_of(rid)
    return None


def test_trickle_arrivals_join_live_groups_and_new_ones_form():
    sched = MiniScheduler(page_size=1, pool_tokens=2048)
    first = batch_of_groups(range(3), 5, seed=2)
    sched.submit(first)
    events: dict[str, int] = {}
    late: dict[str, list[Req]] = {}
    gids: dict[int, int] = {}

    def arrivals(s: MiniScheduler) -> None:
        for g in range(3):
            grp = _group(s, g)
            if grp is not None:
                gids.setdefault(g, grp.gid)
        g1 = _group(s, 1)
        if "prefilling" not in events and g1 is not None and g1.state is GroupState.PREFILLING:
            events["prefilling"] = s.steps  # joins while the leader computes the prefix
            late["prefilling"] = [member(1, 5), member(1, 6)]
            s.submit(late["prefilling"])
        g0 = _group(s, 0)
        if "cached" not in events and g0 is not None and g0.state is GroupState.CACHED and g0.running:
            events["cached"] = s.steps  # joins while members of the group run
            late["cached"] = [member(0, 5), member(0, 6), member(0, 7)]
            s.submit(late["cached"])
        if s.steps == 4:  # a new group and a lone request, in one message
            late["new"] = [member(7, m) for m in range(4)] + [make_req("lone", list(range(1, 30)), 4)]
            s.submit(late["new"])
        if "after" not in events and "cached" in events and _group(s, 2) is None and s.steps > 4:
            events["after"] = s.steps  # group 2 is done: two more of its prompts form a new group
            late["after"] = [member(2, 7), member(2, 8)]
            s.submit(late["after"])

    joined: dict[str, int] = {}

    def check_join(s: MiniScheduler) -> None:
        arrivals(s)
        for key in ("prefilling", "cached"):
            for r in late.get(key, []):
                grp = s.adapter.session.group_of(r.rid)
                if grp is not None and r.rid not in joined:
                    joined[r.rid] = grp.gid

    sched.on_step = check_join
    sched.run()

    assert set(events) == {"prefilling", "cached", "after"}
    assert late["after"][0].rid not in joined and gids[2] not in {
        g.gid for g in sched.adapter.session.groups()}, "group 2 was done before its second life"
    everyone = first + [r for rs in late.values() for r in rs]
    assert_all_finished_once(sched, everyone)
    # the joiners went into their live group (no regrouping), and only computed their suffix
    assert joined == {r.rid: gids[int(r.rid[1])] for key in ("prefilling", "cached") for r in late[key]}
    for key in ("prefilling", "cached", "after"):
        for r in late[key]:
            assert sched.extend_by_rid[r.rid] == 8, (key, r.rid, sched.extend_by_rid[r.rid])
    assert STATS.prefix_recomputations == 0
    # 4 prefixes computed (groups 0, 1, 2, 7); group 2's second life found its prefix cached
    expected = 4 * 48 + 8 * (15 + 2 + 3 + 4 + 2) + 29
    assert sched.extend_tokens == expected
    assert STATS.groups_done == 5
    sched.assert_drained()


def test_aborts_of_waiting_and_running_members_leak_nothing():
    sched = MiniScheduler(page_size=1, pool_tokens=700)
    reqs = batch_of_groups(range(8), 5, seed=3)
    by_rid = {r.rid: r for r in reqs}
    # arrives already aborted (what handle_generate_request does with an invalid request)
    invalid = member(0, 9)
    invalid.set_finish_with_abort("Input length exceeds the maximum")
    reqs.append(invalid)
    sched.submit(reqs)
    done: dict[str, str] = {}

    def aborts(s: MiniScheduler) -> None:
        session = s.adapter.session
        # a pending member of a group whose prefix is being computed / is pinned
        g0 = _group(s, 0)
        if "waiting-member" not in done and g0 is not None and g0.state is not GroupState.WAITING and g0.pending:
            rid = g0.pending[-1]
            done["waiting-member"] = rid
            assert s.abort(rid) == "waiting"
        # every pending member of a group, while its leader runs
        g1 = _group(s, 1)
        if "waiting-group-rest" not in done and g1 is not None and g1.state is not GroupState.WAITING:
            done["waiting-group-rest"] = ",".join(g1.pending)
            for rid in list(g1.pending):
                assert s.abort(rid) == "waiting"
        # the would-be leader of a group nothing of which was admitted yet
        g7 = _group(s, 7)
        if "waiting-leader" not in done and g7 is not None and g7.state is GroupState.WAITING:
            rid = g7.pending[0]
            done["waiting-leader"] = rid
            assert s.abort(rid) == "waiting"
        # a running member, and a running leader, of pinned groups
        g2 = _group(s, 2)
        if "running-member" not in done and g2 is not None and g2.state is GroupState.CACHED:
            decoding = [r for r in s.running_batch.reqs if r.rid in g2.running and r.rid != g2.leader]
            if decoding:
                done["running-member"] = decoding[0].rid
                assert s.abort(decoding[0].rid) == "running"
        g3 = _group(s, 3)
        if "running-leader" not in done and g3 is not None and g3.state is GroupState.CACHED and g3.pending:
            leader = [r for r in s.running_batch.reqs if r.rid == g3.leader]
            if leader:
                done["running-leader"] = g3.leader
                assert s.abort(g3.leader) == "running"

    sched.on_step = aborts
    sched.run()

    assert set(done) == {"waiting-member", "waiting-group-rest", "waiting-leader", "running-member",
                         "running-leader"}, done
    assert done["waiting-group-rest"], "group 1 had pending members when its leader ran"
    waiting_aborted = {done["waiting-member"], done["waiting-leader"], *done["waiting-group-rest"].split(",")}
    running_aborted = {done["running-member"], done["running-leader"], invalid.rid}
    assert not waiting_aborted & set(sched.finished)
    assert_all_finished_once(sched, [r for r in reqs if r.rid not in waiting_aborted])
    for rid in running_aborted:
        assert isinstance(by_rid.get(rid, invalid).finished_reason, FINISH_ABORT), rid
    assert STATS.prefix_recomputations == 0
    sched.assert_drained()


def test_leader_that_finishes_in_its_prefill_still_gets_its_prefix_pinned():
    """max_new_tokens=1: the leader's KV goes to the tree (cache_finished_req) in the step that
    prefills it, before any pin; the next round pins it from the evictable tree."""
    sched = MiniScheduler(page_size=1, pool_tokens=400)
    reqs = batch_of_groups(range(4), 5, seed=4, max_new=1)
    sched.submit(reqs)
    sched.run()
    assert_all_finished_once(sched, reqs)
    assert sched.extend_tokens == planned_prefill(4, 5)
    assert STATS.prefix_recomputations == 0 and STATS.groups_done == 4
    sched.assert_drained()


def test_prefix_over_half_the_pool_runs_unpinned():
    sched = MiniScheduler(page_size=1, pool_tokens=600)
    big = [member(0, m, prefix_len=320) for m in range(3)]
    small = batch_of_groups(range(1, 3), 4, seed=5)
    sched.submit(big + small)
    seen_big_group = []

    def watch(s: MiniScheduler) -> None:
        for r in big:
            grp = s.adapter.session.group_of(r.rid)
            if grp is not None:
                seen_big_group.append((grp.gid, grp.is_shared))

    sched.on_step = watch
    sched.run()
    assert_all_finished_once(sched, big + small)
    assert seen_big_group and not any(shared for _, shared in seen_big_group)
    assert len({gid for gid, _ in seen_big_group}) == 3, "each runs as its own unshared request"
    assert sched.max_pinned <= 2 * 48, "the big prefix was never pinned"
    assert STATS.prefix_tokens_planned == 2 * 48
    assert STATS.prefix_recomputations == 0
    sched.assert_drained()


def test_gauges_read_zero_once_the_batch_is_done():
    sched = MiniScheduler(page_size=1, pool_tokens=2048)
    reqs = batch_of_groups(range(6), 5)
    sched.submit(reqs)
    sched.run()
    assert sched.tree_cache.live_pins() == 0
    assert STATS.groups_live == 0 and STATS.pinned_tokens == 0


def test_retracted_member_of_a_pinned_group_comes_back_and_matches_the_prefix():
    sched = MiniScheduler(page_size=1, pool_tokens=2048)
    sched.retract_at_decode = {1, 3}
    reqs = batch_of_groups(range(3), 5, seed=6, max_new=6)
    sched.submit(reqs)
    sched.run()
    assert len(sched.retracted) == 2 and STATS.retractions == 2
    assert_all_finished_once(sched, reqs)
    assert STATS.prefix_recomputations == 0
    # a retracted request recomputes its own tokens and decoded ones, never the group prefix
    for rid in sched.retracted:
        assert sched.extend_by_rid[rid] > 8
    leaders = {sched.admitted_order[[r.split("m")[0] for r in sched.admitted_order].index(f"g{g}")]
               for g in range(3)}
    for req in reqs:
        own = 56 if req.rid in leaders else 8
        if req.rid in sched.retracted:  # re-prefills only what it had decoded: its prompt is cached
            assert own < sched.extend_by_rid[req.rid] <= own + 2 * 6
        else:
            assert sched.extend_by_rid[req.rid] == own
    sched.assert_drained()


def test_retracted_unshared_request_comes_back():
    sched = MiniScheduler(page_size=1, pool_tokens=2048)
    sched.retract_at_decode = {1}
    lone = make_req("lone", list(range(1, 101)), 4)  # longest prompt: retracted first
    reqs = batch_of_groups(range(1), 3, seed=7) + [lone]
    sched.submit(reqs)
    sched.run(max_steps=200)
    assert sched.retracted == ["lone"]
    assert_all_finished_once(sched, reqs)
    sched.assert_drained()


def test_chunked_leader_aborted_mid_prefill_hands_the_prefix_to_a_new_leader():
    """abort_request on the chunked request (process_pending_chunked_abort): its partial prefix
    is released without insert, the pin cannot be taken, the group elects a new leader."""
    sched = MiniScheduler(page_size=1, pool_tokens=2048)
    reqs = [member(0, m, prefix_len=100) for m in range(4)]
    sched.submit(reqs)
    aborted = []

    def abort_chunked_leader(s: MiniScheduler) -> None:
        grp = _group(s, 0)
        c = s.chunked_req
        if not aborted and c is not None and grp is not None and c.rid == grp.leader and c.extend_range.end == 64:
            aborted.append(c.rid)
            assert s.abort(c.rid) == "chunked"

    sched.on_step = abort_chunked_leader
    sched.run()
    assert len(aborted) == 1
    assert_all_finished_once(sched, reqs)
    assert isinstance(next(r for r in reqs if r.rid == aborted[0]).finished_reason, FINISH_ABORT)
    assert sched.extend_tokens == 64 + 108 + 2 * 8  # the lost chunk, the new leader, two members
    assert STATS.prefix_recomputations == 0
    assert STATS.prefix_tokens_computed == 100 + 100  # computed twice: the first leader was lost
    sched.assert_drained()


def test_page_rounded_decode_needs_are_reserved():
    """Four members of a group sit on page boundaries (prompt 48 = 3 pages), one decode token
    left each: 4 tokens by count, 4 pages (64 slots) in fact. A request arriving then must not
    take the slots those pages need."""
    sched = MiniScheduler(page_size=16, pool_tokens=256)
    group = [member(0, m, prefix_len=32, suffix_len=16, max_new=2) for m in range(4)]
    sched.submit(group)
    late = make_req("late", [90_000 + i for i in range(138)], 2)  # cost 138 + 2 + 16 = 156

    def arrive(s: MiniScheduler) -> None:
        if s.steps == 3:
            assert all(len(r.output_ids) == 1 for r in group)  # all four prefilled, none decoded
            s.submit([late])

    sched.on_step = arrive
    sched.run()
    assert_all_finished_once(sched, group + [late])
    sched.assert_drained()


def test_decode_budget_reserves_known_budgets_whole_and_caps_early_stoppers():
    from types import SimpleNamespace

    from sglang_batchllm.runtime.scheduler import EOS_RESERVE_TOKENS, decode_budget

    def req(max_new, ignore_eos):
        return SimpleNamespace(sampling_params=SimpleNamespace(max_new_tokens=max_new, ignore_eos=ignore_eos))

    assert decode_budget(req(3000, True), 4096) == 3000, "a batch job's budget is reserved whole"
    assert decode_budget(req(9000, True), 4096) == 4096, "clipped like SGLang's own estimate"
    assert decode_budget(req(100, False), 4096) == 100
    assert decode_budget(req(None, False), 4096) == EOS_RESERVE_TOKENS, "chat with max_tokens unset"


@pytest.mark.parametrize("mix", [True, False])
def test_the_patch_sets_mixing_and_its_budgets_for_one_round_only(monkeypatch, mix):
    from patches import scheduler as patch

    class Adapter:  # asks for the round the test wants
        def prefill_round(self, scheduler, running_batch, run):
            return run(mix)

    sched = SimpleNamespace(is_mixed_chunk=False, chunked_prefill_size=8192, max_prefill_tokens=16384)
    running = SimpleNamespace(reqs=[object()] * 5)
    seen = []

    def original(self, prefill_delayer_single_pass, running_batch):  # SGLang 0.5.17's signature
        seen.append((self.is_mixed_chunk, self.chunked_prefill_size, self.max_prefill_tokens))
        return "batch", running_batch

    monkeypatch.setattr(patch, "_adapter", Adapter())
    assert patch._around_prefill_raw(original, sched, None, running) == ("batch", running)
    # mixed: the 5 decode rows go on top of the prefill budgets, not out of them
    assert seen == [(True, 8197, 16389)] if mix else [(False, 8192, 16384)]
    assert (sched.is_mixed_chunk, sched.chunked_prefill_size, sched.max_prefill_tokens) == (False, 8192, 16384)


def test_retractions_are_counted_without_an_adapter_and_reported_in_the_internal_state(monkeypatch):
    """The batch command's summary reads the scheduler's retractions from SGLang's internal
    state; they are counted even when BatchLLM's scheduling never ran in the process."""
    from patches import scheduler as patch
    from sglang.srt.managers.io_struct import GetInternalStateReqOutput

    from sglang_batchllm.runtime.stats import STATS

    monkeypatch.setattr(patch, "_adapter", None)
    monkeypatch.setattr(STATS, "retractions", 0)
    retracted = (["r1", "r2", "r3"], 0.5, [])
    assert patch._after_retract_decode(retracted, None) is retracted
    assert patch._after_retract_decode(([], 0.5, []), None) == ([], 0.5, [])
    assert STATS.retractions == 3
    out = GetInternalStateReqOutput(internal_state={"last_gen_throughput": 1.0})  # SGLang's own reply type
    assert patch._after_get_internal_state(out, None) is out
    assert out.internal_state["batchllm"]["retractions"] == 3
    assert out.internal_state["last_gen_throughput"] == 1.0


def test_both_reporting_hooks_are_installed_with_scheduling_off(monkeypatch):
    from patches import scheduler as patch
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_batchllm.config import BatchLLMConfig

    registered = []
    monkeypatch.setattr(HookRegistry, "register", classmethod(lambda cls, target, hook, kind: registered.append(target)))
    patch._install(BatchLLMConfig(enable=True, schedule=False))
    assert registered == ["sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode",
                          "sglang.srt.managers.scheduler.Scheduler.get_internal_state"]
    assert set(registered) <= set(patch.PATCH.targets)
