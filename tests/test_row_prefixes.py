"""Row prefix facts: from a batch's requests (patches/forward_groups.py) to the backend."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from sglang_batchllm.patches import forward_groups
from sglang_batchllm.runtime import row_prefixes
from sglang_batchllm.runtime.row_prefixes import RowPrefixes, rows_of


class _Mode:
    def __init__(self, name):
        self.name = name

    def is_decode(self):
        return self.name == "decode"

    def is_mixed(self):
        return self.name == "mixed"


def _req(node_id, n):
    node = None if node_id is None else SimpleNamespace(id=node_id)
    return SimpleNamespace(last_node=node, prefix_indices=torch.zeros(n, dtype=torch.int64))


def test_rows_of_reads_each_requests_radix_node_and_prefix():
    reqs = [_req(5, 100), _req(5, 100), _req(None, 0), _req(8, 0), _req(9, 7)]
    assert rows_of(reqs) == RowPrefixes((5, 5, -1, -1, 9), (100, 100, 0, 0, 7))


def test_the_patch_publishes_decode_and_mixed_steps_by_tensor_identity():
    row_prefixes.clear()
    reqs = [_req(3, 40), _req(3, 40)]
    for mode, published in [("decode", True), ("mixed", True), ("extend", False)]:
        loc = torch.arange(2)
        batch = SimpleNamespace(reqs=reqs, forward_mode=_Mode(mode))
        result = SimpleNamespace(forward_mode=_Mode(mode), out_cache_loc=loc)
        assert forward_groups._after_init_new(result, object, batch, None) is result
        found = row_prefixes.lookup(loc)
        assert (found == RowPrefixes((3, 3), (40, 40))) if published else found is None
        assert row_prefixes.lookup(torch.arange(2)) is None  # equal values, other tensor


def test_only_the_latest_steps_are_kept():
    row_prefixes.clear()
    tensors = [torch.zeros(1) for _ in range(10)]
    for t in tensors:
        row_prefixes.publish(t, RowPrefixes((1,), (2,)))
    assert row_prefixes.lookup(tensors[0]) is None
    assert row_prefixes.lookup(tensors[-1]) == RowPrefixes((1,), (2,))
