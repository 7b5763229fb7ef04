"""The benchmark record: per-workload facts, per-arm metrics, the ratios and the output checks,
as one JSON-ready dict (what report.py renders and what docs/benchmarks.md quotes).

Pure functions over plain dicts: the engine processes' results (runner.WorkloadRun.to_dict())
go in, nothing here touches an engine, so tests feed it synthetic runs.

Per run:
- requests/s, output tokens/s, total tokens/s = (prompt + output tokens) / wall time, wall time
  of the timed region (all of the arm's `generate` calls for the workload; docs/baseline.md
  counts total tokens the same way);
- prefill_tokens_computed: extend tokens the scheduler actually ran (cache hits excluded,
  recomputation after retraction or eviction included); prefill_saving = 1 - computed / logical,
  logical = sum of prompt lengths;
- retractions (events, requests), peak KV in use (incl. cached, evictable tokens) and peak KV
  held (in use and not evictable: running requests and pinned prefixes), tokens and fraction;
- generate calls and, for the waves driver, W (groups per wave);
- BatchLLM's own counters where its scheduler reported them: prefix tokens computed vs
  planned, prefix recomputations, peak pinned tokens, peak groups live (None elsewhere);
- floor_ratio = wall time / prefill compute floor (floor.py).
ratios[arm][baseline] = arm's total tokens/s / the baseline arm's (> 1: the arm is faster),
for the pairs arms.ratio_pairs names; outputs[arm] = the arm's outputs compared with vanilla's.
"""

from __future__ import annotations

from typing import Any, Sequence

from .arms import REFERENCE, in_report_order, ratio_pairs
from .compare import OutputTolerance, compare_outputs
from .floor import Floor
from .workloads import Sharing, Workload

RECORD_SCHEMA = 2  # 2: N arms (record["arms"]); 1 had two engines (record["labels"])
# what the record keeps of an arm's result besides its runs (runner.engine_result, launch.run_engine)
ENGINE_FACTS = ("engine_class", "engine_kwargs", "driver", "startup_s", "reused_from", "command", "scheduler")


def assemble_record(
    header: dict, results: dict[str, dict], entries: list[dict], workloads: Sequence[Workload],
    tolerance: OutputTolerance, problems: list[str],
) -> dict:
    """The whole record: `header` (date, command, host, ...), each arm's engine facts, each
    workload's entry with every arm's run, and the verdict."""
    arms = in_report_order(results)
    record = {
        "schema": RECORD_SCHEMA,
        **header,
        "arms": arms,
        "engines": {arm: {k: results[arm].get(k) for k in ENGINE_FACTS} for arm in arms},
        "workloads": [],
    }
    for entry, w in zip(entries, workloads):
        runs = {arm: next(r for r in results[arm]["workloads"] if r["name"] == w.name) for arm in arms}
        startups = {arm: results[arm].get("startup_s") for arm in arms}
        expected = {r.rid: r.max_new_tokens for r in w.requests}
        record["workloads"].append(add_runs(entry, runs, startups, expected, tolerance))
    record["problems"] = problems
    record["ok"] = not problems and all(w["outputs_ok"] for w in record["workloads"])
    return record


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
        "decode_steps_timed": steps.get("decode_steps_timed", 0),
        "decode_step_ms": steps.get("decode_step_ms"),
        "decode_step_rows": steps.get("decode_step_rows"),
        "mixed_steps_timed": steps.get("mixed_steps_timed", 0),
        "mixed_step_ms": steps.get("mixed_step_ms"),
        **{k: steps[k] for k in ("decode_steps_s", "mixed_steps_s", "extend_steps_s",
                                 "triton_compiles", "triton_compile_s") if k in steps},
        "floor_ratio": wall / floor_s if floor_s else None,
        "driver": run["driver"],
        "generate_calls": run["driver"]["calls"],
        "wave_groups": run["driver"].get("wave_groups"),
        **batchllm_metrics(steps),
        "startup_s": startup_s,
        "complete_step_log": run.get("complete_log", True),
        "series": run["series"],
    }


def batchllm_metrics(steps: dict) -> dict:
    """BatchLLM's counters over the timed window (step_log.StepSummary), None for vanilla."""
    planned = steps.get("batchllm_prefix_tokens_planned")
    computed = steps.get("batchllm_prefix_tokens_computed")
    return {
        "batchllm_prefix_tokens_planned": planned,
        "batchllm_prefix_tokens_computed": computed,
        "batchllm_prefix_computed_frac": computed / planned if planned else None,
        "batchllm_prefix_recomputations": steps.get("batchllm_prefix_recomputations"),
        "batchllm_decode_rows": steps.get("batchllm_decode_rows"),
        "batchllm_cascade_rows": steps.get("batchllm_cascade_rows"),
        "batchllm_cascade_shared_rows": steps.get("batchllm_cascade_shared_rows"),
        "batchllm_extend_rows": steps.get("batchllm_extend_rows"),
        "batchllm_extend_shared_rows": steps.get("batchllm_extend_shared_rows"),
        "peak_pinned_tokens": steps.get("peak_pinned_tokens"),
        "peak_groups_live": steps.get("peak_groups_live"),
    }


def add_runs(
    entry: dict, runs: dict[str, dict], startups: dict[str, float | None], expected_len: dict[str, int],
    tolerance: OutputTolerance,
) -> dict:
    """Fill in every arm's run of one workload, the ratios and the output comparisons."""
    for arm in in_report_order(runs):
        if runs[arm]["fingerprint"] != entry["fingerprint"]:
            raise ValueError(f"run {arm} of {entry['name']} ran different requests (fingerprint mismatch)")
        entry["runs"][arm] = run_metrics(entry, runs[arm], startups.get(arm))
    entry["ratios"] = {}
    for arm, base in ratio_pairs(list(runs)):
        entry["ratios"].setdefault(arm, {})[base] = (
            entry["runs"][arm]["total_tokens_per_s"] / entry["runs"][base]["total_tokens_per_s"])
    reference = runs.get(REFERENCE)
    entry["outputs"] = {} if reference is None else {
        arm: compare_outputs(reference["outputs"], runs[arm]["outputs"], expected_len, tolerance).to_dict()
        for arm in in_report_order(runs) if arm != REFERENCE
    }
    entry["outputs_ok"] = all(c["ok"] for c in entry["outputs"].values())
    return entry


def outputs_text(entry: dict, arm: str) -> str:
    """The output check's verdict for one arm of a workload, for tables."""
    if arm == REFERENCE:
        return "reference"
    if arm not in entry["outputs"]:
        return f"not compared (no {REFERENCE} run)"
    return entry["outputs"][arm]["summary"]


def summary_rows(record: dict) -> list[dict[str, Any]]:
    """One row per workload and arm for tables: wall time, throughput, ratios, retractions,
    calls, output check."""
    rows = []
    for w in record["workloads"]:
        for arm in record["arms"]:
            r = w["runs"][arm]
            check = w["outputs"].get(arm)
            rows.append({
                "workload": w["name"],
                "arm": arm,
                "requests": w["num_requests"],
                "wall_s": r["wall_s"],
                "tok_s": r["total_tokens_per_s"],
                "ratios": w["ratios"].get(arm, {}),
                "retractions": r["retractions"],
                "retracted_requests": r["retracted_requests"],
                "generate_calls": r["generate_calls"],
                "wave_groups": r["wave_groups"],
                "floor_s": w["floor"]["prefill_floor_s"],
                "outputs_ok": None if check is None else check["ok"],
                "outputs": outputs_text(w, arm),
            })
    return rows
