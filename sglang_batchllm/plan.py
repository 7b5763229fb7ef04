"""`python -m sglang_batchllm.plan BATCH.jsonl`: preview the prefix plan of a batch file.

Prints which prefixes the batch shares, how many prefill tokens the plan saves, and (with
`--kv-tokens N`) what an LRU prefix cache of N tokens would recompute on the file's order.
Exit status: 0 done, 1 bad input (`--on-error stop`) or tokenizer trouble, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from .config import BatchLLMConfig, ConfigError
from .planner import PlanInputError, PlannerConfig
from .planner.batch_file import (
    DEFAULT_MAX_NEW_TOKENS,
    ON_ERROR_CHOICES,
    BatchFileError,
    read_batch,
)
from .planner.build import IncrementalPlanner
from .planner.lru import simulate_lru
from .planner.report import format_report

PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar for files above 32 MiB (on a terminal)


class HFEncoder:
    """Text -> token ids with a Hugging Face tokenizer, the way SGLang tokenizes requests."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            from transformers import AutoTokenizer  # lazy: only text input needs it
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self.tok = AutoTokenizer.from_pretrained(path)
            self._raw = None
        else:  # `tokenizers` alone: a tokenizer.json file or a folder holding one; no chat template
            from tokenizers import Tokenizer

            file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
            self.tok, self._raw = None, Tokenizer.from_file(file)

    def encode(self, text: str) -> list[int]:
        if self._raw is not None:
            return self._raw.encode(text).ids
        return list(self.tok.encode(text))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.tok is None or not getattr(self.tok, "chat_template", None):
            raise PlanInputError(
                f"the tokenizer at {self.path} has no chat template, so 'messages' cannot be tokenized;"
                " use a chat model's tokenizer or give body.prompt"
            )
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(out, "keys") and "input_ids" in out:  # newer transformers return a BatchEncoding
            out = out["input_ids"]
        return list(out)


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
    p.add_argument("--page-size", type=_positive, default=1, metavar="N", help="KV page size of the engine (default 1)")
    settings = _settings_defaults(p)
    p.add_argument("--levels", type=_positive, default=settings.levels, metavar="K",
                   help=f"nested sharing levels (default {settings.levels}, from SGLANG_BATCHLLM_LEVELS; "
                        "1 is the paper's single level)")
    p.add_argument("--min-prefix", type=_non_negative, default=settings.min_prefix_tokens, metavar="N",
                   help=f"shortest prefix worth sharing, in tokens (default {settings.min_prefix_tokens}, "
                        "from SGLANG_BATCHLLM_MIN_PREFIX_TOKENS)")
    p.add_argument("--max-new-tokens", type=_non_negative, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"decode budget of lines that do not give one (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--kv-tokens", type=_positive, metavar="N",
                   help="also simulate an LRU prefix cache of N tokens on the file's order and on the plan's")
    p.add_argument("--prefill-tokens", type=_non_negative, default=0, metavar="N",
                   help="with --kv-tokens: simulate prefill batches of N tokens (the engine's chunked prefill"
                        " size), whose requests cannot reuse each other's prefix (default 0: one at a time)")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="stop",
                   help="on a malformed line: stop (default) or skip it (each skip is listed on stderr)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of the report")
    p.add_argument("--token-ids", action="store_true", help="with --json: include each group's prefix token ids")
    p.add_argument("--compare-paper", action="store_true", help="also report the paper's flattening rule")
    p.add_argument("--top", type=_non_negative, default=10, metavar="N", help="shared prefixes to list (default 10)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar while reading (auto: large files on a terminal)")
    return p.parse_args(argv)


def _positive(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative(text: str) -> int:
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def _lines(path: str, progress: str) -> Iterator[str]:
    if path == "-":
        yield from sys.stdin
        return
    size = os.path.getsize(path)
    show = progress == "on" or (progress == "auto" and size >= PROGRESS_MIN_BYTES and sys.stderr.isatty())
    bar = None
    if show:
        try:
            from tqdm import tqdm

            bar = tqdm(total=size, unit="B", unit_scale=True, desc="reading", file=sys.stderr)
        except ImportError:
            pass
    with open(path, encoding="utf-8") as f:
        for line in f:
            if bar is not None:
                bar.update(len(line.encode("utf-8")) if not line.isascii() else len(line))
            yield line
    if bar is not None:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = PlannerConfig(page_size=args.page_size, levels=args.levels, min_prefix_tokens=args.min_prefix)
    try:
        encoder = HFEncoder(args.tokenizer) if args.tokenizer else None
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's path or install
        print(f"error: cannot load tokenizer {args.tokenizer!r}: {exc}", file=sys.stderr)
        return 1
    try:
        requests, skipped = read_batch(
            _lines(args.batch, args.progress),
            encoder=encoder,
            on_error=args.on_error,
            default_max_new_tokens=args.max_new_tokens,
            source=args.batch,
        )
    except BatchFileError as exc:
        print(f"error: {exc}\n(nothing was planned; fix the line, or pass --on-error skip)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot read {args.batch}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for error in skipped:
        print(f"skipped {args.batch} {error}", file=sys.stderr)

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
                "kv_tokens": args.kv_tokens,
                "prefill_tokens": args.prefill_tokens,
                **{label.replace(" ", "_"): {"computed_tokens": r.computed_tokens, "saving": r.saving}
                   for label, r in cache_runs},
            }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_report(plan, source=args.batch, skipped=skipped, cache_runs=cache_runs, paper=paper,
                            top=args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
