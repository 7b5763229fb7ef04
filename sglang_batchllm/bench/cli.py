"""`scripts/bench_batch.py`: vanilla SGLang, vanilla driven by hand ("waves") and BatchLLM on
the same GPU, model and requests.

Phases, each arm in a fresh child process (runner.py says why):
1. build the workloads (seeded), their sharing structure and the planner's plan (CPU, here);
2. measure the bf16 matmul rate (child process; skipped with --matmul-tflops, and with
   --dry-run or --fake-engine, which assume the baseline H200's 790 TFLOP/s);
3. each arm selected with --arms over all workloads (child process each; arms.py);
4. gather the arms of earlier commands with the same --out and settings, compare every arm's
   outputs with vanilla's, write result.json / report.md / PNGs, print the table and the command.
Exit status: 0 ok, 1 outputs differ beyond the tolerance (compare.py), 2 a run failed, the
plugin was not active where it should be (or active where it should not), or bad input.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .arms import ARMS, DEFAULT_ARMS, parse_arms, plugin_problems
from .entry import command_line, run_command
from .compare import OutputTolerance
from .floor import workload_floor
from .launch import arm_spec, git_info, measure_matmul, run_engine, stored_result
from .model import ModelShape, write_llama31_8b_dir
from .record import assemble_record, workload_entry
from .report import summary_text, write_report
from .runner import BASE_ENGINE_KWARGS, RunSpec
from .workloads import WORKLOADS, Workload, WorkloadSpec, check_workload_name, sharing

QUICK_SCALE = 1 / 8
DRY_RUN_TFLOPS = 790.0  # bf16 matmul on the baseline's H200 (docs/baseline.md)
FAKE_ENGINE_TFLOPS = DRY_RUN_TFLOPS  # --fake-engine measures nothing: the floors use this rate
VANILLA_BACKENDS = ("triton", "flashinfer", "fa3")
# Engine keywords the fake engine honours besides batchllm_*: SGLang's own KV pool cap, so
# `--engine-arg max_total_tokens=N` sizes the fake's pool as it would the real one's.
FAKE_ENGINE_KEYWORDS = ("max_total_tokens",)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench_batch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", action="append", type=_workload_name, metavar="NAME",
                   help=f"{', '.join(WORKLOADS)} or jsonl:PATH; repeatable (default: authors)")
    p.add_argument("--quick", action="store_true", help=f"scale workloads by {QUICK_SCALE:g} (a few minutes on an H200 for the three arms)")
    p.add_argument("--scale", type=float, help="scale the number of groups/documents/requests (overrides --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ordered", action="store_true", help="keep requests in generation order instead of shuffling")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model-config", metavar="DIR", help="model directory with a config.json (dummy weights); "
                       "default: a generated Llama-3.1-8B-architecture config")
    model.add_argument("--bundled-model", action="store_true", help="the small bundled Llama model")
    p.add_argument("--arms", type=_arms, default=DEFAULT_ARMS, metavar="A,B,...",
                   help=f"arms to run in this command, in this order: {', '.join(ARMS)} (default: {','.join(DEFAULT_ARMS)}); "
                        "arms run earlier into the same --out with the same settings join the report; "
                        "vanilla-again gives an A/A run that measures noise")
    p.add_argument("--vanilla-backend", default="triton", choices=VANILLA_BACKENDS, help="vanilla arms' attention backend")
    p.add_argument("--batchllm-backend", default="batchllm", help="BatchLLM arm's attention backend (default: BatchLLM's own: the fused cascade kernel for decode rows that share a cached prefix, SGLang's Triton kernels for the rest; 'triton' gives BatchLLM's scheduling alone, as the batchllm-triton arm does)")
    p.add_argument("--engine-arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="extra sglang.Engine keyword for every arm's engine (value parsed as JSON if it can be)")
    p.add_argument("--batchllm", action="append", default=[], type=_key_value, metavar="FIELD=VALUE",
                   help="BatchLLM setting for the batchllm arm's engine (passed as batchllm_FIELD=VALUE)")
    p.add_argument("--match-tokens", type=int, default=OutputTolerance.first_tokens, metavar="K",
                   help="a request agrees when its first K output tokens match vanilla's (default %(default)s)")
    p.add_argument("--match-fraction", type=float, default=OutputTolerance.min_fraction, metavar="F",
                   help="outputs pass when at least this fraction of requests agree (default %(default)s)")
    p.add_argument("--matmul-tflops", type=float, help="use this bf16 matmul rate instead of measuring it")
    p.add_argument("--no-plan", action="store_true", help="do not run the planner on the workloads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="reuse runs of the selected arms already in --out whose settings match")
    p.add_argument("--dry-run", action="store_true", help="build workloads, plan and floor; start no engine")
    p.add_argument("--fake-engine", action="store_true",
                   help="CPU smoke test: the whole pipeline with a fake engine (bench/fake.py) instead of SGLang; "
                        f"the floors assume {FAKE_ENGINE_TFLOPS:g} TFLOP/s unless --matmul-tflops is given")
    p.add_argument("--report-only", metavar="RESULT_JSON", help="re-render report.md and PNGs from a result.json")
    p.add_argument("--out", help="output directory (default: bench-out/<UTC time>)")
    args = p.parse_args(argv)
    _flags_that_need_another(p, args)
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


def _flags_that_need_another(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A flag that does nothing in this command is an error, not silently ignored."""
    given = [a.option_strings[0] for a in p._actions
             if a.option_strings and a.dest != "help" and getattr(args, a.dest) != a.default]
    if args.report_only:
        extra = [f for f in given if f not in ("--report-only", "--out")]
        if extra:
            p.error(f"--report-only re-renders a result.json and runs nothing; {', '.join(extra)} "
                    "would have no effect (only --out goes with it)")
    if args.dry_run:
        extra = [f for f in given if f in ("--arms", "--resume", "--fake-engine", "--match-tokens",
                                           "--match-fraction", "--no-progress")]
        if extra:
            p.error(f"--dry-run starts no engine; {', '.join(extra)} would have no effect")


def _workload_name(name: str) -> str:
    try:
        check_workload_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name


def _arms(text: str) -> tuple[str, ...]:
    try:
        return parse_arms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def engine_kwargs(args: argparse.Namespace, model_dir: str, engine: str, backend: str | None = None) -> dict:
    """An arm's engine keywords; `backend` is the arm's own attention backend, if it has one."""
    kwargs = {**BASE_ENGINE_KWARGS, "model_path": model_dir, **dict(args.engine_arg)}
    if engine == "vanilla":
        return {**kwargs, "attention_backend": backend or args.vanilla_backend}
    return {**kwargs, "attention_backend": backend or args.batchllm_backend,
            **{f"batchllm_{k}": v for k, v in args.batchllm}}


def fake_engine_kwargs(engine: str, kwargs: dict) -> dict:
    """What the fake engine (bench/fake.py) gets in place of an engine's keywords."""
    return {"fake_as": engine, **{k: v for k, v in kwargs.items() if k.startswith("batchllm_") or k in FAKE_ENGINE_KEYWORDS}}


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
    return command_line(argv, "scripts/bench_batch.py")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.report_only:
        return _report_only(args.report_only, args.out)
    command = _command(argv)
    return run_command(lambda: _run(args, command), command,
                       "finished arm runs stay in OUT/raw/; the same command with --resume reuses them")


def _report_only(result_json: str, out: str | None) -> int:
    try:
        paths = write_report(json.loads(Path(result_json).read_text()), out or Path(result_json).parent)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


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
    phases = 2 + len(args.arms)

    print(f"[1/{phases}] {len(workloads)} workload(s): sharing structure and plan", flush=True)
    facts = [_facts(w, args.no_plan) for w in workloads]

    print(f"[2/{phases}] bf16 matmul rate", flush=True)
    if args.matmul_tflops or args.dry_run or args.fake_engine:
        assumed = "dry run" if args.dry_run else "fake engine"
        matmul = {"matmul_tflops": args.matmul_tflops or (DRY_RUN_TFLOPS if args.dry_run else FAKE_ENGINE_TFLOPS),
                  "gemm": "given" if args.matmul_tflops else f"assumed ({assumed}: H200, docs/baseline.md)"}
    else:
        matmul = measure_matmul(out)
    tflops = matmul["matmul_tflops"]
    entries = [workload_entry(w, share, workload_floor(model, share, w.num_requests, w.output_tokens, tflops), plan)
               for w, share, plan in facts]
    if args.dry_run:
        for e in entries:
            print(f"  {e['name']}: prefill floor {e['floor']['prefill_floor_s']:.1f} s at {tflops:.0f} TFLOP/s")
        return 0

    def spec_of(arm: str) -> RunSpec:
        return _arm_spec(args, arm, workloads, specs, model_dir, out)

    results = {}
    for phase, arm in enumerate(args.arms, 3):
        print(f"[{phase}/{phases}] {arm}: {ARMS[arm].description}", flush=True)
        results[arm] = run_engine(arm, spec_of(arm), args.resume, command)
    results.update(_earlier_arms(spec_of, exclude=results))

    header = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git": git_info(),
        "host": {k: matmul.get(k) for k in ("gpu", "gpu_memory_gib", "torch", "cuda")}
        | {"sglang": _version("sglang"), "python": platform.python_version()},
        "matmul": matmul,
        "model": {"dir": model_dir, "name": model_name, "shape": model.to_dict()},
        "tolerance": {"first_tokens": args.match_tokens, "min_fraction": args.match_fraction},
    }
    tolerance = OutputTolerance(args.match_tokens, args.match_fraction)
    record = assemble_record(header, results, entries, workloads, tolerance, plugin_problems(results))
    paths = write_report(record, out)
    print("\n" + summary_text(record))
    print(f"Wrote {out}/: {', '.join(p.name for p in paths)}")
    for problem in record["problems"]:
        print(f"error: {problem}", file=sys.stderr)
    print(f"Reproduce with: {command}")
    return 2 if record["problems"] else (0 if record["ok"] else 1)


def _facts(w: Workload, no_plan: bool) -> tuple[Workload, Any, dict | None]:
    share, plan = sharing(r.input_ids for r in w.requests), None if no_plan else plan_workload(w)
    if plan is None:
        plan_text = "not planned"
    elif "saving" in plan:
        plan_text = f"plan saving {plan['saving']:.1%} in {plan['time_s']:.2f} s"
    else:
        plan_text = plan["error"]
    print(f"  {w.name}: {w.num_requests} requests, {w.prompt_tokens:,} prompt tokens, "
          f"best saving {share.ideal_saving:.1%}, {plan_text}", flush=True)
    return w, share, plan


def _arm_spec(args: argparse.Namespace, arm: str, workloads: Sequence[Workload], specs: Sequence[WorkloadSpec],
              model_dir: str, out: Path) -> RunSpec:
    engine = ARMS[arm].engine
    kwargs = engine_kwargs(args, model_dir, engine, ARMS[arm].attention_backend)
    if args.fake_engine:
        engine, kwargs = "fake", fake_engine_kwargs(engine, kwargs)
    progress = "off" if args.no_progress else ("tty" if sys.stderr.isatty() else "lines")
    return arm_spec(arm, engine, ARMS[arm].driver, kwargs, workloads, specs, model_dir, out, progress)


def _earlier_arms(spec_of: Callable[[str], RunSpec], exclude: dict) -> dict[str, dict]:
    """Arms not run by this command whose runs in OUT/raw/ match what this command would run:
    how arms run in separate commands come together in one report."""
    found = {}
    for arm in ARMS:
        if arm in exclude:
            continue
        result = stored_result(spec_of(arm))
        if result is not None:
            print(f"[{arm}] from an earlier command: {result['reused_from']}", flush=True)
            found[arm] = result
    return found


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
