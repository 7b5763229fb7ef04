"""scripts/bench_run_batch.py on CPU: the workload's token statistics (dry run), the whole
pipeline against the fake HTTP server with all arms and a resume, output comparison, and the
server process handling (stopped on error, a failed start reported with its log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_batchllm.bench import frontend_bench as fb
from sglang_batchllm.bench import frontend_workload as fw

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_run_batch.py"


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_token_statistics_are_the_issues(tmp_path):
    stats = fw.build(seed=0, scale=1.0).token_stats()
    assert stats["programs"] == 2000 and stats["documents"] == 100
    assert stats["programs_per_document"] == 20
    for part, target in fw.TARGET_TOKENS.items():
        assert abs(stats[part]["mean"] - target) <= 0.1 * target, (part, stats[part])
    assert abs(stats["first_gen_prompt"]["mean"] - 1850) <= 0.1 * 1850
    # every document and question is its own text; the system prompt is shared by all
    w = fw.build(seed=0, scale=1.0)
    assert len(set(w.documents)) == 100 and len(set(w.questions)) == 2000
    assert sorted(w.doc_of.count(d) for d in range(100)) == [20] * 100

    out = tmp_path / "dry"
    proc = _run("--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2,000 programs, 100 documents" in proc.stdout
    assert "(target ~1,500)" in proc.stdout and "(target ~300)" in proc.stdout
    assert "--load-format dummy" in proc.stdout and "sglang.launch_server" in proc.stdout
    assert not out.exists()  # a dry run writes nothing


def test_workload_is_deterministic_and_scales():
    a, b = fw.build(seed=3, scale=0.05), fw.build(seed=3, scale=0.05)
    assert a.fingerprint() == b.fingerprint() and a.args() == b.args()
    assert fw.build(seed=4, scale=0.05).fingerprint() != a.fingerprint()
    assert a.num_programs == 100 and len(a.documents) == 5
    with pytest.raises(ValueError, match="scale"):
        fw.build(scale=0)


def test_fake_server_run_has_all_arms_and_resumes(tmp_path):
    out = tmp_path / "rb"
    common = ["--fake-server", "--scale", "0.01", "--warmup", "2", "--out", str(out)]
    first = _run(*common)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Reproduce with: python scripts/bench_run_batch.py --fake-server" in first.stdout
    record = json.loads((out / "result.json").read_text())
    assert list(record["arms"]) == list(fb.ARMS)
    arms = record["arms"]
    for arm, r in arms.items():
        assert r["programs"] == 20 and r["errors"] == 0 and r["wall_s"] > 0, arm
        assert r["client_http"]["generate_items"] == 40, arm  # 20 programs x 2 gens
    # plain run_batch: one request per gen; the drop-in: one batch per step
    assert arms["vanilla"]["client_http"]["generate_requests"] == 40
    assert arms["batchllm-dropin"]["client_http"]["generate_requests"] <= 4
    assert arms["vanilla"]["batchllm_stats"]["metrics"] is None
    assert arms["batchllm-dropin"]["batchllm_stats"]["metrics"]["prefix_tokens_planned_total"] > 0
    assert arms["vanilla"]["ratio_to_vanilla"] == pytest.approx(1.0)
    assert record["equality"]["batchllm-dropin"]["identical"] == 20
    report = (out / "report.md").read_text()
    assert "| batchllm-dropin |" in report and "FAKE SERVER" in report

    raw_before = {a: (out / "raw" / f"{a}.json").read_text() for a in fb.ARMS}
    again = _run(*common, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3 and "server ready" not in again.stdout
    assert {a: (out / "raw" / f"{a}.json").read_text() for a in fb.ARMS} == raw_before

    # Other settings (another seed) reuse nothing and leave the old arms out of the report.
    other = _run(*[c for c in common], "--seed", "1", "--arms", "vanilla", "--resume")
    assert other.returncode == 0, other.stderr[-3000:]
    assert "reusing" not in other.stdout and "server ready" in other.stdout
    assert list(json.loads((out / "result.json").read_text())["arms"]) == ["vanilla"]


def test_compare_outputs_counts_programs_that_differ():
    ref = [{"i": i, "answer": f"a{i}", "detail": f"d{i}", "error": None} for i in range(5)]
    other = [dict(r) for r in ref]
    other[1]["detail"] = "changed"
    other[3]["answer"] = "changed"
    other[4]["error"] = "RuntimeError: boom"
    c = fb.compare_outputs(ref, other)
    assert (c["identical"], c["differ"], c["first_gen_differ"], c["first_differing"]) == (2, 3, 1, [1, 3, 4])
    with pytest.raises(ValueError, match="different runs"):
        fb.compare_outputs(ref, other[:4])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_server_is_stopped_when_the_run_fails(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    spec = fb.ServerSpec("sglang_batchllm.bench.fake_http", ["--latency-ms", "0"], env)
    with pytest.raises(KeyError):
        with fb.Server(spec, tmp_path / "s.log", timeout_s=60) as server:
            pid = server.proc.pid
            assert fb.scrape_metrics(server.url) is not None
            raise KeyError("the run failed")
    assert not _alive(pid)


def test_server_that_exits_at_start_is_reported_with_its_log(tmp_path):
    spec = fb.ServerSpec("sglang_batchllm.bench.no_such_module", [], dict(os.environ))
    with pytest.raises(RuntimeError, match="exited with status 1 before it was ready") as err:
        with fb.Server(spec, tmp_path / "s.log", timeout_s=60):
            pass
    assert "No module named" in str(err.value)


def test_batchllm_log_lines_and_metric_deltas():
    log = ("[2026] sglang_batchllm: batch of 96 requests -> 3 shared groups (10 requests joined live groups), "
           "planned prefill saving 80.0%\nsglang_batchllm: group 4 done (prefix 1800 tokens, 2 groups live)\n"
           "sglang_batchllm: batch of 4 requests -> 1 shared groups (0 requests joined live groups), planned\n")
    stats = fb.log_stats(log)
    assert stats["planned_batches"] == 2 and stats["planned_requests"] == 100
    assert stats["shared_groups"] == 4 and stats["joined_live_groups"] == 10 and stats["groups_done_logged"] == 1
    assert fb.log_stats("nothing of ours here") == {}
    before = {"sglang:batchllm_groups_done_total": 5.0, "sglang:cached_tokens_total": 100.0, "other_total": 1.0}
    after = {"sglang:batchllm_groups_done_total": 7.0, "sglang:batchllm_groups_live": 3.0,
             "sglang:cached_tokens_total": 400.0, "other_total": 9.0}
    assert fb.metric_deltas(before, after) == {"sglang:batchllm_groups_done_total": 2.0,
                                               "sglang:batchllm_groups_live": 3.0, "sglang:cached_tokens_total": 300.0}


def test_vanilla_server_gets_an_attention_backend_that_exists_unless_one_is_given(tmp_path):
    """SGLang picks fa3 by default on Hopper, which the device's SGLang build lacks: the vanilla
    arm died at start (2026-12-04). It gets --vanilla-backend (triton) unless the user's
    --server-arg names one for every arm; BatchLLM arms keep our default backend."""
    def flags(*argv):
        args = fb.parse_args(["--out", str(tmp_path), *argv])
        return {arm: fb.server_spec(arm, args, tmp_path, write=False).flags for arm in fb.ARMS}

    def backends(f):
        return [f[i + 1] for i, x in enumerate(f) if x == "--attention-backend"]

    default = flags()
    assert backends(default["vanilla"]) == ["triton"]
    assert backends(default["batchllm-plain"]) == backends(default["batchllm-dropin"]) == []
    assert backends(flags("--vanilla-backend", "flashinfer")["vanilla"]) == ["flashinfer"]
    given = flags("--server-arg", "--attention-backend flashinfer")
    assert all(backends(f) == ["flashinfer"] for f in given.values())
