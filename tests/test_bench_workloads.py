"""Benchmark workloads: deterministic per seed, the stated sharing structure, shuffled unless
ordered, ordinary token ids only."""

import json
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_batchllm import bundled_model
from sglang_batchllm.bench.model import LLAMA31_8B_CONFIG, ModelShape, TokenRange, write_llama31_8b_dir
from sglang_batchllm.bench.workloads import (
    SWEEP_GROUP_SIZES,
    SWEEP_OUTPUTS,
    WorkloadSpec,
    common_prefix_len,
    _Gen,
    sharing,
)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return ModelShape.from_config_dir(write_llama31_8b_dir(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def small():
    return ModelShape.from_config_dir(bundled_model.model_dir())


def build(model, name, **kw):
    return WorkloadSpec(name, **kw).build(model)


def lcp(a, b):
    return common_prefix_len(a, b)


def test_llama_shape_matches_llama31_8b(llama):
    assert (llama.layers, llama.hidden, llama.heads, llama.kv_heads, llama.head_dim) == (32, 4096, 32, 8, 128)
    assert llama.vocab == 128256 and llama.intermediate == 14336
    assert LLAMA31_8B_CONFIG["rope_scaling"]["rope_type"] == "llama3"
    assert llama.kv_bytes_per_token == 128 * 1024  # docs/baseline.md: 128 KiB of KV per token
    assert llama.token_range() == TokenRange(0, 128000)  # 128000.. are Llama-3's special ids


def test_bundled_token_range_skips_low_special_ids(small):
    assert small.token_range().lo == 5 and small.token_range().hi == small.vocab


@pytest.mark.parametrize("name", ["authors", "w1", "decode-heavy", "short-prefix", "control", "two-level", "run-batch-shape", "sweep"])
def test_same_seed_same_requests_other_seed_other_requests(small, name):
    a = [w.fingerprint() for w in build(small, name, scale=0.05)]
    b = [w.fingerprint() for w in build(small, name, scale=0.05)]
    c = [w.fingerprint() for w in build(small, name, scale=0.05, seed=1)]
    assert a == b
    assert all(x != y for x, y in zip(a, c))


@pytest.mark.parametrize("name", ["authors", "w1", "decode-heavy", "short-prefix", "control", "two-level", "run-batch-shape", "sweep"])
def test_token_ids_are_ordinary(small, name):
    tokens = small.token_range()
    for w in build(small, name, scale=0.05):
        ids = {t for r in w.requests for t in r.input_ids}
        assert min(ids) >= tokens.lo and max(ids) < tokens.hi
        assert not ids & set(small.special_ids)


def groups_of(workload):
    groups = defaultdict(list)
    for r in workload.requests:
        groups[r.rid.rsplit("-m", 1)[0]].append(r.input_ids)
    return groups


def test_authors_full_size_structure(llama):
    (w,) = build(llama, "authors")
    assert w.num_requests == 6400 and w.output_tokens == 6400 * 100
    assert {len(r.input_ids) for r in w.requests} == {2200}
    # every prefix token computed once, every distinct token once: 400 x 2000 + 6400 x 200
    assert sharing(r.input_ids for r in w.requests).unique_tokens == 400 * 2000 + 6400 * 200


def test_authors_members_share_exactly_the_prefix(llama):
    (w,) = build(llama, "authors", scale=0.025)  # 10 groups
    groups = groups_of(w)
    assert len(groups) == 10 and all(len(m) == 16 for m in groups.values())
    prompts = list(groups.values())
    for members in prompts:
        assert all(lcp(members[0], m) == 2000 for m in members[1:])
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            assert lcp(prompts[i][0], prompts[j][0]) == 0


@pytest.mark.parametrize("name, groups, output", [("w1", 64, 100), ("decode-heavy", 100, 500)])
def test_w1_and_decode_heavy_structure(llama, name, groups, output):
    (w,) = build(llama, name)
    assert w.name == name and w.num_requests == groups * 16 and w.output_tokens == groups * 16 * output
    assert {len(r.input_ids) for r in w.requests} == {2200} and {r.max_new_tokens for r in w.requests} == {output}
    assert sharing(r.input_ids for r in w.requests).unique_tokens == groups * 2000 + groups * 16 * 200
    by_group = groups_of(w)
    assert len(by_group) == groups and all(len(m) == 16 for m in by_group.values())
    assert all(lcp(m[0], p) == 2000 for m in by_group.values() for p in m[1:])
    (quick,) = build(llama, name, scale=1 / 8)
    assert quick.name == f"{name}[x0.125]" and quick.params["groups"] == round(groups / 8)


def test_control_shares_nothing(llama):
    (w,) = build(llama, "control")
    assert w.num_requests == 512
    share = sharing(r.input_ids for r in w.requests)
    assert share.unique_tokens == share.logical_tokens == 512 * 2200
    assert len({r.input_ids[0] for r in w.requests}) == 512  # not even a first token in common


def test_two_level_structure(llama):
    (w,) = build(llama, "two-level", scale=0.125)  # 8 documents x 8 questions
    assert w.num_requests == 64
    system = w.requests[0].input_ids[:1000]
    assert all(r.input_ids[:1000] == system for r in w.requests)
    by_doc = defaultdict(list)
    for r in w.requests:
        by_doc[r.rid.rsplit("-q", 1)[0]].append(r.input_ids)
    for prompts in by_doc.values():
        assert all(lcp(prompts[0], p) == 2500 for p in prompts[1:])
    heads = [p[0] for p in by_doc.values()]
    assert all(lcp(a, b) == 1000 for a in heads for b in heads if a is not b)
    assert sharing(r.input_ids for r in w.requests).unique_tokens == 1000 + 8 * 1500 + 64 * 100


def test_run_batch_shape_matches_the_frontend_benchmark(llama):
    (w,) = build(llama, "run-batch-shape")
    assert w.num_requests == 2000 and {r.max_new_tokens for r in w.requests} == {64}
    by_doc = defaultdict(list)
    for r in w.requests:
        by_doc[r.rid.rsplit("-q", 1)[0]].append(r.input_ids)
    assert len(by_doc) == 100 and {len(p) for p in by_doc.values()} == {20}
    assert sharing(r.input_ids for r in w.requests).unique_tokens == 300 + 100 * 1500 + 2000 * 50


def test_sweep_cells(llama):
    cells = build(llama, "sweep")
    assert [w.name for w in cells] == [f"sweep/g{g}-o{o}" for g in SWEEP_GROUP_SIZES for o in SWEEP_OUTPUTS]
    for w in cells:
        g, o = w.params["group_size"], w.params["output"]
        assert w.num_requests == 256 and {r.max_new_tokens for r in w.requests} == {o}
        assert all(len(m) == g for m in groups_of(w).values())
    assert cells[0].fingerprint() != cells[1].fingerprint()  # same shape, own seed per cell


def test_shuffled_unless_ordered(small):
    (shuffled,) = build(small, "authors", scale=0.025)
    (ordered,) = build(small, "authors", scale=0.025, ordered=True)
    rids = [r.rid for r in ordered.requests]
    assert rids == sorted(rids)
    assert [r.rid for r in shuffled.requests] != rids
    assert sorted(r.rid for r in shuffled.requests) == rids
    assert {r.rid: r.input_ids for r in shuffled.requests} == {r.rid: r.input_ids for r in ordered.requests}


def test_quick_scale_names_and_sizes(small):
    (w,) = build(small, "authors", scale=1 / 8)
    assert w.name == "authors[x0.125]" and w.params["groups"] == 50 and w.num_requests == 800


def test_heads_stay_distinct_when_the_vocabulary_is_small():
    gen = _Gen(WorkloadSpec("control"), TokenRange(5, 15))
    heads = gen.heads(60)  # more than 10 one-token heads exist: two tokens each
    assert len({tuple(h) for h in heads}) == 60 and {len(h) for h in heads} == {2}
    assert all(5 <= t < 15 for h in heads for t in h)


def test_jsonl(tmp_path, small):
    path = tmp_path / "reqs.jsonl"
    rows = [{"input_ids": [5, 6, i + 7], "max_new_tokens": 3 + i} for i in range(20)]
    rows[3]["rid"] = "mine"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (ordered,) = build(small, f"jsonl:{path}", ordered=True)
    assert [r.max_new_tokens for r in ordered.requests] == [3 + i for i in range(20)]
    assert ordered.requests[3].rid == "mine" and ordered.requests[0].rid == "line-1"
    (shuffled,) = build(small, f"jsonl:{path}")
    assert [r.rid for r in shuffled.requests] != [r.rid for r in ordered.requests]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"input_ids": [], "max_new_tokens": 3}', "empty prompt"),
        ('{"input_ids": [5, 99999], "max_new_tokens": 3}', r"vocabulary \[0, 1024\)"),
        ('{"input_ids": [5], "max_new_tokens": 0}', "max_new_tokens"),
        ("not json", "not valid JSON"),
        ('{"text": "hello", "max_new_tokens": 1}', "needs a tokenizer"),
        ('{"custom_id": "c", "body": null}', "'body' must be an object, got null"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, small, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"input_ids": [5], "max_new_tokens": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        build(small, f"jsonl:{path}")
    assert f"{path}:2" in str(err.value)


def test_unknown_workload_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="authors, w1, decode-heavy, short-prefix, step-256, step-512, sweep, control, two-level, run-batch-shape"):
        WorkloadSpec("author")
    with pytest.raises(ValueError, match="no such file"):
        WorkloadSpec("jsonl:/nonexistent.jsonl")


def brute_force_trie(prompts):
    nodes, pairs = set(), 0
    for p in prompts:
        for i in range(len(p)):
            if tuple(p[: i + 1]) not in nodes:
                nodes.add(tuple(p[: i + 1]))
                pairs += i + 1
    return len(nodes), pairs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=0, max_size=12))
def test_sharing_counts_trie_nodes(prompts):
    share = sharing(prompts)
    assert (share.unique_tokens, share.unique_attention_pairs) == brute_force_trie(prompts)
    assert share.logical_tokens == sum(len(p) for p in prompts)


@given(st.lists(st.integers(0, 2), max_size=30), st.lists(st.integers(0, 2), max_size=30))
def testcommon_prefix_len(a, b):
    expected = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    assert common_prefix_len(a, b) == expected
