"""The CPU parts of the GPU greedy-equality check (bench/greedy.py)."""

from sglang_batchllm.bench.greedy import build_batch, compare


def test_batch_is_shuffled_groups_sharing_exactly_their_prefix():
    reqs = build_batch(groups=4, size=3, prefix=10, distinct=5, output=2)
    assert len(reqs) == 12 and len({r["rid"] for r in reqs}) == 12
    assert [r["rid"] for r in reqs] != sorted(r["rid"] for r in reqs), "shuffled"
    by_group = {}
    for r in reqs:
        by_group.setdefault(r["rid"].split("-")[0], []).append(r["input_ids"])
    for prompts in by_group.values():
        assert len({tuple(p[:10]) for p in prompts}) == 1


def test_compare_finds_the_first_divergence():
    vanilla = {"a": [1, 2, 3], "b": [4, 5, 6], "c": [4, 5, 6]}
    ours = {"a": [1, 2, 3], "b": [4, 9, 6], "c": [4, 5, 6]}
    report = compare(vanilla, ours)
    assert report["identical"] == 2 and report["distinct_outputs"] == 2
    assert report["first_divergence"] == {"b": 1}
