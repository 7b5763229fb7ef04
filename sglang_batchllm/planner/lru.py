"""What an LRU prefix cache (SGLang's radix cache) would recompute on a given request order.

A small simulation, to put a plan's saving next to what the engine's cache gets without it:
- requests run one at a time in the given order, or, with `prefill_tokens = B`, in prefill
  batches of up to B computed tokens (SGLang's chunked-prefill budget): requests of one batch
  see the cache as it was before the batch, so same-prefix requests in it each recompute the
  prefix, as in the engine. One at a time is the optimistic case for the cache;
- a request reuses its longest cached prefix, at most `len - 1` tokens, cut down to the page
  size, and computes the rest;
- its prompt (whole pages) is then cached; output tokens are not modelled;
- while the cache holds more than `capacity_tokens`, the least recently used leaf node is
  evicted whole, as in SGLang's `RadixCache.evict`.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from .inputs import PlanRequest
from .tokens import common_prefix_len
from .tree import token_at


@dataclass(frozen=True)
class CacheSimResult:
    capacity_tokens: int
    prefill_tokens: int  # prefill batch size simulated (0: one request at a time)
    prompt_tokens: int
    computed_tokens: int  # prefill tokens the engine computes (not served from the cache)
    evicted_tokens: int

    @property
    def saving(self) -> float:
        return 1.0 - self.computed_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class _Node:
    __slots__ = ("parent", "start", "end", "src", "children", "last_access", "alive")

    def __init__(self, parent, start: int, end: int, src: bytes) -> None:
        self.parent = parent
        self.start, self.end, self.src = start, end, src
        self.children: dict[int, _Node] = {}
        self.last_access = 0
        self.alive = True


class LRUPrefixCache:
    """A token-level radix tree of cached prompts with whole-node LRU eviction."""

    def __init__(self, capacity_tokens: int, page_size: int = 1) -> None:
        if capacity_tokens < 0 or page_size < 1:
            raise ValueError("capacity_tokens must be >= 0 and page_size >= 1")
        self.capacity = capacity_tokens
        self.page = page_size
        self.root = _Node(None, 0, 0, b"")
        self.size = 0
        self.evicted = 0
        self._clock = 0
        self._leaves: list[tuple[int, int, _Node]] = []  # (last_access, push count, node); stale ones skipped
        self._pushes = 0

    def run(self, req: PlanRequest) -> int:
        """Serve one request; return how many of its prompt tokens were computed."""
        computed = self.match(req)
        self.insert([req])
        return computed

    def match(self, req: PlanRequest, touch: bool = True) -> int:
        """How many of the request's prompt tokens the cache cannot serve; `touch` marks them used."""
        self._clock += touch
        matched = self._walk(req._packed, req.prompt_len - 1, insert=False, touch=touch)
        return req.prompt_len - (matched - matched % self.page)

    def insert(self, reqs: list[PlanRequest]) -> None:
        """Cache the prompts (whole pages) of requests that ran, then evict down to capacity."""
        self._clock += 1
        for req in reqs:
            self._walk(req._packed, req.prompt_len - req.prompt_len % self.page, insert=True)
        self._evict()

    def _walk(self, src: bytes, length: int, insert: bool, touch: bool = True) -> int:
        node, pos = self.root, 0
        while pos < length:
            tok = token_at(src, pos)
            child = node.children.get(tok)
            if child is None:
                if insert:
                    child = _Node(node, pos, length, src)
                    node.children[tok] = child
                    self.size += length - pos
                    self._touch(child)
                    pos = length
                break
            edge = child.end - child.start
            same = common_prefix_len(child.src, child.start, src, pos, min(edge, length - pos))
            if same < edge:
                if not insert:
                    if touch:
                        self._touch(child)
                    pos += same
                    break
                mid = _Node(node, child.start, child.start + same, child.src)
                mid.children[token_at(child.src, child.start + same)] = child
                child.parent = mid
                child.start += same
                node.children[tok] = mid
                child = mid
            if touch:
                self._touch(child)
            node, pos = child, pos + (child.end - child.start)
        return pos

    def _touch(self, node: _Node) -> None:
        node.last_access = self._clock
        if not node.children:
            self._push(node)

    def _push(self, node: _Node) -> None:
        self._pushes += 1  # unique and deterministic tie-break (id() would differ per process)
        heapq.heappush(self._leaves, (node.last_access, self._pushes, node))

    def _evict(self) -> None:
        while self.size > self.capacity and self._leaves:
            stamp, _, node = heapq.heappop(self._leaves)
            if not node.alive or node.children or stamp != node.last_access:
                continue  # stale entry: the node was touched again, grew children, or is gone
            node.alive = False
            parent = node.parent
            del parent.children[token_at(node.src, node.start)]
            freed = node.end - node.start
            self.size -= freed
            self.evicted += freed
            if parent is not self.root and not parent.children:
                self._push(parent)


def simulate_lru(
    requests: Iterable[PlanRequest], capacity_tokens: int, page_size: int = 1, prefill_tokens: int = 0
) -> CacheSimResult:
    """Run `requests` in order through an `LRUPrefixCache` and add up the computed tokens.

    `prefill_tokens = 0`: one request at a time. Otherwise a batch takes requests while their
    computed tokens fit in `prefill_tokens` (always at least one request).
    """
    cache = LRUPrefixCache(capacity_tokens, page_size)
    prompt = computed = batch_tokens = 0
    batch: list[PlanRequest] = []
    for req in requests:
        prompt += req.prompt_len
        if prefill_tokens <= 0:
            computed += cache.run(req)
            continue
        if batch and batch_tokens + cache.match(req, touch=False) > prefill_tokens:
            cache.insert(batch)  # the batch is full: it runs, and its prompts are cached
            batch, batch_tokens = [], 0
        need = cache.match(req)
        batch.append(req)
        batch_tokens += need
        computed += need
    cache.insert(batch)
    return CacheSimResult(capacity_tokens, prefill_tokens, prompt, computed, cache.evicted)
