"""The CPU parts of the GPU greedy-equality check (bench/greedy.py)."""

from sglang_batchllm.bench.greedy import build_batch, compare, difference_profile


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


def test_batch_from_a_token_stream_is_windows_of_it():
    stream = list(range(100, 400))  # distinct ids: a window is found by its first id
    reqs = build_batch(groups=3, size=4, prefix=20, distinct=6, output=2, text_ids=stream)
    assert len(reqs) == 12
    for r in reqs:
        ids = r["input_ids"]
        assert len(ids) == 26
        for part in (ids[:20], ids[20:]):
            start = stream.index(part[0])
            assert part == stream[start:start + len(part)]
    by_group = {}
    for r in reqs:
        by_group.setdefault(r["rid"].split("-")[0], set()).add(tuple(r["input_ids"][:20]))
    assert all(len(heads) == 1 for heads in by_group.values()) and len(by_group) == 3


def test_a_stream_shorter_than_a_prompt_wraps_to_more_windows():
    stream = list(range(100, 110))
    reqs = build_batch(groups=1, size=2, prefix=25, distinct=3, output=1, text_ids=stream)
    assert all(len(r["input_ids"]) == 28 and set(r["input_ids"]) <= set(stream) for r in reqs)


def test_the_default_check_runs_the_trained_bundled_weights(monkeypatch, tmp_path):
    """Without --weights the check runs the bundled model directory (its model.safetensors) on
    corpus windows; --weights random writes a random checkpoint and random-id prompts."""
    from pathlib import Path

    from sglang_batchllm.bench import greedy
    from sglang_batchllm.bundled_model import model_dir

    runs = []

    def fake_spawn(engine, model, batch, out, backend, env_extra=None):
        runs.append((engine, Path(model)))
        reqs = __import__("json").loads(Path(batch).read_text())
        return {"outputs": {r["rid"]: [1, 2] for r in reqs}, "margins": {r["rid"]: [1.0, 1.0] for r in reqs}}

    monkeypatch.setattr(greedy, "_spawn", fake_spawn)
    args = ["--groups", "2", "--size", "2", "--prefix", "8", "--distinct", "2", "--output", "2"]
    assert greedy.main(["--out", str(tmp_path / "t"), *args]) == 0
    assert {m for _, m in runs} == {Path(model_dir())}
    corpus = set(greedy.corpus_ids())
    batch = __import__("json").loads((tmp_path / "t" / "batch.json").read_text())
    assert all(set(r["input_ids"]) <= corpus for r in batch)
    runs.clear()
    assert greedy.main(["--out", str(tmp_path / "r"), "--weights", "random", *args]) == 0
    assert {m for _, m in runs} == {tmp_path / "r" / "model"}
    assert (tmp_path / "r" / "model" / "model.safetensors").is_file()


def test_the_difference_profile_buckets_margins_and_counts_positions():
    report = {"first_divergence": {"a": 1, "b": 1, "c": 7, "d": 0},
              "margins": {"a": 0.01, "b": 7.4, "c": 0.3, "d": 0.3}}
    profile = difference_profile(report)
    assert profile["margin_buckets"] == {"<0.05": 1, "<0.25": 0, "<1": 2, "<4": 0, ">=4": 1}
    assert profile["median_margin_of_a_difference"] == 0.3
    assert profile["first_divergence_positions"] == {0: 1, 1: 2, 7: 1}
    assert difference_profile({"first_divergence": {}, "margins": {}})["median_margin_of_a_difference"] is None
