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

    def is_extend(self):
        return self.name in ("extend", "mixed")


def _req(node_id, n):
    node = None if node_id is None else SimpleNamespace(id=node_id)
    return SimpleNamespace(last_node=node, prefix_indices=torch.zeros(n, dtype=torch.int64),
                           retraction_count=0)


def test_facts_are_the_admission_time_ones():
    reqs = [_req(5, 100), _req(5, 100), _req(None, 0), _req(8, 0), _req(9, 7)]
    assert rows_of(reqs) == RowPrefixes((-1,) * 5, (0,) * 5)  # nothing captured yet
    row_prefixes.capture(reqs)
    assert rows_of(reqs) == RowPrefixes((5, 5, -1, -1, 9), (100, 100, 0, 0, 7))
    # after the prefill SGLang moves each request to its own node with its whole prompt
    reqs[0].last_node, reqs[0].prefix_indices = SimpleNamespace(id=77), torch.zeros(130)
    row_prefixes.capture(reqs)  # a later chunk or a mixed step: the facts stay
    assert rows_of(reqs).keys[0] == 5
    # a retracted request matches again when it comes back: new facts
    reqs[0].retraction_count = 1
    assert rows_of(reqs).keys[0] == -1
    row_prefixes.capture(reqs)
    assert rows_of(reqs) == RowPrefixes((77, 5, -1, -1, 9), (130, 100, 0, 0, 7))


def test_the_patch_captures_at_extend_and_publishes_decode_and_mixed_steps():
    row_prefixes.clear()
    reqs = [_req(3, 40), _req(3, 40)]
    extend = SimpleNamespace(forward_mode=_Mode("extend"), out_cache_loc=torch.arange(2))
    forward_groups._after_init_new(extend, object, SimpleNamespace(reqs=reqs, forward_mode=_Mode("extend")), None)
    assert row_prefixes.lookup(extend.out_cache_loc) == RowPrefixes((3, 3), (40, 40))
    idle = SimpleNamespace(forward_mode=_Mode("idle"), out_cache_loc=torch.arange(2))
    forward_groups._after_init_new(idle, object, SimpleNamespace(reqs=reqs, forward_mode=_Mode("idle")), None)
    assert row_prefixes.lookup(idle.out_cache_loc) is None
    for mode in ("decode", "mixed"):
        loc = torch.arange(2)
        batch = SimpleNamespace(reqs=reqs, forward_mode=_Mode(mode))
        result = SimpleNamespace(forward_mode=_Mode(mode), out_cache_loc=loc)
        assert forward_groups._after_init_new(result, object, batch, None) is result
        assert row_prefixes.lookup(loc) == RowPrefixes((3, 3), (40, 40))
        assert row_prefixes.lookup(torch.arange(2)) is None  # equal values, other tensor


def test_a_leader_finds_its_groups_prefix_node_above_its_own():
    prefix = SimpleNamespace(id=40, parent=SimpleNamespace(id=0, parent=None))
    leader = _req(None, 0)
    row_prefixes.capture([leader])  # admitted with nothing cached
    leader.last_node = SimpleNamespace(id=41, parent=prefix)  # after its prompt was inserted
    members = [_req(40, 96), _req(40, 96)]
    row_prefixes.capture(members)
    loner = _req(None, 0)
    row_prefixes.capture([loner])
    loner.last_node = SimpleNamespace(id=50, parent=SimpleNamespace(id=0, parent=None))
    assert rows_of([members[0], leader, loner, members[1]]) == RowPrefixes((40, 40, -1, 40), (96, 96, 0, 96))
    assert rows_of([leader]) == RowPrefixes((-1,), (0,))  # nobody else holds its ancestors


def test_only_the_latest_steps_are_kept():
    row_prefixes.clear()
    tensors = [torch.zeros(1) for _ in range(10)]
    for t in tensors:
        row_prefixes.publish(t, RowPrefixes((1,), (2,)))
    assert row_prefixes.lookup(tensors[0]) is None
    assert row_prefixes.lookup(tensors[-1]) == RowPrefixes((1,), (2,))


def test_an_eager_steps_copy_carries_its_facts():
    """SGLang's eager runner hands the backend a copy of the batch in its static buffers (new
    tensors): the real `EagerRunner.load_batch`, then the patch's AFTER hook."""
    from sglang.srt.model_executor.cuda_graph_buffer_registry import build_eager_registry
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.model_executor.runner.eager_runner import EagerRunner

    row_prefixes.clear()
    registry = build_eager_registry(device=torch.device("cpu"), max_bs=8, max_num_token=64,
                                    cache_loc_dtype=torch.int64, encoder_lens_dtype=torch.int64)
    runner = SimpleNamespace(_eager_registry=registry)
    seq = torch.tensor([41, 42, 9])
    batch = ForwardBatch(
        forward_mode=ForwardMode.DECODE, batch_size=3, input_ids=torch.zeros(3, dtype=torch.int64),
        req_pool_indices=torch.arange(3), seq_lens=seq, seq_lens_cpu=seq, seq_lens_sum=92,
        out_cache_loc=torch.tensor([100, 101, 102]), positions=seq - 1,
    )
    facts = RowPrefixes((3, 3, -1), (40, 40, 0))
    row_prefixes.publish(batch.out_cache_loc, facts)
    copy = EagerRunner.load_batch(runner, batch)
    assert copy.out_cache_loc is not batch.out_cache_loc  # why the hook exists
    assert row_prefixes.lookup(copy.out_cache_loc) is None
    assert forward_groups._after_load_batch(copy, runner, batch) is copy
    assert row_prefixes.lookup(copy.out_cache_loc) == facts
    # a batch published by nobody stays without facts; a copy that is the batch adds nothing
    other = EagerRunner.load_batch(runner, batch.__class__(**{**batch.__dict__, "out_cache_loc": torch.tensor([7, 8, 9])}))
    forward_groups._after_load_batch(other, runner, batch=None)
    assert row_prefixes.lookup(other.out_cache_loc) is None
