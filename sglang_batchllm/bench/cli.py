"""`scripts/bench_batch.py`: vanilla SGLang vs BatchLLM on the same GPU, model and requests.

Phases, each engine in a fresh child process (runner.py says why):
1. build the workloads (seeded), their sharing structure and the planner's plan (CPU, here);
2. measure the bf16 matmul rate (child process; skipped with --matmul-tflops);
3. vanilla `sglang.Engine` over all workloads (child process, plugins off);
4. `sglang_batchllm.Engine` over the same workloads (child process);
5. compare outputs, write result.json / report.md / PNGs, print the table and the command.
Exit status: 0 ok, 1 outputs differ beyond the tolerance (compare.py), 2 a run failed or bad input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .compare import OutputTolerance
from .floor import workload_floor
from .model import ModelShape, write_llama31_8b_dir
from .record import add_runs, summary_rows, workload_entry
from .report import write_report
from .launch import git_info, measure_matmul, run_engine
from .runner import BASE_ENGINE_KWARGS
from .workloads import WORKLOADS, Workload, WorkloadSpec, check_workload_name, sharing

QUICK_SCALE = 1 / 8
DRY_RUN_TFLOPS = 790.0  # bf16 matmul on the baseline's H200 (docs/baseline.md)
VANILLA_BACKENDS = ("triton", "flashinfer", "fa3")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench_batch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", action="append", type=_workload_name, metavar="NAME",
                   help=f"{', '.join(WORKLOADS)} or jsonl:PATH; repeatable (default: authors)")
    p.add_argument("--quick", action="store_true", help=f"scale workloads by {QUICK_SCALE:g} (about 2 minutes on an H200)")
    p.add_argument("--scale", type=float, help="scale the number of groups/documents/requests (overrides --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ordered", action="store_true", help="keep requests in generation order instead of shuffling")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-config", metavar="DIR", help="model directory with a config.json (dummy weights); "
                       "default: a generated Llama-3.1-8B-architecture config")
    model.add_argument("--bundled-model", action="store_true", help="the small bundled Llama model")
    p.add_argument("--vanilla-backend", default="triton", choices=VANILLA_BACKENDS, help="vanilla run's attention backend")
    p.add_argument("--batchllm-backend", default="triton", help="BatchLLM run's attention backend")
    p.add_argument("--second-engine", default="batchllm", choices=("batchllm", "vanilla"),
                   help="vanilla gives an A/A run that measures noise (throughput and outputs)")
    p.add_argument("--engine-arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="extra sglang.Engine keyword for both engines (value parsed as JSON if it can be)")
    p.add_argument("--batchllm", action="append", default=[], type=_key_value, metavar="FIELD=VALUE",
                   help="BatchLLM setting for the BatchLLM engine (passed as batchllm_FIELD=VALUE)")
    p.add_argument("--match-tokens", type=int, default=OutputTolerance.first_tokens, metavar="K",
                   help="a request agrees when its first K output tokens match vanilla's (default %(default)s)")
    p.add_argument("--match-fraction", type=float, default=OutputTolerance.min_fraction, metavar="F",
                   help="outputs pass when at least this fraction of requests agree (default %(default)s)")
    p.add_argument("--matmul-tflops", type=float, help="use this bf16 matmul rate instead of measuring it")
    p.add_argument("--no-plan", action="store_true", help="do not run the planner on the workloads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="reuse engine runs already in --out whose settings match")
    p.add_argument("--dry-run", action="store_true", help="build workloads, plan and floor; start no engine")
    p.add_argument("--fake-engine", action="store_true",
                   help="CPU smoke test: the whole pipeline with a fake engine (bench/fake.py) instead of SGLang")
    p.add_argument("--report-only", metavar="RESULT_JSON", help="re-render report.md and PNGs from a result.json")
    p.add_argument("--out", help="output directory (default: bench-out/<UTC time>)")
    args = p.parse_args(argv)
    try:
        OutputTolerance(args.match_tokens, args.match_fraction)
    except ValueError as exc:
        p.error(str(exc))
    if args.batchllm and not args.fake_engine:
        import dataclasses

        from sglang_batchllm.config import BatchLLMConfig, ConfigError

        known = sorted(f.name for f in dataclasses.fields(BatchLLMConfig) if f.name != "enable")
        unknown = [k for k, _ in args.batchllm if k not in known]
        if unknown:
            p.error(f"--batchllm: unknown BatchLLM setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            BatchLLMConfig().replace(**dict(args.batchllm))
        except ConfigError as exc:
            p.error(f"--batchllm: {exc}")
    if args.engine_arg and not args.fake_engine:
        import dataclasses

        from sglang.srt.server_args import ServerArgs

        fields = {f.name for f in dataclasses.fields(ServerArgs)}
        unknown = [k for k, _ in args.engine_arg if k not in fields]
        if unknown:
            p.error(f"--engine-arg: {', '.join(unknown)} is not an sglang.Engine keyword (a ServerArgs field)")
    if args.vanilla_backend != "triton" and not backend_installed(args.vanilla_backend):
        p.error(f"--vanilla-backend {args.vanilla_backend} is not installed on this host; use triton (the default)")
    return args


def _workload_name(name: str) -> str:
    try:
        check_workload_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.replace("-", "_"), raw


def backend_installed(name: str) -> bool:
    if name == "flashinfer":
        return importlib.util.find_spec("flashinfer") is not None
    if name == "fa3":  # sgl_kernel's optional FA3 binary (absent on the baseline host)
        spec = importlib.util.find_spec("sgl_kernel")
        return bool(spec and spec.submodule_search_locations and
                    any(Path(d).glob("flash_ops*.so") for d in spec.submodule_search_locations))
    return True


def engine_kwargs(args: argparse.Namespace, model_dir: str, engine: str) -> dict:
    kwargs = {**BASE_ENGINE_KWARGS, "model_path": model_dir, **dict(args.engine_arg)}
    if engine == "vanilla":
        return {**kwargs, "attention_backend": args.vanilla_backend}
    return {**kwargs, "attention_backend": args.batchllm_backend, **{f"batchllm_{k}": v for k, v in args.batchllm}}


def plan_workload(w: Workload) -> dict:
    """The planner's one-level plan (page size 1): its time and best-possible saving."""
    try:
        from sglang_batchllm.planner import PlannerConfig, PlanRequest, build_plan
    except ImportError as exc:
        return {"error": f"planner not importable ({exc})"}
    try:
        t = time.perf_counter()
        plan = build_plan([PlanRequest(r.rid, r.input_ids, r.max_new_tokens) for r in w.requests],
                          PlannerConfig(page_size=1, levels=1))
        elapsed = time.perf_counter() - t
    except Exception as exc:  # the planner is being written alongside; report, do not abort
        return {"error": f"planner failed: {type(exc).__name__}: {exc}"}
    m = plan.metrics
    return {"levels": 1, "page_size": 1, "time_s": elapsed, "logical": m.logical_prefill_tokens,
            "physical": m.physical_prefill_tokens, "saving": m.saving, "num_groups": m.num_groups,
            "num_shared_groups": getattr(m, "num_shared_groups", None)}


def _model(args: argparse.Namespace, out: Path) -> tuple[str, str]:
    if args.bundled_model:
        from sglang_batchllm import bundled_model

        return bundled_model.model_dir(), "bundled Llama (small)"
    if args.model_config:
        return str(Path(args.model_config).resolve()), Path(args.model_config).name
    return write_llama31_8b_dir(out / "model-llama-3.1-8b"), "Llama-3.1-8B architecture"


def _command(argv: Sequence[str]) -> str:
    invoked = sys.argv[0] if sys.argv else ""
    script = os.path.relpath(invoked) if invoked.endswith("bench_batch.py") else "scripts/bench_batch.py"
    return shlex.join(["python", script, *argv])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_only:
        record = json.loads(Path(args.report_only).read_text())
        for path in write_report(record, args.out or Path(args.report_only).parent):
            print(path)
        return 0
    command = _command(argv)
    print(f"Reproduce with: {command}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: stop children too
    try:
        return _run(args, command)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}\nReproduce with: {command}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished engine runs stay in OUT/raw/; the same command with --resume reuses them\n"
              f"Reproduce with: {command}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace, command: str) -> int:
    out = Path(args.out or f"bench-out/{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, model_name = _model(args, out)
    model = ModelShape.from_config_dir(model_dir)
    scale = args.scale if args.scale else (QUICK_SCALE if args.quick else 1.0)
    specs = [WorkloadSpec(n, args.seed, scale, args.ordered) for n in (args.workload or ["authors"])]
    workloads = [w for s in specs for w in s.build(model)]
    names = [w.name for w in workloads]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"workload names repeat ({', '.join(repeated)}); name each once")

    print(f"[1/4] {len(workloads)} workload(s): sharing structure and plan", flush=True)
    facts = []
    for w in workloads:
        share, plan = sharing(r.input_ids for r in w.requests), None if args.no_plan else plan_workload(w)
        facts.append((w, share, plan))
        if plan is None:
            plan_text = "not planned"
        elif "saving" in plan:
            plan_text = f"plan saving {plan['saving']:.1%} in {plan['time_s']:.2f} s"
        else:
            plan_text = plan["error"]
        print(f"  {w.name}: {w.num_requests} requests, {w.prompt_tokens:,} prompt tokens, "
              f"best saving {share.ideal_saving:.1%}, {plan_text}", flush=True)

    print("[2/4] bf16 matmul rate", flush=True)
    if args.matmul_tflops or args.dry_run:
        matmul = {"matmul_tflops": args.matmul_tflops or DRY_RUN_TFLOPS,
                  "gemm": "given" if args.matmul_tflops else "assumed (dry run: H200, docs/baseline.md)"}
    else:
        matmul = measure_matmul(out)
    tflops = matmul["matmul_tflops"]
    entries = [workload_entry(w, share, workload_floor(model, share, w.num_requests, w.output_tokens, tflops), plan)
               for w, share, plan in facts]
    if args.dry_run:
        for e in entries:
            print(f"  {e['name']}: prefill floor {e['floor']['prefill_floor_s']:.1f} s at {tflops:.0f} TFLOP/s")
        return 0

    labels = ("vanilla", "batchllm" if args.second_engine == "batchllm" else "vanilla-again")
    progress = "off" if args.no_progress else ("tty" if sys.stderr.isatty() else "lines")
    results = {}
    for step, (label, engine) in enumerate(zip(labels, ("vanilla", args.second_engine)), 3):
        print(f"[{step}/4] {label}", flush=True)
        kwargs = engine_kwargs(args, model_dir, engine)
        if args.fake_engine:
            kwargs = {"fake_as": engine, **{k: v for k, v in kwargs.items() if k.startswith("batchllm_")}}
        results[label] = run_engine(label, "fake" if args.fake_engine else engine, kwargs, workloads, specs,
                                    model_dir, out, progress, args.resume)
    problems = plugin_problems(results, labels, ("vanilla", args.second_engine))

    record = {
        "schema": 1,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git": git_info(),
        "host": {k: matmul.get(k) for k in ("gpu", "gpu_memory_gib", "torch", "cuda")}
        | {"sglang": _version("sglang"), "python": platform.python_version()},
        "matmul": matmul,
        "model": {"dir": model_dir, "name": model_name, "shape": model.to_dict()},
        "labels": list(labels),
        "engines": {label: {k: r.get(k) for k in ("engine_class", "engine_kwargs", "startup_s", "reused_from", "scheduler")}
                    for label, r in results.items()},
        "tolerance": {"first_tokens": args.match_tokens, "min_fraction": args.match_fraction},
        "workloads": [],
    }
    tolerance = OutputTolerance(args.match_tokens, args.match_fraction)
    for entry, w in zip(entries, workloads):
        runs = tuple(next(r for r in results[label]["workloads"] if r["name"] == w.name) for label in labels)
        startups = tuple(results[label].get("startup_s") for label in labels)
        expected = {r.rid: r.max_new_tokens for r in w.requests}
        record["workloads"].append(add_runs(entry, labels, runs, startups, expected, tolerance))
    record["problems"] = problems
    record["ok"] = not problems and all(w["outputs"]["ok"] for w in record["workloads"])

    paths = write_report(record, out)
    _print_summary(record)
    print(f"Wrote {out}/: {', '.join(p.name for p in paths)}")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"Reproduce with: {command}")
    return 2 if problems else (0 if record["ok"] else 1)


def plugin_problems(results: dict, labels: Sequence[str], engines: Sequence[str]) -> list[str]:
    """BatchLLM's plugin must be active in the BatchLLM run's scheduler and absent from the
    vanilla run's; otherwise the comparison measures nothing (e.g. the package is not
    installed, so SGLang never finds its entry point)."""
    problems = []
    for label, engine in zip(labels, engines):
        active = results[label].get("scheduler", {}).get("batchllm_active")
        if active != (engine == "batchllm"):
            want = "active" if engine == "batchllm" else "inactive"
            hint = (" Install the package with this interpreter (python -m pip install --no-deps -e .) so SGLang's load_plugins() finds the "
                    "'batchllm' entry point." if engine == "batchllm" else "")
            problems.append(f"the BatchLLM plugin should be {want} in the {label} run's scheduler, "
                            f"but the scheduler reported batchllm_active={active}.{hint}")
    return problems


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _print_summary(record: dict) -> None:
    first, second = record["labels"]
    print(f"\n{'workload':<24} {first + ' s':>12} {second + ' s':>14} {'ratio':>7} {'floor s':>8}  outputs")
    for r, w in zip(summary_rows(record), record["workloads"]):
        print(f"{r['workload']:<24} {r['first_s']:>12.2f} {r['second_s']:>14.2f} {r['ratio']:>6.3f}x {r['floor_s']:>8.2f}  "
              f"{w['outputs']['summary']}")
