"""The per-step grouping rule of the attention backend (kernels/step_groups.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_batchllm.kernels.step_groups import NO_KEY, cascade_pays, group_rows


def test_rows_of_one_node_share_its_prefix():
    keys = [7, 7, NO_KEY, 7, 9]
    groups = group_rows(keys, [100, 100, 0, 100, 50], [130, 101, 40, 120, 60])
    assert groups.group_rows == [0] and groups.group_prefix_len == [100]
    assert groups.request_group == [0, 0, -1, 0, -1]  # node 9 has one row: nothing to share
    assert groups.suffix_start == [100, 100, 0, 100, 0]
    assert cascade_pays(groups, [130, 101, 40, 120, 60])


def test_a_short_prefix_below_the_cost_rule_is_not_shared():
    # 2 rows sharing 4 tokens of 1,000-token contexts: 0.2% saved, below the decode threshold
    groups = group_rows([3, 3], [4, 4], [1000, 1000])
    assert groups.request_group == [-1, -1] and groups.num_groups == 0
    assert not cascade_pays(groups, [1000, 1000])


def test_a_row_whose_prefix_is_its_whole_context_runs_alone():
    # nothing of its own to attend causally: the query token must be in the row's own part
    groups = group_rows([5, 5, 5], [64, 64, 64], [64, 80, 90])
    assert groups.request_group == [-1, 0, 0]


def test_a_prefill_step_that_shares_nothing_stays_on_sglangs_kernel():
    alone = group_rows([NO_KEY, NO_KEY], [0, 0], [50, 60], mode="extend")
    assert not cascade_pays(alone, [50, 60], mode="extend")
    shared = group_rows([4, 4], [40, 40], [50, 60], mode="extend")
    assert cascade_pays(shared, [50, 60], mode="extend")


def test_inconsistent_rows_are_refused():
    with pytest.raises(ValueError, match="one radix node has one path length"):
        group_rows([1, 1], [10, 12], [20, 20])
    with pytest.raises(ValueError, match="one entry per row"):
        group_rows([1], [10, 12], [20, 20])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 4), st.integers(1, 40)), max_size=30), st.data())
def test_groups_partition_rows_by_key(rows, data):
    plen = {k: data.draw(st.integers(0, 300), label=f"prefix of {k}") for k in range(5)}
    keys = [k for k, _ in rows]
    prefix = [plen[k] if k >= 0 else 0 for k in keys]
    seq = [p + own for p, (_, own) in zip(prefix, rows)]
    groups = group_rows(keys, prefix, seq)
    for r, g in enumerate(groups.request_group):
        if g >= 0:
            rep = groups.group_rows[g]
            assert keys[rep] == keys[r] and groups.group_prefix_len[g] == prefix[r]
            assert groups.suffix_start[r] == prefix[r] < seq[r]
        else:
            assert groups.suffix_start[r] == 0
    # one group per key at most, and every member of a grouped key is in it
    for g, rep in enumerate(groups.group_rows):
        same = [r for r, k in enumerate(keys) if k == keys[rep] and prefix[r] < seq[r]]
        assert [r for r, x in enumerate(groups.request_group) if x == g] == same
