"""Scale check of the batch-file reader and planner (issue 10, point 8), CPU only.

Writes a file of N token-id requests (default 100,000 x 2,200 tokens: 400 groups sharing a
2,000-token prefix, 200 distinct tokens each, about 1.5 GB of JSON), then, in a fresh process,
reads and validates every line and plans the batch, printing wall time and peak memory
(`resource.getrusage` max RSS). Target: under 60 s and under 2 GB on one core.

`--text` writes native text lines instead (`{"id", "text", "max_new_tokens"}`, the same shape:
groups of 250 sharing a prefix text of about 2,000 tokens, then about 200 tokens of their own),
in words of the bundled model's corpus, and the measurement tokenizes them with the bundled
tokenizer (sglang_batchllm/bundled_model), as `python -m sglang_batchllm.batch` does by default;
it reports the mean prompt length it got, and the tokenizer's load time apart. `--chat` writes
the same texts as OpenAI chat lines instead (the shared text as the system message, the rest as
the user's), tokenized through the bundled chat template.

Measured (a 2-core Xeon, `taskset -c 0`): token ids took 21.5 s (20.6 s reading, 0.9 s
planning) at 0.98 GiB peak for 100,000 lines of 2,200 tokens (1.42 GiB of JSON). With the
bundled tokenizer, text took 43.8 s and 1.81 GiB peak for 100,000 lines (222M tokens), the
shared prefixes tokenized once (jobs/prefix_tokens.py; 153.8 s when every line was tokenized
whole: the tokenizer alone runs about 1.7M tokens/s on one core).

    taskset -c 0 python scripts/bench_batch_reader.py [--text | --chat] [--requests N] [--tokens T] [--file PATH] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time


def generate(path: str, requests: int, tokens: int, group_size: int = 250, prefix: int = 2000) -> None:
    rng = random.Random(0)
    prefix = min(prefix, tokens - 1)
    with open(path, "w") as f:
        shared: list[int] = []
        for i in range(requests):
            if i % group_size == 0:
                shared = [1000 + i // group_size] + [rng.randrange(5, 100_000) for _ in range(prefix - 1)]
            own = [rng.randrange(5, 100_000) for _ in range(tokens - prefix)]
            f.write(json.dumps({"id": f"r{i}", "input_ids": shared + own, "max_new_tokens": 100}) + "\n")


def generate_text(path: str, requests: int, tokens: int, group_size: int = 250, prefix: int = 2000,
                  chat: bool = False) -> None:
    """Text lines of about `tokens` bundled-tokenizer tokens, groups sharing about `prefix`."""
    from sglang_batchllm import bundled_model
    from sglang_batchllm.jobs.tokenizer import HFEncoder

    corpus = open(os.path.join(bundled_model.model_dir(), "corpus.txt"), encoding="utf-8").read()
    words = sorted(set(corpus.split()))
    encoder = HFEncoder(bundled_model.model_dir())
    rng = random.Random(0)
    sample = " ".join(rng.choice(words) for _ in range(5000))
    per_word = len(encoder.encode(sample)) / 5000  # tokens a word, to size the texts
    prefix = min(prefix, tokens - 1)
    own_words = max(1, round((tokens - prefix) / per_word))
    with open(path, "w", encoding="utf-8") as f:
        shared = ""
        for i in range(requests):
            if i % group_size == 0:
                shared = f"Document {i // group_size}: " + " ".join(
                    rng.choice(words) for _ in range(round(prefix / per_word)))
            own = " ".join(rng.choice(words) for _ in range(own_words))
            if chat:
                messages = [{"role": "system", "content": shared}, {"role": "user", "content": f"Question {i}: {own}"}]
                line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"messages": messages, "max_tokens": 100}}
            else:
                line = {"id": f"r{i}", "text": f"{shared}\nQuestion {i}: {own}", "max_new_tokens": 100}
            f.write(json.dumps(line) + "\n")


def measure(path: str, text: bool = False, chat: bool = False) -> None:
    from sglang_batchllm.jobs.reader import read_file
    from sglang_batchllm.planner import PlannerConfig
    from sglang_batchllm.planner.build import IncrementalPlanner

    encoder, load_s = None, 0.0
    if text:
        from sglang_batchllm import bundled_model
        from sglang_batchllm.jobs.tokenizer import HFEncoder

        t = time.perf_counter()
        encoder = HFEncoder(bundled_model.model_dir())
        load_s = time.perf_counter() - t
    t0 = time.perf_counter()
    result = read_file(path, encoder=encoder)
    t1 = time.perf_counter()
    planner = IncrementalPlanner(PlannerConfig())
    planner.add(r.plan for r in result.requests)
    plan = planner.plan()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"mode": "chat" if chat else "text" if text else "token ids", "requests": len(result.requests),
                      "mean_prompt_tokens": round(result.prompt_tokens / max(1, len(result.requests))),
                      "tokenizer_load_s": round(load_s, 1), "cores": len(os.sched_getaffinity(0)),
                      "bytes": result.size, "read_validate_s": round(t1 - t0, 1),
                      "plan_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1), "peak_rss_gib": round(peak, 2),
                      "groups": plan.metrics.num_shared_groups, "saving": round(plan.metrics.saving, 4)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--tokens", type=int, default=2200)
    p.add_argument("--text", action="store_true", help="text lines, tokenized with the bundled tokenizer")
    p.add_argument("--chat", action="store_true", help="chat lines, through the bundled chat template")
    p.add_argument("--file", help="use (or write) this file instead of a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the generated file")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.text and args.chat:
        p.error("give one of --text and --chat")
    if args.measure:
        measure(args.measure, args.text or args.chat, args.chat)
        return
    kind = "chat" if args.chat else "text" if args.text else "ids"
    path = args.file or os.path.join(tempfile.gettempdir(), f"batch-{kind}-{args.requests}x{args.tokens}.jsonl")
    if not os.path.exists(path):
        t = time.perf_counter()
        if args.text or args.chat:
            generate_text(path, args.requests, args.tokens, chat=args.chat)
        else:
            generate(path, args.requests, args.tokens)
        print(f"wrote {path}: {os.path.getsize(path) / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    print(f"reproduce: {sys.executable} {' '.join(sys.argv)}", file=sys.stderr)
    try:
        mode = ["--chat"] if args.chat else ["--text"] if args.text else []
        subprocess.run([sys.executable, __file__, "--measure", path, *mode], check=True)
    finally:
        if not args.keep and not args.file:
            os.remove(path)


if __name__ == "__main__":
    main()
