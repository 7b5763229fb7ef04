"""Benchmark record and report from synthetic runs: metrics, the ratio, JSON / Markdown / PNG."""

import json
import sys

import pytest

from sglang_batchllm.bench.compare import OutputTolerance
from sglang_batchllm.bench.floor import Floor
from sglang_batchllm.bench.record import add_runs, summary_rows, workload_entry
from sglang_batchllm.bench.report import markdown, slug, write_report
from sglang_batchllm.bench.workloads import BenchRequest, Sharing, Workload

LABELS = ("vanilla", "batchllm")


def workload():
    reqs = tuple(BenchRequest(f"w/g0-m{i}", (1, 2, 3, 4, 10 + i), 4) for i in range(4))
    return Workload("sweep/g4-o4", "1 group x 4", reqs, {"groups": 1})


def run(w, wall, prefill, outputs=None, kv_held=(300, 500)):
    outputs = outputs or {r.rid: [7, 8, 9, 10] for r in w.requests}
    n = len(kv_held)
    return {
        "name": w.name, "fingerprint": w.fingerprint(), "t_start": 100.0, "t_end": 100.0 + wall, "wall_s": wall,
        "outputs": outputs, "prompt_tokens": w.prompt_tokens, "completion_tokens": w.output_tokens, "cached_tokens": 12,
        "steps": {"steps": n, "prefill_tokens": prefill, "decode_tokens": 12, "retractions": 1, "retracted_requests": 2,
                  "kv_total": 1000, "peak_kv_used": 900, "peak_kv_held": max(kv_held), "max_step_tokens": prefill},
        "series": {"t": [0.1 * i for i in range(n)], "mode": ["EXTEND"] * n, "reqs": [4] * n, "prefill": [prefill] + [0] * (n - 1),
                   "decode": [0] + [4] * (n - 1), "kv_used": [900] * n, "kv_held": list(kv_held)},
        "complete_log": True,
    }


def record(second_wall=8.0, second_outputs=None):
    w = workload()
    entry = workload_entry(w, Sharing(20, 8, 30), Floor(2e12, 1e12, 1e12), {"levels": 1, "saving": 0.6, "num_shared_groups": 1,
                                                                              "time_s": 0.001})
    runs = (run(w, 10.0, 20), run(w, second_wall, 8, second_outputs))
    add_runs(entry, LABELS, runs, (60.0, 70.0), {r.rid: 4 for r in w.requests}, OutputTolerance())
    return {
        "date": "2026-11-21T00:00:00+00:00", "command": "python scripts/bench_batch.py --quick", "git": {"commit": "abc", "dirty": True},
        "host": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch": "2.11.0", "cuda": "13.0", "sglang": "0.5.17"},
        "matmul": {"matmul_tflops": 1.0, "gemm": "test"}, "model": {"dir": "/m", "name": "tiny"}, "labels": list(LABELS),
        "engines": {l: {"engine_class": f"{l}.Engine", "engine_kwargs": {"attention_backend": "triton"}, "startup_s": 60.0}
                    for l in LABELS},
        "tolerance": {"first_tokens": 16, "min_fraction": 0.95}, "problems": [], "workloads": [entry], "ok": entry["outputs"]["ok"],
    }


def test_metrics_and_ratio():
    rec = record()
    w = rec["workloads"][0]
    a, b = w["runs"]["vanilla"], w["runs"]["batchllm"]
    assert w["ratio"] == pytest.approx(10.0 / 8.0)  # same tokens: ratio of wall times
    assert b["total_tokens_per_s"] == pytest.approx((20 + 16) / 8.0)
    assert b["requests_per_s"] == pytest.approx(4 / 8.0) and b["output_tokens_per_s"] == pytest.approx(16 / 8.0)
    assert a["prefill_saving"] == 0.0 and b["prefill_saving"] == pytest.approx(1 - 8 / 20)
    assert b["floor_ratio"] == pytest.approx(8.0 / 2.0)  # prefill floor = 2e12 FLOP / 1e12 FLOP/s
    assert b["peak_kv_held_frac"] == pytest.approx(0.5) and b["retracted_requests"] == 2
    assert b["startup_s"] == 70.0 and w["outputs"]["ok"]
    row = summary_rows(rec)[0]
    assert (row["first_s"], row["second_s"], row["ratio"]) == (10.0, 8.0, pytest.approx(1.25))


def test_slower_second_run_gives_ratio_below_one():
    assert record(second_wall=12.5)["workloads"][0]["ratio"] == pytest.approx(0.8)


def test_mismatching_outputs_fail_the_record():
    w = workload()
    rec = record(second_outputs={r.rid: [0, 8, 9, 10] for r in w.requests})
    assert not rec["workloads"][0]["outputs"]["ok"]
    assert "FAIL" in markdown(rec)


def test_runs_of_other_requests_are_refused():
    w = workload()
    entry = workload_entry(w, Sharing(20, 8, 30), Floor(1, 1, 1), None)
    other = run(w, 1.0, 20)
    other["fingerprint"] = "0000"
    with pytest.raises(ValueError, match="fingerprint"):
        add_runs(entry, LABELS, (run(w, 1.0, 20), other), (None, None), {}, OutputTolerance())


def test_write_report_json_markdown_png(tmp_path):
    rec = record()
    paths = write_report(rec, tmp_path)
    assert {p.name for p in paths} == {"result.json", "report.md", f"{slug('sweep/g4-o4')}.png"}
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(rec))
    md = (tmp_path / "report.md").read_text()
    assert "**1.250x**" in md and "python scripts/bench_batch.py --quick" in md and "NVIDIA H200" in md
    assert "60.0%" in md and "(dirty tree)" in md and "![sweep/g4-o4](sweep_g4-o4.png)" in md
    assert (tmp_path / "sweep_g4-o4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_chart_with_several_workloads(tmp_path):
    rec = record()
    second = json.loads(json.dumps(rec["workloads"][0]))
    second["name"] = "control"
    rec["workloads"].append(second)
    names = {p.name for p in write_report(rec, tmp_path)}
    assert {"summary.png", "control.png", "sweep_g4-o4.png"} <= names


def test_without_matplotlib_the_pngs_are_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_report(record(), tmp_path)
    assert [p.name for p in paths] == ["result.json", "report.md"]
    assert "--report-only" in (tmp_path / "report.md").read_text()
