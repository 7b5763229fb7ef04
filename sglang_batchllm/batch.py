"""`python -m sglang_batchllm.batch INPUT.jsonl -o OUTPUT.jsonl [runner flags] [SGLang / --batchllm-* flags]`

Runs a batch file (OpenAI batch input lines, or native `text`/`input_ids` lines) through
BatchLLM and writes OpenAI batch output lines as requests finish. Re-running the same command
resumes: requests already in the output are skipped. `--dry-run` checks every line and prints
the prefix plan with no GPU.

Flags: the runner's own (below) and `--batchllm-*` are parsed here; every other flag goes to
SGLang's `ServerArgs` parser as `python -m sglang_batchllm.launch_server` would get it (with the
bundled model when no `--model-path` is given), so any SGLang flag works and a misspelled one is
refused by SGLang's own parser. Exit status: 0 done, 1 bad input or a run that failed, 2 bad
usage, 130 interrupted (what was written is kept).
"""

from __future__ import annotations

import argparse
import os
import sys

from .argtypes import non_negative_int, positive_int
from .config import BatchLLMConfig, ConfigError, cli_fields, flag_name
from .jobs.output import LineFile, ResumeError, error_line, open_output
from .jobs.progress import ProgressBar, Tally, summary
from .jobs.reader import DEFAULT_MAX_NEW_TOKENS, ON_ERROR_CHOICES, ReadResult, as_identity, read_file
from .jobs.records import BatchFileError
from .jobs.runner import DEFAULT_WINDOW, RunOptions, plan_windows, run_job
from .jobs.tokenizer import HFEncoder, model_context_len
from .planner.inputs import PlannerConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sglang_batchllm.batch",
        description="Run a JSONL batch file through SGLang with BatchLLM; OpenAI batch output, resumable. "
                    "Any other flag is an SGLang flag (see python -m sglang_batchllm.launch_server --help).",
    )
    p.add_argument("input", help="JSONL file: OpenAI batch lines (custom_id/method/url/body) or native lines "
                   "(text|input_ids, id, sampling_params)")
    p.add_argument("-o", "--output", help="output JSONL (OpenAI batch output); required unless --dry-run")
    p.add_argument("--errors", metavar="PATH", help="failed requests and skipped lines (default OUTPUT.errors.jsonl)")
    p.add_argument("--window", type=positive_int, default=DEFAULT_WINDOW, metavar="N",
                   help=f"submit at most N requests at once, in plan order (default {DEFAULT_WINDOW:,})")
    p.add_argument("--ordered", action="store_true", help="write the output in input order (buffers lines)")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="stop",
                   help="on a bad line: stop before running anything (default) or skip it")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"decode budget of lines that give none (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--dry-run", action="store_true", help="validate every line and print the plan; no GPU")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (auto: on a terminal)")
    defaults = BatchLLMConfig()
    for f in cli_fields():
        p.add_argument(flag_name(f.name), dest=f"batchllm_{f.name}", metavar="N", default=None,
                       help=f"{f.metadata['help']} (default {getattr(defaults, f.name)})")
    # Hidden: a deterministic CPU engine for tests and demos.
    p.add_argument("--fake-engine", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fake-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def _sglang_peek(rest: list[str]) -> argparse.Namespace:
    """The few SGLang flags the runner reads too (it does not consume them)."""
    p = argparse.ArgumentParser(add_help=False)
    for name in ("--model-path", "--model", "--tokenizer-path", "--served-model-name"):
        p.add_argument(name)
    p.add_argument("--context-length", type=int)
    p.add_argument("--page-size", type=int, default=1)
    return p.parse_known_args(rest)[0]


def _batchllm_config(p: argparse.ArgumentParser, args: argparse.Namespace) -> BatchLLMConfig:
    try:
        config = BatchLLMConfig.from_env()
        given = {}
        for f in cli_fields():
            raw = getattr(args, f"batchllm_{f.name}")
            if raw is not None:
                given[f.name] = _flag_value(f, raw)
        return config.replace(**given)
    except ConfigError as err:
        p.error(str(err))


def _flag_value(f, raw: str):
    from .config import _parse  # one parser for flag and environment values

    return _parse(f, raw, source=flag_name(f.name))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    config = _batchllm_config(parser, args)
    if not args.dry_run and not args.output:
        parser.error("-o/--output is required (or pass --dry-run)")
    if args.fake_delay and not args.fake_engine:
        parser.error("--fake-delay is the fake engine's; it needs --fake-engine")
    if args.dry_run:  # the same command with --dry-run added is fine; say what it leaves out
        unused = [flag for flag, given in (("--errors", args.errors is not None), ("--ordered", args.ordered),
                                           ("--progress", args.progress != "auto"),
                                           ("--fake-engine", args.fake_engine)) if given]
        if unused:
            print(f"warning: --dry-run runs and writes nothing, so {', '.join(unused)} "
                  f"{'has' if len(unused) == 1 else 'have'} no effect", file=sys.stderr)
    sg = _sglang_peek(rest)
    from . import bundled_model

    model_dir = sg.model_path or sg.model or bundled_model.model_dir()
    tokenizer_dir = sg.tokenizer_path or model_dir
    context_len = sg.context_length or model_context_len(model_dir)
    planner_config = PlannerConfig(page_size=sg.page_size, levels=config.levels,
                                   min_prefix_tokens=config.min_prefix_tokens)

    result = _read(args, HFEncoder(tokenizer_dir, lazy=True), context_len)
    if result is None:
        return 1
    for error in result.errors:
        print(f"skipped {error}", file=sys.stderr)
    if args.dry_run:
        print(_preview(result, planner_config, args.window, model_dir))
        return 0 if result.requests else 1
    return _run(args, rest, config, planner_config, result, model_dir, sg)


def _read(args, encoder: HFEncoder, context_len: int | None) -> ReadResult | None:
    try:
        return read_file(args.input, encoder=encoder, on_error=args.on_error,
                         default_max_new_tokens=args.max_new_tokens, context_len=context_len)
    except BatchFileError as exc:
        hint = "\n(nothing was run; fix the line, or pass --on-error skip)" if exc.error is not None else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return None


def _preview(result: ReadResult, config: PlannerConfig, window: int, model_dir: str) -> str:
    from .planner.build import IncrementalPlanner
    from .planner.report import format_report

    if not result.requests:
        return f"{result.source}: no good lines ({len(result.errors):,} bad)"
    planner = IncrementalPlanner(config)
    planner.add(r.plan for r in result.requests)
    plan = planner.plan()
    lines = [format_report(plan, source=result.source, skipped=result.errors)]
    segment_tokens = sum(g.prefix_len - g.segment_start for g in plan.groups if g.is_shared)
    try:
        from .bench.model import ModelShape

        kv = ModelShape.from_config_dir(model_dir).kv_bytes_per_token
        pinned = f"{segment_tokens:,} tokens = {segment_tokens * kv / 2**30:.2f} GiB of KV ({kv:,} B a token)"
    except Exception:  # noqa: BLE001 - a config we cannot read: give tokens only
        pinned = f"{segment_tokens:,} tokens"
    windows = -(-len(result.requests) // window)
    lines.append(f"  pinned KV       shared prefixes hold {pinned} if all were pinned at once; the scheduler"
                 " pins a group's prefix only while the group runs")
    lines.append(f"  windows         {windows:,} of at most {window:,} requests, cut along the plan order")
    return "\n".join(lines)


def _run(args, rest, config, planner_config, result: ReadResult, model_dir: str, sg) -> int:
    errors_path = args.errors or args.output + ".errors.jsonl"
    try:
        resume = open_output(args.output, as_identity(result))
    except (ResumeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for notice in resume.notices:
        print(f"notice: {notice}", file=sys.stderr)
    todo = [r for r in result.requests if r.custom_id not in resume.done]
    tally = Tally(total=len(todo), skipped_done=len(result.requests) - len(todo), bad_lines=len(result.errors))
    out = LineFile(args.output)
    errors = LineFile(errors_path, truncate=True)  # failures are retried on every run, so rewritten
    errors.write([error_line(None, "invalid_request", str(e)) for e in result.errors])
    if not todo:
        print(summary(tally, output=args.output, errors=errors_path, retractions=0, interrupted=False),
              file=sys.stderr)
        return 0
    try:
        backend = _backend(args, rest, config, model_dir, sg)
    except SystemExit as exc:  # SGLang's parser refusing a flag, or the engine refusing to start
        return exc.code if isinstance(exc.code, int) else (print(exc.code, file=sys.stderr) or 1)
    bar = ProgressBar(tally, enabled=args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    interrupted = False
    try:
        run_job(todo, backend, out, errors, tally, bar, planner_config,
                RunOptions(window=args.window, ordered=args.ordered))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        out.close()
        errors.close()
        backend.shutdown()
    print(summary(tally, output=args.output, errors=errors_path, retractions=backend.retractions,
                  interrupted=interrupted), file=sys.stderr)
    if interrupted:
        return 130
    return 1 if tally.failed else 0


def _backend(args, rest, config, model_dir, sg):
    if args.fake_engine:
        from .jobs.engines import FakeBackend

        return FakeBackend(delay=args.fake_delay)
    from .compat import device_in_argv, require_cuda

    require_cuda(device_in_argv(rest), what="running a batch (without --dry-run)")
    from .jobs.engines import SGLangBackend
    from .launch_server import server_args_from_argv

    server_args = server_args_from_argv(list(rest))
    name = sg.served_model_name or os.path.basename(os.path.normpath(model_dir))
    return SGLangBackend(server_args, config.replace(enable=True), name)


if __name__ == "__main__":
    sys.exit(main())
