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
request is matched again when it comes back, so its facts are taken again.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from sglang_batchllm.kernels.step_groups import NO_KEY

# Steps in flight at once: with overlap scheduling the next batch is built while one runs.
_KEEP = 4


@dataclass(frozen=True)
class RowPrefixes:
    keys: tuple[int, ...]
    lens: tuple[int, ...]


_ATTR = "_batchllm_row_prefix"  # (retraction_count, key, prefix_len) on a Req


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
        setattr(req, _ATTR, (retractions, key, n if key != NO_KEY else 0))


# How far up its radix path a row without admission-time facts looks for a node other rows
# share: a group leader's own node hangs below the prefix node its members matched.
MAX_ANCESTORS = 8


def rows_of(reqs: Sequence[Any]) -> RowPrefixes:
    """The captured facts of each request, in row order.

    A row without a shared prefix at admission (a group leader computed its prefix itself)
    may still hold one now: once its prompt was re-inserted into the tree, a member matching
    the prefix split the leader's node, so the prefix node is an ancestor of the leader's own.
    Such a row takes the key of the nearest ancestor that another row of the step holds: its
    slots over that node's path are the node's slots, like the other row's.
    """
    keys, lens, pending = [], [], []
    for row, req in enumerate(reqs):
        facts = getattr(req, _ATTR, None)
        if facts is None or facts[0] != getattr(req, "retraction_count", 0) or facts[1] == NO_KEY:
            keys.append(NO_KEY)
            lens.append(0)
            pending.append(row)
        else:
            keys.append(facts[1])
            lens.append(facts[2])
    if pending and len(pending) < len(reqs):
        known = {k: n for k, n in zip(keys, lens) if k != NO_KEY}
        for row in pending:
            node = getattr(reqs[row], "last_node", None)
            for _ in range(MAX_ANCESTORS):
                node_id = getattr(node, "id", None)
                if node_id is None:
                    break
                if node_id in known:
                    keys[row], lens[row] = node_id, known[node_id]
                    break
                node = getattr(node, "parent", None)
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
