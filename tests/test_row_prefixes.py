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


def _node(node_id, parent, key_len):
    """A radix node: its id, parent and key (only the key's length matters here)."""
    return SimpleNamespace(id=node_id, parent=parent, key=[0] * key_len)


ROOT = SimpleNamespace(id=0, parent=None, key=[])


def _leader(node, prefix_len=0):
    """A request admitted with nothing cached whose prompt was then inserted under `node`."""
    req = _req(None, 0)
    row_prefixes.capture([req])
    req.last_node, req.prefix_indices = node, torch.zeros(prefix_len)
    return req


def test_a_leader_finds_its_groups_prefix_node_above_its_own():
    prefix = _node(40, ROOT, 96)
    leader = _req(None, 0)
    row_prefixes.capture([leader])  # admitted with nothing cached
    leader.last_node = _node(41, prefix, 34)  # after its prompt was inserted
    leader.prefix_indices = torch.zeros(130)
    members = [_req(40, 96), _req(40, 96)]
    for m in members:
        m.last_node = prefix
    row_prefixes.capture(members)
    loner = _req(None, 0)
    row_prefixes.capture([loner])
    loner.last_node = _node(50, ROOT, 80)
    assert rows_of([members[0], leader, loner, members[1]]) == RowPrefixes((40, 40, -1, 40), (96, 96, 0, 96))
    assert rows_of([leader]) == RowPrefixes((-1,), (0,))  # nobody else holds its ancestors
    assert rows_of([leader, loner]) == RowPrefixes((-1, -1), (0, 0))  # only the root in common


def test_continuing_requests_share_the_ancestors_of_their_own_earlier_paths():
    """A frontend program's second `gen` (or a next chat turn) matches its own first turn's
    path, a node no other request holds; its siblings' first turns hang below one document
    node, all documents below one system prompt."""
    system = _node(1, ROOT, 300)
    docs = [_node(10 + d, system, 1500) for d in range(2)]
    reqs, turn = [], 100
    for d, doc in enumerate(docs):
        for q in range(3):
            own = _node(turn, doc, 50 + 64 + q)  # its question, the first answer (lengths differ)
            turn += 1
            req = _req(own.id, 1800 + 114 + q)
            req.last_node = own
            reqs.append(req)
    row_prefixes.capture(reqs)
    facts = [getattr(r, row_prefixes._ATTR)[1] for r in reqs]
    assert len(set(facts)) == 6  # no two rows share an admission node...
    assert rows_of(reqs) == RowPrefixes((10, 10, 10, 11, 11, 11), (1800,) * 6)  # ...but a document
    for req in reqs:  # the second turn's prefill re-inserted each under its own node
        req.last_node = _node(turn, req.last_node, 40)
        turn += 1
    assert rows_of(reqs) == RowPrefixes((10, 10, 10, 11, 11, 11), (1800,) * 6)
    # a document with one row in the step: that row shares the system prompt with the rest
    assert rows_of(reqs[:4]) == RowPrefixes((10, 10, 10, 1), (1800, 1800, 1800, 300))
    # rows of one group keep their admission node; a continuing row can join them there
    members = [_req(10, 1800), _req(10, 1800)]
    row_prefixes.capture(members)
    # (rows that keep a shared admission node do not walk: their ancestors count for nobody,
    # and a row that finds no shared node keeps its own, a group of one)
    assert rows_of(members + reqs[3:4]) == RowPrefixes((10, 10, 103), (1800, 1800, 1914))
    assert rows_of(members + reqs[:1]) == RowPrefixes((10, 10, 10), (1800, 1800, 1800))


def test_a_path_length_is_measured_from_the_tree_not_the_request():
    """With page_size > 1 a request's `prefix_indices` also holds a partial page the tree
    lacks, so a leader's current depth is not `len(prefix_indices)`."""
    prefix = _node(40, ROOT, 64)
    leaders = [_leader(_node(41 + i, prefix, 16), 64 + 16 + 5) for i in range(2)]  # 5 of a partial page
    assert rows_of(leaders) == RowPrefixes((40, 40), (64, 64))


def test_a_node_reported_at_two_lengths_is_shared_by_nobody():
    """Rows that would hand the backend one node at two prefix lengths (a stale admission
    fact) make no group there: kernels/step_groups.py would reject the step."""
    prefix = _node(40, ROOT, 96)
    stale = [_req(40, 90), _req(40, 90)]  # facts that disagree with the tree's 96
    row_prefixes.capture(stale)
    leader = _leader(_node(41, prefix, 10))
    assert rows_of(stale + [leader]) == RowPrefixes((40, 40, -1), (90, 90, 0))


def test_a_walk_is_kept_on_the_request_until_its_node_changes():
    prefix = _node(40, ROOT, 96)
    rows = [_leader(_node(41 + i, prefix, 4)) for i in range(2)]
    assert rows_of(rows).keys == (40, 40)
    prefix.parent = None  # a walk that ran again would now find only a root
    assert rows_of(rows).keys == (40, 40)
    rows[0].last_node = _node(43, prefix, 4)  # a new node: walked again
    assert rows_of(rows).keys == (-1, -1)  # and the other row has nobody to share its node with


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
