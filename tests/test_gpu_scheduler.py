"""GPU: BatchLLM's scheduler gives vanilla SGLang's greedy outputs on a shuffled shared-prefix
batch of 1,024 requests (64 groups x 16), with random weights at realistic scales so outputs
depend on the prompt. Differences are allowed only at near-ties (see bench/greedy.py).

Run on a GPU machine: `pytest -m gpu tests/test_gpu_scheduler.py -s`."""

import json

import pytest

pytestmark = pytest.mark.gpu


def test_greedy_outputs_match_vanilla(tmp_path):
    from sglang_batchllm.bench import greedy

    rc = greedy.main(["--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    print({k: v for k, v in report.items() if k not in ("first_divergence", "margins")})
    assert report["requests"] >= 1000
    assert report["distinct_outputs"] > report["requests"] // 2, "outputs must depend on the prompt"
    assert rc == 0, report
