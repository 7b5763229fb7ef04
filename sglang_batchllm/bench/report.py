"""Render a benchmark record (record.py) as files a person reads: `result.json` (everything,
including per-step series), `report.md` (tables) and one PNG per workload (throughput bars with
the ratio; tokens per step and KV use over time for both runs), plus `summary.png` when there
are several workloads. matplotlib is optional: without it the PNGs are skipped with a note, and
`scripts/bench_batch.py --report-only OUT/result.json` draws them later on any machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .record import summary_rows


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def write_report(record: dict, out_dir: str | Path, charts: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "result.json"]
    written[0].write_text(json.dumps(record, indent=1))
    pngs: list[Path] = []
    chart_note = ""
    if charts:
        try:
            pngs = write_charts(record, out)
        except ImportError:
            chart_note = "Charts skipped: matplotlib is not installed here; re-render with `--report-only result.json`."
    (out / "report.md").write_text(markdown(record, pngs, chart_note))
    return written + [out / "report.md"] + pngs


# ---- Markdown ----------------------------------------------------------------------------


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _i(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def markdown(record: dict, pngs: list[Path] = (), chart_note: str = "") -> str:
    first, second = record["labels"]
    host, eng = record.get("host", {}), record["engines"]
    lines = [
        f"# {second} vs {first}: {', '.join(w['name'] for w in record['workloads'])}",
        "",
        f"- Date: {record['date']}",
        f"- Command: `{record['command']}`",
        f"- Commit: {record.get('git', {}).get('commit', '-')}{' (dirty tree)' if record.get('git', {}).get('dirty') else ''}",
        f"- GPU: {host.get('gpu') or '-'} ({_f(host.get('gpu_memory_gib'), 0)} GiB), torch {host.get('torch') or '-'}, "
        f"CUDA {host.get('cuda') or '-'}, SGLang {host.get('sglang') or '-'}",
        f"- Model: {record['model']['name']} (`{record['model']['dir']}`), dummy weights, input_ids only",
        f"- bf16 matmul rate measured in this command: {_f(record['matmul']['matmul_tflops'], 0)} TFLOP/s "
        f"({record['matmul'].get('gemm', 'given')})",
    ]
    for label in (first, second):
        e = eng[label]
        reused = f" (reused from {e['reused_from']})" if e.get("reused_from") else ""
        lines.append(f"- `{label}`: {e['engine_class']}, start-up {_f(e.get('startup_s'), 0)} s{reused}; "
                     f"kwargs `{json.dumps(e['engine_kwargs'], sort_keys=True)}`")
    tol = record["tolerance"]
    lines += [
        f"- Output check: a request agrees when its first {tol['first_tokens']} greedy tokens match; "
        f"pass when >= {tol['min_fraction']:.0%} agree. Overall: **{'ok' if record['ok'] else 'FAIL'}**",
        *[f"- **Problem: {p}**" for p in record.get("problems", [])],
        "",
        "## Summary",
        "",
        f"| workload | requests | {first} s | {second} s | {first} tok/s | {second} tok/s | ratio | prefill floor s | outputs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary_rows(record):
        lines.append(
            f"| {r['workload']} | {_i(r['requests'])} | {_f(r['first_s'])} | {_f(r['second_s'])} | "
            f"{_f(r['first_tok_s'], 0)} | {_f(r['second_tok_s'], 0)} | **{r['ratio']:.3f}x** | {_f(r['floor_s'])} | "
            f"{'ok' if r['outputs_ok'] else 'FAIL'} |"
        )
    lines += ["", "tok/s = (prompt + output tokens) / wall time of the one timed generate call; "
              "ratio = second / first.", ""]
    for w in record["workloads"]:
        lines += _workload_section(w, first, second, pngs)
    if chart_note:
        lines += [chart_note, ""]
    lines += ["Compute floor: " + record["workloads"][0]["floor"]["formula"] + "." if record["workloads"] else "", ""]
    return "\n".join(lines)


_ROWS = [
    ("wall time, s", lambda r: _f(r["wall_s"])),
    ("requests/s", lambda r: _f(r["requests_per_s"])),
    ("output tokens/s", lambda r: _f(r["output_tokens_per_s"], 0)),
    ("total tokens/s", lambda r: _f(r["total_tokens_per_s"], 0)),
    ("prefill tokens computed (saving vs logical)", lambda r: f"{_i(r['prefill_tokens_computed'])} ({_pct(r['prefill_saving'])})"),
    ("cached tokens (SGLang meta_info)", lambda r: _i(r["cached_tokens"])),
    ("retractions (requests)", lambda r: f"{_i(r['retractions'])} ({_i(r['retracted_requests'])})"),
    ("peak KV held / in use (of pool)", lambda r: f"{_pct(r['peak_kv_held_frac'])} / {_pct(r['peak_kv_used_frac'])} of {_i(r['kv_total'])}"),
    ("steps, mean / max tokens per step", lambda r: f"{_i(r['steps'])}, {_f(r['mean_tokens_per_step'], 0)} / {_i(r['max_step_tokens'])}"
     + ("" if r.get("complete_step_log", True) else " (step log cut short)")),
    ("wall time / prefill floor", lambda r: _f(r["floor_ratio"]) + "x" if r["floor_ratio"] else "-"),
]


def _workload_section(w: dict, first: str, second: str, pngs: list[Path]) -> list[str]:
    share, plan, floor = w["sharing"], w.get("plan") or {}, w["floor"]
    if "saving" in plan:
        plan_text = (f"planner (levels={plan['levels']}): saving {_pct(plan['saving'])}, {_i(plan['num_shared_groups'])} shared groups, "
                     f"planned in {_f(plan['time_s'], 3)} s")
    else:
        plan_text = f"planner: {plan.get('error', 'not run')}"
    lines = [
        f"## {w['name']}",
        "",
        f"{w['description']}; {_i(w['num_requests'])} requests, {_i(w['prompt_tokens'])} prompt / {_i(w['output_tokens'])} output tokens, "
        f"fingerprint `{w['fingerprint']}`.",
        f"Unique prompt tokens {_i(share['unique_tokens'])} (best possible saving {_pct(share['ideal_saving'])}); {plan_text}. "
        f"Prefill floor {_f(floor['prefill_floor_s'])} s; decode matmuls would add {_f(floor['decode_matmul_floor_s'])} s.",
        "",
        f"| | {first} | {second} |",
        "|---|---|---|",
    ]
    a, b = w["runs"][first], w["runs"][second]
    lines += [f"| {name} | {fmt(a)} | {fmt(b)} |" for name, fmt in _ROWS]
    lines += ["", f"Ratio ({second} / {first}, total tokens/s): **{w['ratio']:.3f}x**. Outputs: {w['outputs']['summary']}.", ""]
    png = next((p for p in pngs if p.stem == slug(w["name"])), None)
    if png is not None:
        lines += [f"![{w['name']}]({png.name})", ""]
    return lines


# ---- charts ------------------------------------------------------------------------------


def write_charts(record: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = record["labels"]
    colors = {first: "tab:gray", second: "tab:blue"}
    paths = []
    for w in record["workloads"]:
        fig, (bars, tokens, kv) = plt.subplots(3, 1, figsize=(10, 11), gridspec_kw={"height_ratios": [1, 1.3, 1.3]})
        fig.suptitle(f"{w['name']}: {w['description']}", fontsize=10)
        runs = [w["runs"][first], w["runs"][second]]
        values = [r["total_tokens_per_s"] for r in runs]
        bars.barh([first, second], values, color=[colors[first], colors[second]])
        for y, v in enumerate(values):
            bars.text(v, y, f" {v:,.0f}", va="center")
        bars.set_xlabel("total tokens/s (prompt + output)")
        bars.set_title(f"ratio {second}/{first} = {w['ratio']:.3f}x   (wall {runs[0]['wall_s']:.1f} s vs {runs[1]['wall_s']:.1f} s; "
                       f"prefill floor {w['floor']['prefill_floor_s']:.1f} s)", fontsize=10)
        bars.set_xlim(0, max(values) * 1.2)
        for label, r in zip((first, second), runs):
            s = r["series"]
            step_tokens = [p + d for p, d in zip(s["prefill"], s["decode"])]
            tokens.plot(s["t"], step_tokens, drawstyle="steps-post", lw=0.7, color=colors[label], label=label)
            total = r["kv_total"] or 1
            kv.plot(s["t"], [x / total for x in s["kv_held"]], lw=1.0, color=colors[label], label=f"{label}: held")
            kv.plot(s["t"], [x / total for x in s["kv_used"]], lw=0.7, ls="--", color=colors[label], label=f"{label}: in use incl. cache")
        tokens.set_yscale("log")
        tokens.set_ylabel("tokens in the step (prefill + decode)")
        tokens.set_xlabel("seconds since generate() started")
        tokens.legend(loc="upper right")
        kv.set_ylabel("KV pool fraction")
        kv.set_xlabel("seconds since generate() started")
        kv.set_ylim(0, 1.05)
        kv.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = out / f"{slug(w['name'])}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if len(record["workloads"]) > 1:
        rows = summary_rows(record)
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
        ax.barh([r["workload"] for r in rows], [r["ratio"] for r in rows], color="tab:blue")
        ax.axvline(1.0, color="black", lw=0.8)
        for y, r in enumerate(rows):
            ax.text(r["ratio"], y, f" {r['ratio']:.2f}x", va="center")
        ax.invert_yaxis()
        ax.set_xlabel(f"throughput ratio {second} / {first}")
        fig.tight_layout()
        path = out / "summary.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
