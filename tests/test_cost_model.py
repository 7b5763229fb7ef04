"""The cascade cost rule: pure, monotone, and matching the measurements it came from."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def _import_cost_model():
    """`sglang_batchllm.kernels.cost_model`, also from a checkout that is not pip-installed."""
    try:
        from sglang_batchllm.kernels import cost_model

        return cost_model
    except ImportError:
        pass
    repo = Path(__file__).resolve().parents[1]
    name = "sglang_batchllm.kernels.cost_model"
    if "sglang_batchllm" not in sys.modules:
        parent = types.ModuleType("sglang_batchllm")
        parent.__path__ = [str(repo / "sglang_batchllm")]
        sys.modules["sglang_batchllm"] = parent
    spec = importlib.util.spec_from_file_location(name, repo / "kernels" / "cost_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cm = _import_cost_model()
SUFFIX = 250  # mean suffix of the measured sweep (200-300 tokens)


@pytest.mark.parametrize(
    "prefix,group,expected",
    [  # the decode sweep in the cost_model docstring (saved fraction -> speedup)
        (32, 2, True),  # 5.7% -> 1.22x
        (32, 4, True),  # 8.5% -> 1.30x
        (128, 2, True),  # 17% -> 1.36x
        (2048, 16, True),  # 87% -> 5.02x
        (2048, 1, False),  # nothing to share: stays on SGLang's kernel
        (16, 2, False),  # 3% saved: below anything measured
    ],
)
def test_rule_matches_measurements(prefix, group, expected):
    assert cm.should_share_prefix(group, prefix, group * SUFFIX) is expected
    assert cm.should_use_cascade([group], [prefix], group * SUFFIX) is expected
    assert cm.saved_kv_fraction(group, prefix, group * SUFFIX) == pytest.approx(
        (group - 1) * prefix / (group * (prefix + SUFFIX))
    )


def test_extend_uses_the_fused_kernel_whenever_there_is_work():
    assert cm.should_use_cascade([1, 1], [100, 7], 5000, mode="extend")
    assert cm.should_use_cascade([], [], 10, mode="extend")
    assert not cm.should_use_cascade([], [], 0, mode="extend")


def test_saved_fraction():
    assert cm.saved_kv_fraction(16, 2000, 16 * 250) == pytest.approx(15 * 2000 / (32000 + 4000))
    assert cm.saved_kv_fraction(1, 2000, 250) == 0.0
    assert cm.saved_kv_fraction(0, 0, 0) == 0.0


@settings(max_examples=200, deadline=None)
@given(
    group=st.integers(1, 64),
    prefix=st.integers(0, 8192),
    suffix=st.integers(0, 4096),
    more=st.integers(1, 64),
)
def test_rule_is_monotone(group, prefix, suffix, more):
    """More members (each with the mean suffix) or a longer prefix never turn sharing off."""
    if cm.should_share_prefix(group, prefix, group * suffix):
        assert cm.should_share_prefix(group + more, prefix, (group + more) * suffix)
        assert cm.should_share_prefix(group, prefix + more, group * suffix)


def test_batch_rule_ignores_groups_of_one():
    # a group of one saves nothing however long its prefix
    assert not cm.should_use_cascade([1] * 10, [4000] * 10, 2500)
    assert cm.should_use_cascade([1, 8], [4000, 2000], 10 * 250)


@pytest.mark.parametrize(
    "call",
    [
        lambda: cm.should_use_cascade([2], [10, 20], 0),
        lambda: cm.should_use_cascade([2], [10], -1),
        lambda: cm.should_use_cascade([2], [10], 5, mode="prefill"),
        lambda: cm.saved_kv_fraction(-1, 10, 5),
    ],
)
def test_bad_inputs_are_rejected(call):
    with pytest.raises(ValueError):
        call()
