"""Per-row cached-prefix facts of a forward step, handed from the batch to the attention backend.

`ForwardBatch` does not say which rows start from the same cached prefix, and a CUDA-graph
replay hands the backend a view that keeps only the graph's own buffers. So when a batch
becomes a `ForwardBatch` (`patches/forward_groups.py`), its rows' facts are published here,
keyed by the step's `out_cache_loc` tensor, which both the eager batch and the replay view
carry (the very same object). The backend looks them up while planning the step.

A row's key is the id of the radix node its cached prefix ended at when the request was
admitted (`req.last_node` at its first extend) and that prefix's length; rows with one key
hold the same KV slots for that prefix (kernels/step_groups.py says why). The facts are taken
at the first extend and kept on the request (`capture`) because SGLang re-inserts every
unfinished request into the tree after its prefill (`cache_unfinished_req`), which moves
`last_node` to the request's own, unshared node. The admission-time node stays locked (an
ancestor of the request's locked node) and its path, hence its slots, unchanged. A retracted
request is matched again when it comes back, so its facts are taken again. A row whose
admission-time node no other row of the step holds (a group leader; a request continuing an
earlier one, which matched its own earlier path) takes the deepest node of its radix path that
another row holds (`rows_of`); without that, a frontend program's second `gen` read its whole
context per row.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from itertools import chain
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sglang_batchllm.kernels.step_groups import NO_KEY

# Steps in flight at once: with overlap scheduling the next batch is built while one runs.
_KEEP = 4


@dataclass(frozen=True)
class RowPrefixes:
    keys: tuple[int, ...]
    lens: tuple[int, ...]


_ATTR = "_batchllm_row_prefix"  # (retraction_count, key, prefix_len, node) on a Req


def capture(reqs: Sequence[Any]) -> None:
    """Take the admission-time facts of requests in an extend batch that have none yet (or
    whose facts predate a retraction). Call before the batch's results are processed."""
    for req in reqs:
        retractions = getattr(req, "retraction_count", 0)
        facts = getattr(req, _ATTR, None)
        if facts is not None and facts[0] == retractions:
            continue
        node = getattr(req, "last_node", None)
        prefix = getattr(req, "prefix_indices", None)
        n = 0 if prefix is None else len(prefix)
        node_id = getattr(node, "id", None)
        key = NO_KEY if n == 0 or node_id is None else int(node_id)
        setattr(req, _ATTR, (retractions, key, n if key != NO_KEY else 0, node if key != NO_KEY else None))


# How many nodes up from its start a row looks for one that other rows of the step share, and
# how long a path it measures (a radix path has one node per point where prompts diverged).
MAX_ANCESTORS = 8
MAX_PATH = 256

_CHAIN = "_batchllm_row_chain"  # (start node, chain, chain ids) on a Req


def _chain(req: Any, start: Any) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """(node id, path length) of `start` and its ancestors, deepest first, root excluded, at
    most MAX_ANCESTORS, and the ids alone; kept on the request while its start node stays the same.

    A node's path length is the sum of its and its ancestors' key lengths, measured, never
    taken from the request (with page_size > 1 `prefix_indices` also holds a partial page the
    tree lacks). A later split of a node on the path adds a node the kept chain lacks: that
    only hides a sharing chance, since a split keeps every existing node's path length, and the
    request's lock keeps its whole path in the tree."""
    memo = getattr(req, _CHAIN, None)
    if memo is not None and memo[0] is start:
        return memo[1], memo[2]
    path = []
    node = start
    while node is not None and getattr(node, "parent", None) is not None:  # the root holds nothing
        key, node_id = getattr(node, "key", None), getattr(node, "id", None)
        if key is None or node_id is None or len(path) == MAX_PATH:
            path = []  # a path we cannot measure shares nothing
            break
        path.append((int(node_id), len(key)))
        node = node.parent
    chain, depth = [], sum(n for _, n in path)
    for node_id, n in path[:MAX_ANCESTORS]:
        if depth > 0:
            chain.append((node_id, depth))
        depth -= n
    chain = tuple(chain)
    ids = tuple(node_id for node_id, _ in chain)
    try:
        setattr(req, _CHAIN, (start, chain, ids))
    except AttributeError:
        pass
    return chain, ids


def rows_of(reqs: Sequence[Any]) -> RowPrefixes:
    """Each row's shared prefix, in row order: a radix node (key) another row of the step also
    holds, and its path length; or NO_KEY.

    A row whose admission-time node another row of the step holds keeps it. Every other row
    (admitted with nothing cached, or from a node of its own) looks up its radix path, from its
    admission-time node or, with none, its current one, and takes the deepest node at least one
    other row holds too. That covers a group leader, whose own node hangs below the prefix node
    its members split off, and a request that continues an earlier one (a frontend program's
    second `gen`, a next chat turn): it matched its own earlier path, unique to it, whose
    ancestors its siblings share. A row's KV slots over any node of its path are the node's:
    SGLang writes a request's matched and re-inserted prefix back from the tree
    (`cache_unfinished_req`), and a locked node keeps its whole path.
    """
    keys, lens, starts = [], [], []
    for req in reqs:
        facts = getattr(req, _ATTR, None)
        if facts is None or facts[0] != getattr(req, "retraction_count", 0):
            keys.append(NO_KEY)
            lens.append(0)
            starts.append(None)
        else:
            keys.append(facts[1])
            lens.append(facts[2])
            starts.append(facts[3])
    held = Counter(k for k in keys if k != NO_KEY)
    walkers = [row for row, k in enumerate(keys) if k == NO_KEY or held[k] < 2] if len(reqs) > 1 else []
    if not walkers:
        return RowPrefixes(tuple(keys), tuple(lens))
    chains, ids_of = {}, {}
    for row in walkers:
        start = starts[row] if keys[row] != NO_KEY else getattr(reqs[row], "last_node", None)
        chains[row], ids_of[row] = _chain(reqs[row], start) if start is not None else ((), ())
        if keys[row] != NO_KEY:
            held[keys[row]] -= 1  # counted again with its chain
    # The path length each node is reported at: a node reported at two (a stale fact) is
    # shared by nobody, never handed to the backend as one group of two lengths. (Whole-list
    # operations: with 2,000 rows walking this runs in a few milliseconds a step.)
    held.update(chain.from_iterable(ids_of.values()))
    reported = set(chain.from_iterable(chains.values()))
    reported.update((k, n) for k, n in zip(keys, lens) if k != NO_KEY and held[k] > 0)
    ambiguous = {node for node, count in Counter(node for node, _ in reported).items() if count > 1}
    for row, path in chains.items():
        for node, depth in path:
            if held[node] >= 2:
                if node not in ambiguous:
                    keys[row], lens[row] = node, depth
                break
    return RowPrefixes(tuple(keys), tuple(lens))


_lock = threading.Lock()
_recent: deque = deque(maxlen=_KEEP)


def publish(out_cache_loc: Any, rows: RowPrefixes) -> None:
    if out_cache_loc is None:
        return
    with _lock:
        _recent.append((out_cache_loc, rows))


def lookup(out_cache_loc: Any) -> Optional[RowPrefixes]:
    """The facts published with this very tensor (identity, never equality), or None."""
    if out_cache_loc is None:
        return None
    with _lock:
        for tensor, rows in reversed(_recent):
            if tensor is out_cache_loc:
                return rows
    return None


def carry(source: Any, copy: Any) -> None:
    """Publish the facts of the step whose `out_cache_loc` is `source` under `copy` too: SGLang's
    eager runner copies each batch into its static input buffers before the backend plans it,
    so the backend sees a slice of those buffers, not the tensor the batch was published with."""
    if copy is None or copy is source:
        return
    rows = lookup(source)
    if rows is not None:
        publish(copy, rows)


def clear() -> None:
    with _lock:
        _recent.clear()
