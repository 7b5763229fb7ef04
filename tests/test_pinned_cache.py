"""PinnedRadixCache on SGLang's real pools and allocators, on CPU tensors.

Sequences enter the tree as the scheduler puts them there: match the cached prefix, allocate
KV slots for the rest from the allocator, insert, free the duplicates. The random test runs
whole request lifecycles (lock the matched prefix while running, `cache_finished_req` at the
end) between pins, unpins, evictions and matches, and checks the invariants after every step.
The one substitute: `cache_finished_req` gets a SimpleNamespace carrying the `Req` fields it
reads (ids as `array('q')`, as in `Req`), instead of a real `Req`.
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache import registry
from sglang_batchllm.runtime.pinned_cache import (
    PinnedRadixCache,
    UnsupportedCacheConfig,
    create_pinned_radix_cache,
    register,
)

HUGE = 1 << 30


def make_cache(page_size: int, size: int = 512, max_context_len: int = 256) -> PinnedRadixCache:
    kv = MHATokenToKVPool(
        size, page_size, torch.float32, head_num=1, head_dim=4, layer_num=1,
        device="cpu", enable_memory_saver=False,
    )
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", kv, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(size, page_size, torch.float32, "cpu", kv, need_sort=False)
    req_pool = ReqToTokenPool(size=8, max_context_len=max_context_len, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(
        disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
        page_size=page_size, eviction_policy="lru",
    )
    return PinnedRadixCache(params)


def key(tokens) -> RadixKey:
    return RadixKey(array("q", tokens))


def insert_sequence(cache: PinnedRadixCache, tokens: list[int]) -> None:
    """A finished request of page-aligned length: reuse the cached prefix, allocate the rest."""
    assert len(tokens) % cache.page_size == 0
    prefix = cache.match_prefix(MatchPrefixParams(key=key(tokens))).device_indices
    new = cache.token_to_kv_pool_allocator.alloc(len(tokens) - len(prefix))
    assert new is not None, "test pool too small"
    result = cache.insert(InsertParams(key=key(tokens), value=torch.cat([prefix, new])))
    cache.token_to_kv_pool_allocator.free(torch.cat([prefix, new])[len(prefix) : result.prefix_len])


def all_free(cache: PinnedRadixCache) -> bool:
    allocator = cache.token_to_kv_pool_allocator
    return allocator.available_size() == allocator.size


def free_pages(cache: PinnedRadixCache) -> set[int]:
    allocator = cache.token_to_kv_pool_allocator
    return set(torch.cat([allocator.free_pages, allocator.release_pages]).tolist())


@pytest.mark.parametrize("ps", [1, 16])
def test_pinned_prefix_survives_eviction_and_unpin_frees_it(ps):
    cache = make_cache(ps)
    shared, other = list(range(1, 2 * ps + 1)), list(range(900, 900 + 2 * ps))
    for tail in ([7] * ps, [8] * ps, [9] * 2 * ps):
        insert_sequence(cache, shared + tail)
    insert_sequence(cache, other)
    cache.check_invariants(in_use_tokens=0)

    pin = cache.pin(shared + [7] * ps, len(shared))
    assert pin is not None and pin.length == 2 * ps
    pinned_kv = cache.kv_indices(pin).clone()
    cache.check_invariants(in_use_tokens=0)
    assert cache.protected_size() == cache.pinned_tokens() == 2 * ps

    cache.evict(EvictParams(num_tokens=HUGE))
    cache.check_invariants(in_use_tokens=0)
    assert cache.evictable_size() == 0 and cache.protected_size() == 2 * ps
    assert torch.equal(cache.kv_indices(pin), pinned_kv)
    assert not set((pinned_kv // ps).tolist()) & free_pages(cache)
    match = cache.match_prefix(MatchPrefixParams(key=key(shared + [7] * ps)))
    assert torch.equal(match.device_indices, pinned_kv)

    cache.unpin(pin)
    cache.check_invariants(in_use_tokens=0)
    assert cache.evictable_size() == 2 * ps and cache.protected_size() == 0
    cache.evict(EvictParams(num_tokens=HUGE))
    cache.check_invariants(in_use_tokens=0)
    assert all_free(cache) and cache.live_pins() == 0


@pytest.mark.parametrize("ps", [1, 16])
def test_pin_of_uncached_prefix_returns_none_and_locks_nothing(ps):
    cache = make_cache(ps)
    insert_sequence(cache, list(range(1, 3 * ps + 1)))
    before = (cache.evictable_size(), cache.protected_size(), len(cache.root_node.children))
    assert cache.pin(list(range(1, 4 * ps + 1)), 4 * ps) is None  # longer than cached
    assert cache.pin([5] * ps + list(range(ps)), 2 * ps) is None  # diverges at token 0
    assert cache.pin(list(range(1, 2 * ps)) + [0] * ps, 2 * ps) is None  # diverges mid-way
    assert cache.pin(list(range(1, 3 * ps + 1)), 3 * ps, extra_key="lora") is None
    if ps > 1:
        assert cache.pin(list(range(1, 3 * ps + 1)), ps - 1) is None  # rounds down to 0
    (child,) = cache.root_node.children.values()
    assert len(child.key) == 3 * ps, "a miss must not split a node"
    assert (cache.evictable_size(), cache.protected_size(), len(cache.root_node.children)) == before
    assert cache.live_pins() == 0
    cache.check_invariants(in_use_tokens=0)
    with pytest.raises(ValueError, match="positive"):
        cache.pin([1, 2, 3], 0)
    with pytest.raises(ValueError, match="exceeds"):
        cache.pin([1, 2, 3], 4)


@pytest.mark.parametrize("ps", [1, 16])
def test_pin_inside_a_node_splits_it_exactly_there(ps):
    cache = make_cache(ps)
    tokens = list(range(1, 4 * ps + 1))
    insert_sequence(cache, tokens)
    pin = cache.pin(tokens, 2 * ps + (ps - 1 if ps > 1 else 0))  # rounded down to 2 pages
    assert pin.length == 2 * ps
    (head,) = cache.root_node.children.values()
    assert pin.node is head and len(head.key) == 2 * ps
    (tail,) = head.children.values()
    assert len(tail.key) == 2 * ps and tail.lock_ref == 0
    assert cache.protected_size() == 2 * ps and cache.evictable_size() == 2 * ps
    cache.check_invariants(in_use_tokens=0)

    # A later, shorter match splits the pinned node again: the pin keeps the tail half,
    # which still ends at the pinned length, and the head half inherits the lock.
    cache.match_prefix(MatchPrefixParams(key=key(tokens[:ps] + [0] * ps)))
    new_head = cache.root_node.children[key(tokens).child_key(ps)]
    assert new_head is not head and pin.node is head and head.parent is new_head
    assert len(new_head.key) == ps and new_head.lock_ref == 1
    cache.check_invariants(in_use_tokens=0)
    assert cache.pinned_tokens() == 2 * ps
    cache.unpin(pin)
    cache.evict(EvictParams(num_tokens=HUGE))
    cache.check_invariants(in_use_tokens=0)
    assert all_free(cache)


@pytest.mark.parametrize("ps", [1, 16])
def test_nested_and_repeated_pins_count_each_node_once(ps):
    cache = make_cache(ps)
    tokens = list(range(1, 4 * ps + 1))
    insert_sequence(cache, tokens)
    outer = cache.pin(tokens, 3 * ps)
    inner = cache.pin(tokens, ps)
    again = cache.pin(tokens, 3 * ps)
    assert again.node is outer.node and again != outer
    assert cache.live_pins() == 3 and cache.pinned_tokens() == 3 * ps
    assert outer.node.lock_ref == 2 and inner.node.lock_ref == 3
    cache.check_invariants(in_use_tokens=0)

    cache.unpin(outer)
    cache.check_invariants(in_use_tokens=0)
    assert cache.pinned_tokens() == 3 * ps, "the second pin on the node still holds it"
    with pytest.raises(ValueError, match="not live"):
        cache.unpin(outer)
    cache.unpin(again)
    cache.evict(EvictParams(num_tokens=HUGE))
    cache.check_invariants(in_use_tokens=0)
    assert cache.pinned_tokens() == cache.protected_size() == ps
    cache.unpin(inner)
    cache.evict(EvictParams(num_tokens=HUGE))
    assert all_free(cache)


def test_unpin_rejects_foreign_pins_and_reset_drops_pins():
    a, b = make_cache(1), make_cache(1)
    for cache in (a, b):
        insert_sequence(cache, [1, 2, 3, 4])
    pin_a = a.pin([1, 2, 3, 4], 2)
    with pytest.raises(ValueError, match="another cache"):
        b.unpin(pin_a)
    a.reset()
    assert a.live_pins() == 0 and a.pinned_tokens() == 0 and a.protected_size() == 0
    with pytest.raises(ValueError, match="reset"):
        a.unpin(pin_a)
    a.check_invariants()


def test_check_invariants_reports_a_leak():
    cache = make_cache(1)
    insert_sequence(cache, [1, 2, 3, 4])
    cache.token_to_kv_pool_allocator.alloc(5)  # held by "someone" the check is not told about
    with pytest.raises(AssertionError, match="do not add up"):
        cache.check_invariants(in_use_tokens=0)
    cache.check_invariants(in_use_tokens=5)
    cache.evictable_size_ += 1
    with pytest.raises(AssertionError, match="counters"):
        cache.check_invariants()


def test_eagle_bigram_keys_pin_in_kv_slots():
    cache = make_cache(1)
    cache.is_eagle = True
    tokens = [1, 2, 3, 4, 5]  # 5 tokens -> 4 bigram keys / KV slots
    indices = cache.token_to_kv_pool_allocator.alloc(4)
    cache.insert(InsertParams(key=key(tokens), value=indices))
    assert cache.pin(tokens[:4], 4) is None, "4 slots need 5 tokens under EAGLE"
    pin = cache.pin(tokens, 4)
    assert torch.equal(cache.kv_indices(pin), indices)
    cache.check_invariants(in_use_tokens=0)


# ---- random operations -------------------------------------------------------------------


class PinnedCacheMachine(RuleBasedStateMachine):
    """Requests, pins, evictions and matches in any order. A running request locks its
    matched prefix and holds its new KV slots (`in_use`); finishing goes through SGLang's
    own `cache_finished_req`."""

    page_size = 1

    def __init__(self):
        super().__init__()
        self.cache = make_cache(self.page_size, size=32 * self.page_size, max_context_len=8 * self.page_size)
        self.seen: list[list[int]] = []
        self.running: list[tuple[SimpleNamespace, int]] = []
        self.pins: list[tuple[object, torch.Tensor]] = []
        self.in_use = 0

    def _tokens(self, data):
        ps = self.page_size
        pages = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=6))
        tokens = [t for p in pages for t in [p] * ps]  # page-structured, lots of sharing
        if ps > 1 and data.draw(st.booleans()):
            tokens += data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=ps - 1))
        if self.seen and data.draw(st.booleans()):
            base = data.draw(st.sampled_from(self.seen))
            tokens = base[: data.draw(st.integers(0, len(base)))] + tokens
        return tokens[: 6 * ps + ps // 2]

    @rule(data=st.data())
    def start_request(self, data):
        cache, ps = self.cache, self.page_size
        if len(self.running) >= 4:
            return
        tokens = self._tokens(data)
        match = cache.match_prefix(MatchPrefixParams(key=key(tokens).page_aligned(ps)))
        cache.inc_lock_ref(match.last_device_node)
        need = -(-len(tokens) // ps) * ps - len(match.device_indices)
        allocator = cache.token_to_kv_pool_allocator
        if allocator.available_size() < need:
            cache.evict(EvictParams(num_tokens=need - allocator.available_size()))
        new = allocator.alloc(need) if allocator.available_size() >= need else None
        if new is None:
            cache.dec_lock_ref(match.last_device_node)
            return
        req = SimpleNamespace(
            origin_input_ids=array("q", tokens), output_ids=array("q"), req_pool_idx=None, extra_key=None,
            cache_protected_len=len(match.device_indices), last_node=match.last_device_node, priority=0,
        )
        cache.req_to_token_pool.alloc([req])
        row = torch.cat([match.device_indices, new])
        cache.req_to_token_pool.write((req.req_pool_idx, slice(0, len(row))), row.to(torch.int32))
        self.running.append((req, need))
        self.in_use += need

    @rule(data=st.data())
    def finish_request(self, data):
        if not self.running:
            return
        req, need = self.running.pop(data.draw(st.integers(0, len(self.running) - 1)))
        self.cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
        self.cache.req_to_token_pool.free(req)
        self.in_use -= need
        self.seen.append(list(req.origin_input_ids))

    @rule(data=st.data())
    def pin(self, data):
        if not self.seen:
            return
        cache = self.cache
        tokens = data.draw(st.sampled_from(self.seen))
        length = data.draw(st.integers(1, len(tokens)))
        before = (cache.evictable_size(), cache.protected_size())
        pin = cache.pin(tokens, length)
        aligned = length // self.page_size * self.page_size
        if pin is None:
            assert (cache.evictable_size(), cache.protected_size()) == before
            if aligned:
                got = cache.match_prefix(MatchPrefixParams(key=key(tokens[:aligned]))).device_indices
                assert len(got) < aligned, "pin refused a fully cached prefix"
        else:
            assert pin.length == aligned
            self.pins.append((pin, cache.kv_indices(pin).clone()))

    @rule(data=st.data())
    def unpin(self, data):
        if not self.pins:
            return
        pin, _ = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        self.cache.unpin(pin)

    @rule(num_tokens=st.sampled_from([1, 7, 40, HUGE]))
    def evict(self, num_tokens):
        self.cache.evict(EvictParams(num_tokens=num_tokens))

    @rule(data=st.data())
    def match(self, data):
        if not self.seen:
            return
        tokens = data.draw(st.sampled_from(self.seen))
        self.cache.match_prefix(MatchPrefixParams(key=key(tokens[: data.draw(st.integers(0, len(tokens)))])))

    @invariant()
    def consistent(self):
        cache = self.cache
        cache.check_invariants(in_use_tokens=self.in_use)
        assert cache.live_pins() == len(self.pins)
        free = free_pages(cache)
        for pin, kv in self.pins:
            assert torch.equal(cache.kv_indices(pin), kv), "pinned KV slots changed"
            assert not set((kv // self.page_size).tolist()) & free, "pinned KV slots were freed"

    def teardown(self):
        for pin, _ in self.pins:
            self.cache.unpin(pin)
        while self.running:
            self.finish_request_now(*self.running.pop())
        self.cache.evict(EvictParams(num_tokens=HUGE))
        self.cache.check_invariants(in_use_tokens=0)
        assert self.cache.evictable_size() == self.cache.protected_size() == 0
        assert all_free(self.cache), "KV slots leaked"

    def finish_request_now(self, req, need):
        self.cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
        self.cache.req_to_token_pool.free(req)
        self.in_use -= need


_machine_settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class PagedPinnedCacheMachine(PinnedCacheMachine):
    page_size = 16


TestPinnedCacheRandomPage1 = PinnedCacheMachine.TestCase
TestPinnedCacheRandomPage1.settings = _machine_settings
TestPinnedCacheRandomPage16 = PagedPinnedCacheMachine.TestCase
TestPinnedCacheRandomPage16.settings = _machine_settings


# ---- registration ------------------------------------------------------------------------


def _ctx(**overrides):
    cache = make_cache(1)
    fields = dict(
        server_args=SimpleNamespace(
            radix_cache_backend="batchllm", enable_lmcache=False, enable_flexkv=False,
            enable_session_radix_cache=False, enable_streaming_session=False,
        ),
        params=CacheInitParams(
            disable=False, req_to_token_pool=cache.req_to_token_pool,
            token_to_kv_pool_allocator=cache.token_to_kv_pool_allocator, page_size=1,
        ),
        is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_register_is_idempotent_and_create_tree_cache_builds_it():
    register()
    register()
    assert registry.get_radix_cache_factory("batchllm") is create_pinned_radix_cache
    assert isinstance(registry.create_tree_cache(_ctx()), PinnedRadixCache)


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(disable_radix_cache=True), "--disable-radix-cache"),
        (dict(enable_hierarchical_cache=True), "--enable-hierarchical-cache"),
        (dict(is_hybrid_swa=True), "sliding-window"),
        (dict(is_hybrid_ssm=True), "SSM"),
        (dict(server_args=SimpleNamespace(enable_lmcache=True, enable_flexkv=False)), "--enable-lmcache"),
    ],
)
def test_factory_refuses_configs_without_a_plain_radix_cache(overrides, flag):
    with pytest.raises(UnsupportedCacheConfig, match=flag):
        create_pinned_radix_cache(_ctx(**overrides))


@pytest.mark.parametrize("env", ["SGLANG_EXPERIMENTAL_CPP_RADIX_TREE", "SGLANG_ENABLE_UNIFIED_RADIX_TREE"])
def test_factory_refuses_radix_tree_envs(monkeypatch, env):
    monkeypatch.setenv(env, "1")
    with pytest.raises(UnsupportedCacheConfig, match=env):
        create_pinned_radix_cache(_ctx())
