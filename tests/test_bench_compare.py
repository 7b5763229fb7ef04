"""The output-agreement rule of the benchmark (compare.py)."""

import pytest

from sglang_batchllm.bench.compare import OutputTolerance, compare_outputs
from sglang_batchllm.bench.workloads import common_prefix_len


def runs(n=100, length=20):
    ref = {f"r{i}": [i * 1000 + k for k in range(length)] for i in range(n)}
    return ref, {rid: list(ids) for rid, ids in ref.items()}, {rid: length for rid in ref}


def flip(outputs, rids, at):
    for rid in rids:
        outputs[rid][at] = -1


def test_identical_outputs_agree():
    ref, cand, expected = runs()
    c = compare_outputs(ref, cand, expected)
    assert c.ok and c.agreeing == c.identical == c.first_token_agreeing == 100
    assert c.mean_matched_fraction == 1.0 and c.summary().startswith("ok")


def test_late_flips_are_tolerated_early_flips_are_not():
    ref, cand, expected = runs()
    flip(cand, [f"r{i}" for i in range(30)], at=16)  # after the first 16 tokens: still agree
    c = compare_outputs(ref, cand, expected)
    assert c.ok and c.agreeing == 100 and c.identical == 70
    flip(cand, [f"r{i}" for i in range(30, 35)], at=15)  # 5 of 100 within the first 16: 95% agree
    assert compare_outputs(ref, cand, expected).ok
    flip(cand, ["r35"], at=0)  # 94%: below the 95% default
    c = compare_outputs(ref, cand, expected)
    assert not c.ok and c.agreeing == 94 and c.first_token_agreeing == 99
    assert c.summary().startswith("FAIL")


def test_tolerance_is_configurable():
    ref, cand, expected = runs()
    flip(cand, [f"r{i}" for i in range(10)], at=3)
    assert not compare_outputs(ref, cand, expected).ok
    assert compare_outputs(ref, cand, expected, OutputTolerance(first_tokens=3, min_fraction=0.95)).ok
    assert compare_outputs(ref, cand, expected, OutputTolerance(first_tokens=16, min_fraction=0.9)).ok


def test_short_outputs_compare_all_their_tokens():
    ref, cand, expected = runs(length=5)
    flip(cand, ["r0"], at=4)
    c = compare_outputs(ref, cand, expected, OutputTolerance(first_tokens=16, min_fraction=1.0))
    assert not c.ok and c.agreeing == 99


def test_missing_or_wrong_length_always_fails():
    ref, cand, expected = runs()
    del cand["r7"]
    c = compare_outputs(ref, cand, expected, OutputTolerance(min_fraction=0.0))
    assert not c.ok and c.missing == ("r7",) and "missing" in c.summary()
    ref, cand, expected = runs()
    cand["r3"] = cand["r3"][:-1]  # ignore_eos: every request must return max_new_tokens
    c = compare_outputs(ref, cand, expected, OutputTolerance(min_fraction=0.0))
    assert not c.ok and c.wrong_length == ("r3",) and c.to_dict()["num_wrong_length"] == 1


@pytest.mark.parametrize("kw", [{"first_tokens": 0}, {"min_fraction": 1.5}, {"first_tokens": True}])
def test_bad_tolerance(kw):
    with pytest.raises(ValueError):
        OutputTolerance(**kw)


def testcommon_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
