"""Benchmark record and report from synthetic runs: metrics, the ratios, JSON / Markdown / PNG."""

import json
import sys

import pytest

from sglang_batchllm.bench.compare import OutputTolerance
from sglang_batchllm.bench.floor import Floor
from sglang_batchllm.bench.record import RECORD_SCHEMA, add_runs, summary_rows, workload_entry
from sglang_batchllm.bench.report import markdown, slug, write_report
from sglang_batchllm.bench.workloads import BenchRequest, Sharing, Workload

ARMS = ("vanilla", "vanilla-waves", "batchllm")
WALLS = {"vanilla": 10.0, "vanilla-waves": 8.0, "batchllm": 5.0}
BATCHLLM_STEPS = {"batchllm_prefix_tokens_planned": 4, "batchllm_prefix_tokens_computed": 4, "batchllm_prefix_recomputations": 1,
                  "peak_pinned_tokens": 4, "peak_groups_live": 1}


def workload():
    reqs = tuple(BenchRequest(f"w/g0-m{i}", (1, 2, 3, 4, 10 + i), 4) for i in range(4))
    return Workload("sweep/g4-o4", "1 group x 4", reqs, {"groups": 1})


def run(w, wall, prefill, outputs=None, kv_held=(300, 500), driver=None, batchllm=False):
    outputs = outputs or {r.rid: [7, 8, 9, 10] for r in w.requests}
    n = len(kv_held)
    steps = {"steps": n, "prefill_tokens": prefill, "decode_tokens": 12, "retractions": 1, "retracted_requests": 2,
             "kv_total": 1000, "peak_kv_used": 900, "peak_kv_held": max(kv_held), "max_step_tokens": prefill}
    series = {"t": [0.1 * i for i in range(n)], "mode": ["EXTEND"] * n, "reqs": [4] * n, "prefill": [prefill] + [0] * (n - 1),
              "decode": [0] + [4] * (n - 1), "kv_used": [900] * n, "kv_held": list(kv_held)}
    if batchllm:
        steps.update(BATCHLLM_STEPS)
        series.update(pinned_tokens=[4] * n, groups_live=[1] * n)
    return {
        "name": w.name, "fingerprint": w.fingerprint(), "t_start": 100.0, "t_end": 100.0 + wall, "wall_s": wall,
        "outputs": outputs, "prompt_tokens": w.prompt_tokens, "completion_tokens": w.output_tokens, "cached_tokens": 12,
        "steps": steps, "series": series, "driver": driver or {"driver": "one-call", "calls": 1}, "complete_log": True,
    }


WAVES = {"driver": "waves", "calls": 2, "wave_groups": 1, "waves": 1}


def runs_of(w, arms=ARMS, batchllm_outputs=None, walls=WALLS):
    made = {"vanilla": lambda: run(w, walls["vanilla"], 20),
            "vanilla-waves": lambda: run(w, walls["vanilla-waves"], 8, driver=WAVES),
            "batchllm": lambda: run(w, walls["batchllm"], 8, batchllm_outputs, batchllm=True)}
    return {arm: made[arm]() for arm in arms}


def record(arms=ARMS, batchllm_outputs=None, walls=WALLS):
    w = workload()
    entry = workload_entry(w, Sharing(20, 8, 30), Floor(2e12, 1e12, 1e12), {"levels": 1, "saving": 0.6, "num_shared_groups": 1,
                                                                              "time_s": 0.001})
    add_runs(entry, runs_of(w, arms, batchllm_outputs, walls), {a: 60.0 for a in arms}, {r.rid: 4 for r in w.requests},
             OutputTolerance())
    return {
        "schema": RECORD_SCHEMA, "date": "2026-11-21T00:00:00+00:00", "command": "python scripts/bench_batch.py --quick",
        "git": {"commit": "abc", "dirty": True},
        "host": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch": "2.11.0", "cuda": "13.0", "sglang": "0.5.17"},
        "matmul": {"matmul_tflops": 1.0, "gemm": "test"}, "model": {"dir": "/m", "name": "tiny"}, "arms": list(arms),
        "engines": {a: {"engine_class": f"{a}.Engine", "engine_kwargs": {"attention_backend": "triton"}, "startup_s": 60.0,
                        "command": f"python scripts/bench_batch.py --arms {a}"} for a in arms},
        "tolerance": {"first_tokens": 16, "min_fraction": 0.95}, "problems": [], "workloads": [entry], "ok": entry["outputs_ok"],
    }


def test_metrics_and_ratios():
    rec = record()
    w = rec["workloads"][0]
    a, waves, b = (w["runs"][arm] for arm in ARMS)
    # same tokens: ratios of wall times; every arm against each baseline before it
    assert w["ratios"] == {"vanilla-waves": {"vanilla": pytest.approx(10 / 8)},
                           "batchllm": {"vanilla": pytest.approx(10 / 5), "vanilla-waves": pytest.approx(8 / 5)}}
    assert b["total_tokens_per_s"] == pytest.approx((20 + 16) / 5.0)
    assert b["requests_per_s"] == pytest.approx(4 / 5.0) and b["output_tokens_per_s"] == pytest.approx(16 / 5.0)
    assert a["prefill_saving"] == 0.0 and b["prefill_saving"] == pytest.approx(1 - 8 / 20)
    assert b["floor_ratio"] == pytest.approx(5.0 / 2.0)  # prefill floor = 2e12 FLOP / 1e12 FLOP/s
    assert b["peak_kv_held_frac"] == pytest.approx(0.5) and b["retracted_requests"] == 2
    assert b["startup_s"] == 60.0 and w["outputs_ok"] and set(w["outputs"]) == {"vanilla-waves", "batchllm"}
    assert (waves["generate_calls"], waves["wave_groups"]) == (2, 1) and (a["generate_calls"], a["wave_groups"]) == (1, None)
    assert b["batchllm_prefix_tokens_computed"] == 4 and b["batchllm_prefix_computed_frac"] == 1.0
    assert (b["batchllm_prefix_recomputations"], b["peak_pinned_tokens"], b["peak_groups_live"]) == (1, 4, 1)
    assert a["peak_pinned_tokens"] is None and a["batchllm_prefix_computed_frac"] is None
    rows = summary_rows(rec)
    assert [(r["arm"], r["wall_s"]) for r in rows] == [("vanilla", 10.0), ("vanilla-waves", 8.0), ("batchllm", 5.0)]
    assert rows[2]["ratios"]["vanilla-waves"] == pytest.approx(1.6) and rows[0]["ratios"] == {}
    assert [r["outputs"] for r in rows][0] == "reference" and rows[2]["outputs_ok"] and rows[0]["outputs_ok"] is None


def test_slower_arm_gives_ratio_below_one():
    w = record(walls={"vanilla": 10.0, "vanilla-waves": 8.0, "batchllm": 12.5})["workloads"][0]
    assert w["ratios"]["batchllm"] == {"vanilla": pytest.approx(0.8), "vanilla-waves": pytest.approx(0.64)}


def test_without_vanilla_there_is_no_output_check_and_no_ratio_to_it():
    rec = record(arms=("vanilla-waves", "batchllm"))
    w = rec["workloads"][0]
    assert w["ratios"] == {"batchllm": {"vanilla-waves": pytest.approx(1.6)}} and w["outputs"] == {} and w["outputs_ok"]
    assert "not compared (no vanilla run)" in markdown(rec)


def test_mismatching_outputs_fail_the_record():
    w = workload()
    rec = record(batchllm_outputs={r.rid: [0, 8, 9, 10] for r in w.requests})
    entry = rec["workloads"][0]
    assert not entry["outputs_ok"] and not entry["outputs"]["batchllm"]["ok"] and entry["outputs"]["vanilla-waves"]["ok"]
    assert "FAIL" in markdown(rec)


def test_runs_of_other_requests_are_refused():
    w = workload()
    entry = workload_entry(w, Sharing(20, 8, 30), Floor(1, 1, 1), None)
    runs = runs_of(w)
    runs["vanilla-waves"]["fingerprint"] = "0000"
    with pytest.raises(ValueError, match="run vanilla-waves of .*fingerprint mismatch"):
        add_runs(entry, runs, {}, {}, OutputTolerance())


def test_write_report_json_markdown_png(tmp_path):
    rec = record()
    paths = write_report(rec, tmp_path)
    assert {p.name for p in paths} == {"result.json", "report.md", f"{slug('sweep/g4-o4')}.png"}
    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(rec))
    md = (tmp_path / "report.md").read_text()
    assert "python scripts/bench_batch.py --quick" in md and "NVIDIA H200" in md and "ran by `python scripts/bench_batch.py --arms batchllm`" in md
    assert "| workload | arm | requests | wall s | tok/s | vs vanilla | vs vanilla-waves | retractions (requests) |" in md
    assert "| sweep/g4-o4 | batchllm | 4 | 5.00 | 7 | **2.000x** | **1.600x** | 1 (2) | 1 |" in md
    assert "| sweep/g4-o4 | vanilla-waves | 4 | 8.00 | 4 | **1.250x** | - | 1 (2) | 2 (W = 1) |" in md
    assert "| BatchLLM prefix tokens computed / planned | - | - | 4 / 4 |" in md
    assert "| retractions (requests) | 1 (2) | 1 (2) | 1 (2) |" in md
    assert "60.0%" in md and "(dirty tree)" in md and "![sweep/g4-o4](sweep_g4-o4.png)" in md
    assert (tmp_path / "sweep_g4-o4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_pins_panel_only_when_an_arm_reported_pins(tmp_path, monkeypatch):
    from sglang_batchllm.bench import report

    panels = []
    monkeypatch.setattr(report, "_batchllm_panel", lambda ax, w, arms: panels.append(arms))
    write_report(record(), tmp_path)
    write_report(record(arms=("vanilla", "vanilla-waves")), tmp_path)
    assert panels == [["batchllm"]]


def test_a_record_of_the_two_engine_harness_is_refused(tmp_path):
    with pytest.raises(ValueError, match="schema 1"):
        write_report({**record(), "schema": 1}, tmp_path)


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
