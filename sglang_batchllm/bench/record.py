"""The benchmark record: per-workload facts, per-run metrics, the ratio and the output check,
as one JSON-ready dict (what report.py renders and what docs/benchmarks.md quotes).

Pure functions over plain dicts: the engine processes' results (runner.WorkloadRun.to_dict())
go in, nothing here touches an engine, so tests feed it synthetic runs.

Per run:
- requests/s, output tokens/s, total tokens/s = (prompt + output tokens) / wall time, wall time
  of the one timed `generate` call (docs/baseline.md counts total tokens the same way);
- prefill_tokens_computed: extend tokens the scheduler actually ran (cache hits excluded,
  recomputation after retraction or eviction included); prefill_saving = 1 - computed / logical,
  logical = sum of prompt lengths;
- retractions (events, requests), peak KV in use (incl. cached, evictable tokens) and peak KV
  held (in use and not evictable: running requests and pinned prefixes), tokens and fraction;
- floor_ratio = wall time / prefill compute floor (floor.py).
ratio = second run's total tokens/s / first run's (> 1: the second is faster).
"""

from __future__ import annotations

from typing import Any

from .compare import OutputTolerance, compare_outputs
from .floor import Floor
from .workloads import Sharing, Workload


def workload_entry(workload: Workload, share: Sharing, floor: Floor, plan: dict | None) -> dict:
    return {
        "name": workload.name,
        "description": workload.description,
        "params": workload.params,
        "fingerprint": workload.fingerprint(),
        "num_requests": workload.num_requests,
        "prompt_tokens": workload.prompt_tokens,
        "output_tokens": workload.output_tokens,
        "sharing": {
            "logical_tokens": share.logical_tokens,
            "unique_tokens": share.unique_tokens,
            "unique_attention_pairs": share.unique_attention_pairs,
            "ideal_saving": share.ideal_saving,
        },
        "plan": plan,
        "floor": floor.to_dict(),
        "runs": {},
    }


def run_metrics(entry: dict, run: dict, startup_s: float | None = None) -> dict:
    wall = run["wall_s"]
    n, prompt, output = entry["num_requests"], entry["prompt_tokens"], run["completion_tokens"]
    steps = run["steps"]
    kv_total = steps["kv_total"] or 0
    computed = steps["prefill_tokens"]
    floor_s = entry["floor"]["prefill_floor_s"]
    return {
        "wall_s": wall,
        "requests_per_s": n / wall,
        "output_tokens_per_s": output / wall,
        "total_tokens_per_s": (prompt + output) / wall,
        "output_tokens": output,
        "prefill_tokens_computed": computed,
        "prefill_saving": 1 - computed / prompt if prompt else 0.0,
        "cached_tokens": run["cached_tokens"],
        "retractions": steps["retractions"],
        "retracted_requests": steps["retracted_requests"],
        "kv_total": kv_total,
        "peak_kv_used": steps["peak_kv_used"],
        "peak_kv_held": steps["peak_kv_held"],
        "peak_kv_used_frac": steps["peak_kv_used"] / kv_total if kv_total else None,
        "peak_kv_held_frac": steps["peak_kv_held"] / kv_total if kv_total else None,
        "steps": steps["steps"],
        "mean_tokens_per_step": (steps["prefill_tokens"] + steps["decode_tokens"]) / steps["steps"] if steps["steps"] else 0.0,
        "max_step_tokens": steps["max_step_tokens"],
        "floor_ratio": wall / floor_s if floor_s else None,
        "startup_s": startup_s,
        "complete_step_log": run.get("complete_log", True),
        "series": run["series"],
    }


def add_runs(
    entry: dict, labels: tuple[str, str], runs: tuple[dict, dict], startups: tuple[float | None, float | None],
    expected_len: dict[str, int], tolerance: OutputTolerance,
) -> dict:
    """Fill in both runs of one workload, their ratio and the output comparison."""
    for label, run, startup in zip(labels, runs, startups):
        if run["fingerprint"] != entry["fingerprint"]:
            raise ValueError(f"run {label} of {entry['name']} ran different requests (fingerprint mismatch)")
        entry["runs"][label] = run_metrics(entry, run, startup)
    first, second = (entry["runs"][label] for label in labels)
    entry["ratio"] = second["total_tokens_per_s"] / first["total_tokens_per_s"]
    entry["outputs"] = compare_outputs(runs[0]["outputs"], runs[1]["outputs"], expected_len, tolerance).to_dict()
    return entry


def summary_rows(record: dict) -> list[dict[str, Any]]:
    """One row per workload for tables: throughputs, ratio, floor ratios, output check."""
    first, second = record["labels"]
    rows = []
    for w in record["workloads"]:
        a, b = w["runs"][first], w["runs"][second]
        rows.append({
            "workload": w["name"],
            "requests": w["num_requests"],
            "first_s": a["wall_s"],
            "second_s": b["wall_s"],
            "first_tok_s": a["total_tokens_per_s"],
            "second_tok_s": b["total_tokens_per_s"],
            "ratio": w["ratio"],
            "floor_s": w["floor"]["prefill_floor_s"],
            "outputs_ok": w["outputs"]["ok"],
        })
    return rows
