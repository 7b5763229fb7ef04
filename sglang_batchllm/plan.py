"""`python -m sglang_batchllm.plan BATCH.jsonl`: preview the prefix plan of a batch file.

Prints which prefixes the batch shares, how many prefill tokens the plan saves, and (with
`--kv-tokens N`) what SGLang's LRU prefix cache of N tokens would compute without the plan, on
the file's order and on the plan's (a simulation), next to the plan's own prefill.
Exit status: 0 done, 1 bad input (`--on-error stop`) or tokenizer trouble, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .argtypes import non_negative_int, positive_int
from .config import BatchLLMConfig, ConfigError, env_name, flag_name
from .jobs.reader import DEFAULT_MAX_NEW_TOKENS, ON_ERROR_CHOICES, read_file
from .jobs.records import BatchFileError
from .jobs.tokenizer import HFEncoder
from .planner import PlannerConfig
from .planner.build import IncrementalPlanner
from .planner.lru import simulate_lru
from .planner.report import format_report

PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar for files above 32 MiB (on a terminal)
OPTIMAL_MAX_LEVELS = 2  # the group solver is exact up to two levels; deeper plans are heuristic


def _settings_defaults(p: argparse.ArgumentParser) -> BatchLLMConfig:
    """`--levels` and `--min-prefix` default to the BatchLLM settings (SGLANG_BATCHLLM_*), so the
    preview plans the batch the way the server would."""
    try:
        return BatchLLMConfig.from_env()
    except ConfigError as err:
        p.error(str(err))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sglang_batchllm.plan",
        description="Find the prefixes a batch of requests shares and report the prefill tokens saved.",
    )
    p.add_argument("batch", help="JSONL file ('-' for stdin): native {input_ids|text, id, max_new_tokens} "
                   "or OpenAI batch-API lines (body.prompt / body.messages)")
    p.add_argument("--tokenizer", metavar="PATH", help="Hugging Face tokenizer (folder or hub name) for text lines")
    p.add_argument("--page-size", type=positive_int, default=1, metavar="N", help="KV page size of the engine (default 1)")
    settings = _settings_defaults(p)
    p.add_argument("--levels", type=_setting("levels"), default=settings.levels, metavar="K",
                   help=f"nested sharing levels (default {settings.levels}, from SGLANG_BATCHLLM_LEVELS; "
                        "1 is the paper's single level)")
    p.add_argument("--min-prefix", type=_setting("min_prefix_tokens"), default=settings.min_prefix_tokens, metavar="N",
                   help=f"shortest prefix worth sharing, in tokens (default {settings.min_prefix_tokens}, "
                        "from SGLANG_BATCHLLM_MIN_PREFIX_TOKENS)")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"decode budget of lines that do not give one (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--kv-tokens", type=positive_int, metavar="N",
                   help="also simulate SGLang's LRU prefix cache of N tokens without the plan, on the file's order and on the"
                        " plan's, next to the plan's own prefill")
    p.add_argument("--prefill-tokens", type=non_negative_int, default=None, metavar="N",
                   help="with --kv-tokens: simulate prefill batches of N tokens (the engine's chunked prefill"
                        " size), whose requests cannot reuse each other's prefix (default 0: one at a time)")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="stop",
                   help="on a malformed line: stop (default) or skip it (each skip is listed on stderr)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    p.add_argument("--token-ids", action="store_true", help="with --json: include each group's prefix token ids")
    p.add_argument("--compare-paper", action="store_true", help="also report the paper's flattening rule")
    p.add_argument("--top", type=non_negative_int, default=None, metavar="N",
                   help="shared prefixes to list in the report (default 10; --json lists every group)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar while reading (auto: large files on a terminal)")
    args = p.parse_args(argv)
    # A flag that only works with another one is an error alone, not silently ignored.
    if args.prefill_tokens is not None and not args.kv_tokens:
        p.error("--prefill-tokens sets the LRU simulation's prefill batch; it needs --kv-tokens N")
    if args.token_ids and not args.json:
        p.error("--token-ids adds token ids to the JSON output; it needs --json")
    if args.top is not None and args.json:
        p.error("--top limits the report's list; --json lists every group (drop one of them)")
    args.prefill_tokens = args.prefill_tokens or 0
    args.top = 10 if args.top is None else args.top
    return args


def _setting(name: str):
    """An argparse type that checks a value against `BatchLLMConfig`'s own limits, so the plan
    preview and the server accept exactly the same values."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            BatchLLMConfig().replace(**{name: value})
        except ConfigError as err:
            raise argparse.ArgumentTypeError(
                str(err).replace(f"set {flag_name(name)} or {env_name(name)}", "give").split("; give")[0]
            ) from None
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


class _ByteBar:
    """A tqdm bar over the bytes read, on a terminal for large files (or always with `on`)."""

    def __init__(self, path: str, progress: str) -> None:
        self.bar = None
        size = os.path.getsize(path) if path != "-" and os.path.isfile(path) else 0
        if progress == "on" or (progress == "auto" and size >= PROGRESS_MIN_BYTES and sys.stderr.isatty()):
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=size or None, unit="B", unit_scale=True, desc="reading", file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `--json | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit; let that go nowhere
        return 1


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.levels > OPTIMAL_MAX_LEVELS:
        print(f"warning: --levels {args.levels}: plans are optimal up to {OPTIMAL_MAX_LEVELS} levels; deeper"
              " ones use a heuristic and rarely save more", file=sys.stderr)
    config = PlannerConfig(page_size=args.page_size, levels=args.levels, min_prefix_tokens=args.min_prefix)
    try:
        encoder = HFEncoder(args.tokenizer) if args.tokenizer else None
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's path or install
        print(f"error: cannot load tokenizer {args.tokenizer!r}: {exc}", file=sys.stderr)
        return 1
    bar = _ByteBar(args.batch, args.progress)
    try:
        result = read_file(args.batch, encoder=encoder, on_error=args.on_error,
                           default_max_new_tokens=args.max_new_tokens, progress=bar)
    except BatchFileError as exc:
        bar.close()
        hint = "" if exc.error is None else "\n(nothing was planned; fix the line, or pass --on-error skip)"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return 1
    bar.close()
    skipped = result.errors
    for error in skipped:
        print(f"skipped {error}", file=sys.stderr)
    requests = [r.plan for r in result.requests]
    if not requests:
        print(f"error: {args.batch}: no good lines to plan ({len(skipped):,} bad lines skipped)", file=sys.stderr)
        return 1

    planner = IncrementalPlanner(config)
    planner.add(requests)
    plan = planner.plan()
    paper = planner.paper_plan() if args.compare_paper else None
    cache_runs = []
    if args.kv_tokens:
        for label, reqs in (("file order", requests), ("plan order", [plan.request(r) for r in plan.order])):
            cache_runs.append((label, simulate_lru(reqs, args.kv_tokens, args.page_size, args.prefill_tokens)))

    if args.json:
        out = plan.to_dict(include_token_ids=args.token_ids)
        out["source"] = args.batch
        out["skipped_lines"] = [{"line": e.line, "error": e.message} for e in skipped]
        if paper is not None:
            out["paper_rule"] = {"physical_prefill_tokens": paper.metrics.physical_prefill_tokens,
                                 "saving": paper.metrics.saving}
        if cache_runs:
            out["lru_cache"] = {
                "what": "computed prefill tokens of SGLang's LRU prefix cache alone (no plan), simulated;"
                        " compare with physical_prefill_tokens, the plan's own",
                "kv_tokens": args.kv_tokens,
                "prefill_tokens": args.prefill_tokens,
                "plan_physical_prefill_tokens": plan.metrics.physical_prefill_tokens,
                **{label.replace(" ", "_"): {"computed_tokens": r.computed_tokens, "saving": r.saving}
                   for label, r in cache_runs},
            }
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    else:
        print(format_report(plan, source=args.batch, skipped=skipped, cache_runs=cache_runs, paper=paper,
                            top=args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
