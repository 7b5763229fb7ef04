"""The LRU prefix-cache simulation behind `--kv-tokens`."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_batchllm.planner import PlanRequest
from sglang_batchllm.planner.lru import LRUPrefixCache, simulate_lru

prompts = st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=25)


def requests(lists):
    return [PlanRequest(f"r{i}", ids, 1) for i, ids in enumerate(lists)]


def _lcp(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(max_examples=80, deadline=None)
@given(prompts, st.integers(1, 3))
def test_unbounded_cache_reuses_the_longest_earlier_prefix(lists, page):
    computed, earlier = 0, []
    for ids in lists:
        cached = max((_lcp(ids[:-1], e[: len(e) - len(e) % page]) for e in earlier), default=0)
        computed += len(ids) - (cached - cached % page)
        earlier.append(ids)
    assert simulate_lru(requests(lists), 10**9, page).computed_tokens == computed


@settings(max_examples=80, deadline=None)
@given(prompts, st.integers(0, 40), st.integers(1, 3))
def test_cache_never_holds_more_than_its_capacity(lists, capacity, page):
    cache = LRUPrefixCache(capacity, page)
    for req in requests(lists):
        computed = cache.run(req)
        assert 1 <= computed <= req.prompt_len
        assert cache.size <= capacity
        held, stack = 0, [cache.root]
        while stack:
            node = stack.pop()
            held += node.end - node.start
            stack.extend(node.children.values())
        assert held == cache.size


def test_no_capacity_recomputes_everything():
    reqs = requests([[1, 2, 3, 4]] * 5)
    assert simulate_lru(reqs, 0).computed_tokens == 20


def test_interleaved_groups_thrash_a_small_cache_and_grouped_order_does_not():
    a, b = list(range(100, 150)), list(range(200, 250))
    interleaved = [a + [i] if i % 2 == 0 else b + [i] for i in range(8)]
    grouped = sorted(interleaved, key=lambda ids: ids[0])
    fits_one = 60
    assert simulate_lru(requests(interleaved), fits_one).computed_tokens == 8 * 51
    assert simulate_lru(requests(grouped), fits_one).computed_tokens == 2 * 51 + 6 * 1


def test_requests_in_one_prefill_batch_cannot_reuse_each_other():
    shared = list(range(100, 150))
    reqs = requests([shared + [i] for i in range(4)])
    assert simulate_lru(reqs, 10**6, prefill_tokens=1000).computed_tokens == 4 * 51
    assert simulate_lru(reqs, 10**6, prefill_tokens=51).computed_tokens == 51 + 3
    assert simulate_lru(reqs, 10**6).computed_tokens == 51 + 3


@settings(max_examples=60, deadline=None)
@given(prompts, st.integers(1, 3))
def test_batches_of_one_token_are_one_request_at_a_time(lists, page):
    reqs = requests(lists)
    batched, alone = simulate_lru(reqs, 30, page, prefill_tokens=1), simulate_lru(reqs, 30, page)
    assert (batched.computed_tokens, batched.evicted_tokens) == (alone.computed_tokens, alone.evicted_tokens)
