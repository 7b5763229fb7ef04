"""A radix cache that pins a group's shared prefix for the group's lifetime.

`PinnedRadixCache` is SGLang's plain `RadixCache` plus counted pins. A pin is one
`inc_lock_ref` on the tree node that ends exactly at the prefix, so every scheduler path
(match, insert, cache_(un)finished_req, evict, the idle leak check) works unchanged:

- a pinned node is never evicted: `evict` only takes nodes from `evictable_leaves`, and a
  locked node (and, since `inc_lock_ref` walks to the root, each of its ancestors) is never
  there;
- pinned tokens move from `evictable_size()` to `protected_size()`, which shrinks the
  scheduler's admission budget (`available + evictable`) by exactly what the pins hold;
- pins need no request slot: they hold tree nodes, not `req_to_token_pool` rows;
- a node split later (a shorter match or insert) keeps the pin's node object as the tail half,
  which still ends at the pinned length; the new head half inherits the lock count.

Select it with `--radix-cache-backend batchllm` after `register()` has run in the scheduler
process. SGLang version: 0.5.17 (`sglang/srt/mem_cache/{radix_cache,registry}.py`).
"""

from __future__ import annotations

import itertools
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

if TYPE_CHECKING:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

BACKEND_NAME = "batchllm"


@dataclass(frozen=True)
class Pin:
    """One live pin: `node` is the tree node that ends exactly `length` key units from the root."""

    pin_id: int
    node: TreeNode
    length: int


class PinnedRadixCache(RadixCache):
    """`RadixCache` with counted pins. Lengths count tree key units, i.e. cached KV slots;
    without EAGLE that is tokens (EAGLE keys are bigrams: `length` slots need `length + 1`
    tokens)."""

    _pin_ids = itertools.count(1)  # shared by all caches, so a foreign pin never aliases

    def __init__(self, params) -> None:
        self._pins: dict[int, Pin] = {}
        super().__init__(params)  # calls reset()

    def reset(self) -> None:
        """Drop the tree and every pin. SGLang calls this from flush_cache, only when idle."""
        super().reset()
        self._pins = {}

    def pin(self, token_ids: Sequence[int], length: int, extra_key: str | None = None) -> Pin | None:
        """Lock the first `length` tokens (rounded down to the page size) under `extra_key`.

        Returns None, and changes nothing, when that prefix is not fully cached (or rounds to 0
        tokens). Otherwise splits a node so that one ends exactly there (as `match_prefix` does),
        locks it and returns a new `Pin`; pinning the same prefix again gives an independent pin.
        """
        if length <= 0:
            raise ValueError(f"pin length must be positive, got {length}")
        if length > len(token_ids):
            raise ValueError(f"pin length {length} exceeds the {len(token_ids)} tokens given")
        length = length // self.page_size * self.page_size
        if self.disable or length == 0:
            return None
        raw = array("q", token_ids[: length + 1 if self.is_eagle else length])
        key = RadixKey(raw, extra_key, is_bigram=self.is_eagle).page_aligned(self.page_size)
        if len(key) != length or self._cached_len(key) < length:
            return None  # checked read-only first: a miss must not split nodes or touch LRU
        match = self.match_prefix(MatchPrefixParams(key=RadixKey(raw, extra_key)))
        node = match.last_device_node
        if len(match.device_indices) != length or _depth(node) != length:
            raise AssertionError(
                f"match_prefix matched {len(match.device_indices)} and ended at depth "
                f"{_depth(node)}, expected exactly {length} for a cached prefix"
            )
        self.inc_lock_ref(node)
        pin = Pin(pin_id=next(self._pin_ids), node=node, length=length)
        self._pins[pin.pin_id] = pin
        return pin

    def unpin(self, pin: Pin) -> None:
        """Release one pin; its tokens become evictable once nothing else locks them."""
        if self._pins.get(pin.pin_id) is not pin:
            raise ValueError(
                f"pin {pin.pin_id} (length {pin.length}) is not live in this cache: it was "
                "already unpinned, dropped by reset(), or belongs to another cache"
            )
        del self._pins[pin.pin_id]
        self.dec_lock_ref(pin.node)

    def live_pins(self) -> int:
        return len(self._pins)

    def pinned_tokens(self) -> int:
        """Tokens held by pins, each node counted once however many pins cover it."""
        return sum(len(node.key) for node in self._pinned_path_counts())

    def kv_indices(self, pin: Pin) -> torch.Tensor:
        """The KV slot indices of a live pin's prefix, root to node (int64, length `pin.length`)."""
        path = []
        node = pin.node
        while node is not self.root_node:
            path.append(node.value)
            node = node.parent
        return torch.cat(path[::-1])

    def check_invariants(self, in_use_tokens: int | None = None) -> None:
        """Raise AssertionError unless (a) every pinned node is in the tree, ends at its pin's
        length and every node on its root path has lock_ref >= the pins at or below it; (b) no
        such node is an evictable leaf; (c) evictable_size() and protected_size() equal the
        token sums of unlocked and locked nodes; (d) when `in_use_tokens` (KV slots held by
        running requests, not by the tree) is given: available + evictable + protected +
        in_use == the allocator's capacity (`size` rounded down to the page size; slot or page
        0 is reserved outside `size`)."""
        for pin in self._pins.values():
            _check(self._in_tree(pin.node), f"pinned node of pin {pin.pin_id} is not in the tree")
            depth = _depth(pin.node)
            _check(depth == pin.length, f"pin {pin.pin_id} ends at {depth}, not {pin.length}")
        for node, pins in self._pinned_path_counts().items():
            _check(
                node.lock_ref >= pins,
                f"node {node.id} has lock_ref {node.lock_ref} but {pins} pins at or below it",
            )
            _check(node not in self.evictable_leaves, f"pinned node {node.id} is evictable")
        unlocked = locked = 0
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            _check(node.lock_ref >= 0, f"node {node.id} has lock_ref {node.lock_ref}")
            if node.lock_ref == 0:
                unlocked += len(node.key)
            else:
                locked += len(node.key)
            stack.extend(node.children.values())
        _check(
            (self.evictable_size_, self.protected_size_) == (unlocked, locked),
            f"evictable/protected counters are {self.evictable_size_}/{self.protected_size_} "
            f"but the tree holds {unlocked} unlocked / {locked} locked tokens",
        )
        if in_use_tokens is not None:
            allocator = self.token_to_kv_pool_allocator
            capacity = allocator.size // allocator.page_size * allocator.page_size
            available = allocator.available_size()
            total = available + unlocked + locked + in_use_tokens
            _check(
                total == capacity,
                f"KV slots do not add up: available {available} + evictable {unlocked} + "
                f"protected {locked} + in use {in_use_tokens} = {total} != capacity {capacity}",
            )

    def _pinned_path_counts(self) -> Counter:
        """Each node on some pin's root path -> the number of pins at or below it."""
        counts: Counter = Counter()
        for pin in self._pins.values():
            node = pin.node
            while node is not self.root_node and node is not None:
                counts[node] += 1
                node = node.parent
        return counts

    def _cached_len(self, key: RadixKey) -> int:
        """How much of `key` the tree holds (page-aligned), without splitting or touching LRU."""
        node, matched = self.root_node, 0
        while len(key) > 0:
            child = node.children.get(key.child_key(self.page_size))  # .get: no defaultdict insert
            if child is None:
                break
            n = child.key.match(key, page_size=self.page_size)
            matched += n
            if n < len(child.key):
                break
            node, key = child, key[n:]
        return matched

    def _in_tree(self, node: TreeNode) -> bool:
        while node is not self.root_node:
            parent = node.parent
            if node.evicted or parent is None:
                return False
            if parent.children.get(node.key.child_key(self.page_size)) is not node:
                return False
            node = parent
        return True


def _depth(node: TreeNode) -> int:
    depth = 0
    while node.parent is not None:
        depth += len(node.key)
        node = node.parent
    return depth


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"PinnedRadixCache: {message}")


class UnsupportedCacheConfig(ValueError):
    """The server configuration would not use SGLang's plain RadixCache."""


def create_pinned_radix_cache(ctx: TreeCacheBuildContext) -> PinnedRadixCache:
    """Factory for `--radix-cache-backend batchllm`. Refuses every case where SGLang's
    `default_radix_cache_factory` would build something other than a plain `RadixCache`: a
    pinned plain tree would be wrong there. Raised as an exception (not SystemExit) because the
    scheduler process logs exceptions from its __init__ and then stops the server."""
    from sglang.srt.environ import envs
    from sglang.srt.utils.tensor_bridge import use_mlx

    args = ctx.server_args
    refusals = [
        (ctx.disable_radix_cache or ctx.params.disable, "--disable-radix-cache is set"),
        (envs.SGLANG_EXPERIMENTAL_CPP_RADIX_TREE.get(), "SGLANG_EXPERIMENTAL_CPP_RADIX_TREE=1"),
        (envs.SGLANG_ENABLE_UNIFIED_RADIX_TREE.get(), "SGLANG_ENABLE_UNIFIED_RADIX_TREE=1"),
        (use_mlx(), "the MLX backend is in use (it needs UnifiedRadixCache)"),
        (ctx.is_hybrid_swa, "the model is hybrid sliding-window (SWA)"),
        (ctx.is_hybrid_ssm, "the model is hybrid SSM/Mamba"),
        (ctx.enable_hierarchical_cache, "--enable-hierarchical-cache is set"),
        (getattr(args, "enable_lmcache", False), "--enable-lmcache is set"),
        (getattr(args, "enable_flexkv", False), "--enable-flexkv is set"),
    ]
    reasons = [why for hit, why in refusals if hit]
    if reasons:
        raise UnsupportedCacheConfig(
            f"--radix-cache-backend {BACKEND_NAME} pins prefixes in SGLang's plain RadixCache, "
            f"which this configuration does not use: {'; '.join(reasons)}. Remove those "
            f"settings, or run without --radix-cache-backend {BACKEND_NAME}."
        )
    return PinnedRadixCache(ctx.params)


def register() -> None:
    """Register the factory under "batchllm"; calling it again is a no-op. SGLang's
    `register_radix_cache_backend` raises on a second registration, so check first."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

    existing = get_radix_cache_factory(BACKEND_NAME)
    if existing is None:
        register_radix_cache_backend(BACKEND_NAME, create_pinned_radix_cache)
    elif _qualified(existing) != _qualified(create_pinned_radix_cache):  # a reload is still us
        raise RuntimeError(f"radix-cache backend {BACKEND_NAME!r} is already taken by {existing!r}")


def _qualified(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
