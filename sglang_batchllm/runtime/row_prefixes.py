"""Per-row cached-prefix facts of a forward step, handed from the batch to the attention backend.

`ForwardBatch` does not say which rows start from the same cached prefix, and a CUDA-graph
replay hands the backend a view that keeps only the graph's own buffers. So when a batch
becomes a `ForwardBatch` (`patches/forward_groups.py`), its rows' facts are published here,
keyed by the step's `out_cache_loc` tensor, which both the eager batch and the replay view
carry (the very same object). The backend looks them up while planning the step.

A row's key is the id of the radix node its cached prefix ends at (`req.last_node`) and its
length `len(req.prefix_indices)`; rows with one key hold the same KV slots for that prefix
(kernels/step_groups.py says why). Requests retracted and re-admitted match again, so their
facts are always those of their current KV.
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


def rows_of(reqs: Sequence[Any]) -> RowPrefixes:
    keys, lens = [], []
    for req in reqs:
        node = getattr(req, "last_node", None)
        prefix = getattr(req, "prefix_indices", None)
        n = 0 if prefix is None else len(prefix)
        node_id = getattr(node, "id", None)
        if n == 0 or node_id is None:
            keys.append(NO_KEY)
            lens.append(0)
        else:
            keys.append(int(node_id))
            lens.append(n)
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


def clear() -> None:
    with _lock:
        _recent.clear()
