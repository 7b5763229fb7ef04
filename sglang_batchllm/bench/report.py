"""Render a benchmark record (record.py) as files a person reads: `result.json` (everything,
including per-step series), `report.md` (tables) and one PNG per workload (throughput bars with
the ratios; tokens per step and KV use over time for every arm; BatchLLM's pinned tokens and
live groups when an arm reported them), plus `summary.png` when there are several workloads.
matplotlib is optional: without it the PNGs are skipped with a note, and
`scripts/bench_batch.py --report-only OUT/result.json` draws them later on any machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .arms import ARMS, BASELINES, REFERENCE
from .record import RECORD_SCHEMA, outputs_text, summary_rows


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def write_report(record: dict, out_dir: str | Path, charts: bool = True) -> list[Path]:
    if record.get("schema") != RECORD_SCHEMA:
        raise ValueError(f"this record has schema {record.get('schema')}, this harness renders schema {RECORD_SCHEMA}; "
                         "re-render it with the harness of the commit that wrote it")
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
    arms = record["arms"]
    host = record.get("host", {})
    git = record.get("git", {})
    lines = [
        f"# {' / '.join(arms)}: {', '.join(w['name'] for w in record['workloads'])}",
        "",
        f"- Date: {record['date']}",
        f"- Command (this report): `{record['command']}`",
        f"- Commit: {git.get('commit', '-')}{' (dirty tree)' if git.get('dirty') else ''}",
        f"- GPU: {host.get('gpu') or '-'} ({_f(host.get('gpu_memory_gib'), 0)} GiB), torch {host.get('torch') or '-'}, "
        f"CUDA {host.get('cuda') or '-'}, SGLang {host.get('sglang') or '-'}",
        f"- Model: {record['model']['name']} (`{record['model']['dir']}`), dummy weights, input_ids only",
        f"- bf16 matmul rate measured in this command: {_f(record['matmul']['matmul_tflops'], 0)} TFLOP/s "
        f"({record['matmul'].get('gemm', 'given')})",
        *[_arm_line(arm, record["engines"][arm]) for arm in arms],
    ]
    tol = record["tolerance"]
    lines += [
        f"- Output check: every arm against vanilla; a request agrees when its first {tol['first_tokens']} greedy tokens "
        f"match; pass when >= {tol['min_fraction']:.0%} agree. Overall: **{'ok' if record['ok'] else 'FAIL'}**",
        *[f"- **Problem: {p}**" for p in record.get("problems", [])],
        "",
        "## Summary",
        "",
        *_summary_table(record),
        "",
        "tok/s = (prompt + output tokens) / wall time of the timed region (all of the arm's generate calls); "
        "vs X = the arm's tok/s / arm X's (> 1: faster).",
        "",
    ]
    for w in record["workloads"]:
        lines += _workload_section(w, arms, pngs)
    if chart_note:
        lines += [chart_note, ""]
    lines += ["Compute floor: " + record["workloads"][0]["floor"]["formula"] + "." if record["workloads"] else "", ""]
    return "\n".join(lines)


def _arm_line(arm: str, e: dict) -> str:
    reused = f" (reused from {e['reused_from']})" if e.get("reused_from") else ""
    ran_by = f"; ran by `{e['command']}`" if e.get("command") else ""
    return (f"- `{arm}`: {ARMS[arm].description}; {e['engine_class']}, start-up {_f(e.get('startup_s'), 0)} s{reused}; "
            f"kwargs `{json.dumps(e['engine_kwargs'], sort_keys=True)}`{ran_by}")


def _baselines(arms: list[str]) -> list[str]:
    return [b for b in BASELINES if b in arms]


def _summary_table(record: dict) -> list[str]:
    bases = _baselines(record["arms"])
    lines = [
        "| workload | arm | requests | wall s | tok/s | " + "".join(f"vs {b} | " for b in bases)
        + "retractions (requests) | generate calls | prefill floor s | outputs |",
        "|---" * (9 + len(bases)) + "|",
    ]
    for r in summary_rows(record):
        ratios = "".join(f"{_ratio(r['ratios'].get(b))} | " for b in bases)
        lines.append(
            f"| {r['workload']} | {r['arm']} | {_i(r['requests'])} | {_f(r['wall_s'])} | {_f(r['tok_s'], 0)} | {ratios}"
            f"{_i(r['retractions'])} ({_i(r['retracted_requests'])}) | {_calls(r)} | {_f(r['floor_s'])} | "
            f"{_verdict(r['outputs_ok'], r['outputs'])} |"
        )
    return lines


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"**{x:.3f}x**"


def _calls(r: dict) -> str:
    return _i(r["generate_calls"]) + (f" (W = {r['wave_groups']})" if r.get("wave_groups") else "")


def _verdict(ok: bool | None, text: str) -> str:
    return text if ok is None else ("ok" if ok else "FAIL")


def _pair(a: int | None, b: int | None) -> str:
    return "-" if a is None else f"{_i(a)} / {_i(b)}"


_ROWS = [
    ("wall time, s", lambda r: _f(r["wall_s"])),
    ("requests/s", lambda r: _f(r["requests_per_s"])),
    ("output tokens/s", lambda r: _f(r["output_tokens_per_s"], 0)),
    ("total tokens/s", lambda r: _f(r["total_tokens_per_s"], 0)),
    ("generate calls", _calls),
    ("prefill tokens computed (saving vs logical)", lambda r: f"{_i(r['prefill_tokens_computed'])} ({_pct(r['prefill_saving'])})"),
    ("cached tokens (SGLang meta_info)", lambda r: _i(r["cached_tokens"])),
    ("retractions (requests)", lambda r: f"{_i(r['retractions'])} ({_i(r['retracted_requests'])})"),
    ("peak KV held / in use (of pool)", lambda r: f"{_pct(r['peak_kv_held_frac'])} / {_pct(r['peak_kv_used_frac'])} of {_i(r['kv_total'])}"),
    ("BatchLLM prefix tokens computed / planned",
     lambda r: _pair(r["batchllm_prefix_tokens_computed"], r["batchllm_prefix_tokens_planned"])),
    ("BatchLLM prefix recomputations", lambda r: _i(r["batchllm_prefix_recomputations"])),
    ("decode rows on the fused kernel / sharing a prefix (of all)",
     lambda r: "-" if r.get("batchllm_decode_rows") is None else
     f"{_i(r['batchllm_cascade_rows'])} / {_i(r['batchllm_cascade_shared_rows'])} (of {_i(r['batchllm_decode_rows'])})"),
    ("prefill rows on the fused kernel / sharing a prefix",
     lambda r: "-" if r.get("batchllm_extend_rows") is None else
     f"{_i(r['batchllm_extend_rows'])} / {_i(r['batchllm_extend_shared_rows'])}"),
    ("BatchLLM peak pinned tokens / groups live", lambda r: _pair(r["peak_pinned_tokens"], r["peak_groups_live"])),
    ("decode-only steps: timed, median ms (median rows)",
     lambda r: "-" if r.get("decode_step_ms") is None else
     f"{_i(r['decode_steps_timed'])}, {_f(r['decode_step_ms'], 1)} ({_f(r['decode_step_rows'], 0)})"),
    ("mixed steps: timed, median ms",
     lambda r: "-" if r.get("mixed_step_ms") is None else f"{_i(r['mixed_steps_timed'])}, {_f(r['mixed_step_ms'], 1)}"),
    ("seconds in decode / mixed / prefill steps",
     lambda r: "-" if "decode_steps_s" not in r else
     f"{_f(r['decode_steps_s'])} / {_f(r['mixed_steps_s'])} / {_f(r['extend_steps_s'])}"),
    ("Triton kernels compiled in the timed window (s)",
     lambda r: "-" if "triton_compiles" not in r else f"{_i(r['triton_compiles'])} ({_f(r['triton_compile_s'])})"),
    ("steps, mean / max tokens per step", lambda r: f"{_i(r['steps'])}, {_f(r['mean_tokens_per_step'], 0)} / {_i(r['max_step_tokens'])}"
     + ("" if r.get("complete_step_log", True) else " (step log cut short)")),
    ("wall time / prefill floor", lambda r: _f(r["floor_ratio"]) + "x" if r["floor_ratio"] else "-"),
]


def _workload_section(w: dict, arms: list[str], pngs: list[Path]) -> list[str]:
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
        "| | " + " | ".join(arms) + " |",
        "|---" * (len(arms) + 1) + "|",
    ]
    lines += [f"| {name} | " + " | ".join(fmt(w["runs"][arm]) for arm in arms) + " |" for name, fmt in _ROWS]
    lines.append("")
    for arm, by_base in w["ratios"].items():
        lines.append(f"- {arm}: " + ", ".join(f"**{x:.3f}x** {base}" for base, x in by_base.items()) + " (total tokens/s)")
    lines += [f"- outputs of {arm}: {outputs_text(w, arm)}" for arm in arms if arm != REFERENCE]
    lines.append("")
    png = next((p for p in pngs if p.stem == slug(w["name"])), None)
    if png is not None:
        lines += [f"![{w['name']}]({png.name})", ""]
    return lines


def summary_text(record: dict) -> str:
    """The summary table for the terminal."""
    bases = _baselines(record["arms"])
    width = max([18] + [len(b) + 5 for b in bases])  # "vs " + the name, a space before
    vs = "".join(f"{'vs ' + b:>{width}}" for b in bases)
    lines = [f"{'workload':<24} {'arm':<16} {'wall s':>9} {'tok/s':>9}{vs} {'retract':>8} {'calls':>6}  outputs"]
    for r in summary_rows(record):
        ratios = "".join(f"{r['ratios'][b]:>{width - 1}.3f}x" if b in r["ratios"] else f"{'-':>{width}}" for b in bases)
        lines.append(f"{r['workload']:<24} {r['arm']:<16} {r['wall_s']:>9.2f} {r['tok_s']:>9.0f}{ratios} "
                     f"{r['retractions']:>8} {r['generate_calls']:>6}  {r['outputs']}")
    return "\n".join(lines)


# ---- charts ------------------------------------------------------------------------------

COLORS = {"vanilla": "tab:gray", "vanilla-waves": "tab:orange", "batchllm-triton": "tab:cyan", "batchllm": "tab:blue",
          "vanilla-again": "black"}


def write_charts(record: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [_workload_chart(plt, w, record["arms"], out) for w in record["workloads"]]
    if len(record["workloads"]) > 1 and any(w["ratios"] for w in record["workloads"]):
        paths.append(_summary_chart(plt, record, out))
    return paths


def _workload_chart(plt, w: dict, arms: list[str], out: Path) -> Path:
    pinned = [arm for arm in arms if "pinned_tokens" in w["runs"][arm]["series"]]
    panels = 3 + bool(pinned)
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.6 * panels), gridspec_kw={"height_ratios": [1] + [1.3] * (panels - 1)})
    fig.suptitle(f"{w['name']}: {w['description']}", fontsize=10)
    _throughput_bars(axes[0], w, arms)
    tokens, kv = axes[1], axes[2]
    for arm in arms:
        r = w["runs"][arm]
        s, color = r["series"], COLORS[arm]
        tokens.plot(s["t"], [p + d for p, d in zip(s["prefill"], s["decode"])], drawstyle="steps-post", lw=0.7, color=color, label=arm)
        total = r["kv_total"] or 1
        kv.plot(s["t"], [x / total for x in s["kv_held"]], lw=1.0, color=color, label=f"{arm}: held")
        kv.plot(s["t"], [x / total for x in s["kv_used"]], lw=0.7, ls="--", color=color, label=f"{arm}: in use incl. cache")
    tokens.set_yscale("log")
    tokens.set_ylabel("tokens in the step (prefill + decode)")
    tokens.legend(loc="upper right")
    kv.set_ylabel("KV pool fraction")
    kv.set_ylim(0, 1.05)
    kv.legend(loc="lower right", fontsize=8)
    if pinned:
        _batchllm_panel(axes[3], w, pinned)
        axes[3].set_xlim(tokens.get_xlim())  # the same time axis as the panels above
    for ax in axes[1:]:
        ax.set_xlabel("seconds since the first generate() call started")
    fig.tight_layout()
    path = out / f"{slug(w['name'])}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput_bars(ax, w: dict, arms: list[str]) -> None:
    values = [w["runs"][arm]["total_tokens_per_s"] for arm in arms]
    ax.barh(arms, values, color=[COLORS[a] for a in arms])
    for y, (arm, v) in enumerate(zip(arms, values)):
        ratios = ", ".join(f"{x:.3f}x {base}" for base, x in w["ratios"].get(arm, {}).items())
        ax.text(v, y, f" {v:,.0f}  ({w['runs'][arm]['wall_s']:.1f} s{'; ' + ratios if ratios else ''})", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("total tokens/s (prompt + output)")
    ax.set_title(f"prefill floor {w['floor']['prefill_floor_s']:.1f} s", fontsize=10)
    ax.set_xlim(0, max(values) * 1.6)


def _batchllm_panel(ax, w: dict, arms: list[str]) -> None:
    """BatchLLM's pins over time: KV tokens held by group pins (left) and live groups (right)."""
    groups = ax.twinx()
    for arm in arms:
        s = w["runs"][arm]["series"]
        ax.plot(s["t"], s["pinned_tokens"], lw=1.0, color=COLORS[arm], label=f"{arm}: pinned tokens")
        groups.plot(s["t"], s["groups_live"], lw=0.8, ls=":", color=COLORS[arm], label=f"{arm}: groups live")
    ax.set_ylabel("pinned KV tokens")
    ax.set_ylim(bottom=0)
    groups.set_ylabel("groups live")
    groups.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    groups.legend(loc="upper right", fontsize=8)


def _summary_chart(plt, record: dict, out: Path) -> Path:
    """Every ratio of every workload, one bar each (arm vs baseline)."""
    bars = [(f"{w['name']}: {arm} / {base}", x, arm) for w in record["workloads"]
            for arm, by_base in w["ratios"].items() for base, x in by_base.items()]
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[COLORS[b[2]] for b in bars])
    ax.axvline(1.0, color="black", lw=0.8)
    for y, (_, x, _) in enumerate(bars):
        ax.text(x, y, f" {x:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("throughput ratio (total tokens/s)")
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
