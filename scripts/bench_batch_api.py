#!/usr/bin/env python
"""GPU: the same batch file through the HTTP batch API (the openai client against
`python -m sglang_batchllm.launch_server`) and through the batch command's code path, and the
ratio of their throughputs (issue 11's acceptance point: within 10%). Measured on one H200
(2026-12-04, bundled model): api / cli 1.132, every custom_id once in both (docs/batch-api.md).

    python scripts/bench_batch_api.py                          # 2,000 requests, bundled model
    python scripts/bench_batch_api.py --input my.jsonl -- --model-path /models/llama-3.1-8b

Arms, each in a child process of its own (one engine on the GPU at a time):
- `cli`: what `python -m sglang_batchllm.batch FILE -o OUT` runs (read_file, plan, run_job over
  SGLangBackend), timed from reading the file to the last line written; engine start untimed.
- `api`: the launcher started with a fresh jobs directory and waited for (untimed); the file
  uploaded with client.files.create (untimed); timed from client.batches.create to the batch
  `completed` (polled every 0.2 s), then every custom_id checked to appear once.
Throughput = output tokens / seconds (the output files' usage). Flags after `--` go to SGLang.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this working tree's package


def write_workload(path: str, n: int, group: int, prefix_words: int, max_tokens: int, seed: int = 0) -> None:
    """n completion lines in groups of `group` sharing a `prefix_words`-word prefix, shuffled."""
    rng = random.Random(seed)
    words = "the of report system data batch model token prefix group server result value time".split()
    lines = []
    for g in range(-(-n // group)):
        prefix = " ".join(rng.choice(words) for _ in range(prefix_words))
        for m in range(group):
            if len(lines) == n:
                break
            tail = " ".join(rng.choice(words) for _ in range(40))
            lines.append({"custom_id": f"g{g}-m{m}", "method": "POST", "url": "/v1/completions",
                          "body": {"prompt": f"{prefix}\nQuestion {m}: {tail}", "max_tokens": max_tokens,
                                   "temperature": 0}})
    rng.shuffle(lines)
    with open(path, "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)


def output_tokens(path: str) -> tuple[int, list[str]]:
    tokens, ids = 0, []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            ids.append(row["custom_id"])
            tokens += row["response"]["body"]["usage"]["completion_tokens"]
    return tokens, ids


def arm_cli(args, sglang_flags: list[str]) -> dict:
    from sglang_batchllm import bundled_model
    from sglang_batchllm.config import BatchLLMConfig
    from sglang_batchllm.jobs.engines import SGLangBackend
    from sglang_batchllm.jobs.output import LineFile
    from sglang_batchllm.jobs.progress import ProgressBar, Tally
    from sglang_batchllm.jobs.reader import read_file
    from sglang_batchllm.jobs.runner import RunOptions, run_job
    from sglang_batchllm.jobs.tokenizer import HFEncoder, model_context_len
    from sglang_batchllm.launch_server import server_args_from_argv
    from sglang_batchllm.planner.inputs import PlannerConfig

    server_args = server_args_from_argv(list(sglang_flags))
    backend = SGLangBackend(server_args, BatchLLMConfig.from_env().replace(enable=True), "bench")
    out_path = os.path.join(args.work, "cli-output.jsonl")
    try:
        start = time.perf_counter()
        model_dir = server_args.tokenizer_path or server_args.model_path or bundled_model.model_dir()
        result = read_file(args.input, encoder=HFEncoder(model_dir), context_len=model_context_len(model_dir))
        out, errors = LineFile(out_path, truncate=True), LineFile(out_path + ".errors.jsonl", truncate=True)
        tally = Tally(total=len(result.requests))
        run_job(result.requests, backend, out, errors, tally, ProgressBar(tally, enabled=False),
                PlannerConfig(page_size=server_args.page_size or 1), RunOptions())
        out.close(), errors.close()
        seconds = time.perf_counter() - start
    finally:
        backend.shutdown()
    tokens, ids = output_tokens(out_path)
    return {"arm": "cli", "seconds": seconds, "output_tokens": tokens, "answered": len(ids), "unique": len(set(ids))}


def arm_api(args, sglang_flags: list[str]) -> dict:
    import httpx
    import openai

    jobs = tempfile.mkdtemp(prefix="jobs-", dir=args.work)
    cmd = [sys.executable, "-m", "sglang_batchllm.launch_server", "--port", str(args.port),
           "--batchllm-jobs-dir", jobs, *sglang_flags]
    server = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 900
        while True:  # /health_generate answers once warmup has run a request
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not come up (exit {server.returncode}): {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health_generate", timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        file = client.files.create(file=open(args.input, "rb"), purpose="batch")
        start = time.perf_counter()
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
        while batch.status not in ("completed", "failed", "cancelled"):
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        seconds = time.perf_counter() - start
        if batch.status != "completed":
            raise SystemExit(f"the batch ended {batch.status}: {batch.errors}")
        out_path = os.path.join(args.work, "api-output.jsonl")
        with open(out_path, "wb") as f:
            f.write(client.files.content(batch.output_file_id).content)
    finally:
        server.terminate()
        server.wait(timeout=120)
    tokens, ids = output_tokens(out_path)
    return {"arm": "api", "seconds": seconds, "output_tokens": tokens, "answered": len(ids), "unique": len(set(ids)),
            "failed": batch.request_counts.failed}


def main() -> int:
    argv = sys.argv[1:]
    sglang_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="batch file (default: a generated one, see --requests)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--group", type=int, default=16, help="requests sharing each prefix")
    p.add_argument("--prefix-words", type=int, default=600)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port", type=int, default=30123)
    p.add_argument("--work", default="bench-out/batch-api")
    p.add_argument("--arm", choices=("cli", "api"), help=argparse.SUPPRESS)  # a child's one arm
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    if args.arm:
        print("RESULT " + json.dumps((arm_cli if args.arm == "cli" else arm_api)(args, sglang_flags)), flush=True)
        return 0
    if args.input is None:
        args.input = os.path.join(args.work, "requests.jsonl")
        write_workload(args.input, args.requests, args.group, args.prefix_words, args.max_tokens)
    results = {}
    for arm in ("cli", "api"):
        cmd = [sys.executable, __file__, "--arm", arm, "--input", args.input, "--port", str(args.port),
               "--work", args.work, "--", *sglang_flags]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        found = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not found:
            print(f"arm {arm} failed (exit {out.returncode})", file=sys.stderr)
            return 1
        results[arm] = json.loads(found[-1][len("RESULT "):])
        print(json.dumps(results[arm]))
    rate = {a: r["output_tokens"] / r["seconds"] for a, r in results.items()}
    n = sum(1 for _ in open(args.input))
    ok = all(r["answered"] == r["unique"] == n for r in results.values())
    print(f"requests {n:,}; every custom_id once in both outputs: {ok}")
    print(f"cli {results['cli']['seconds']:.1f} s, {rate['cli']:,.0f} output tok/s; "
          f"api {results['api']['seconds']:.1f} s, {rate['api']:,.0f} output tok/s")
    ratio = rate["api"] / rate["cli"]
    print(f"api / cli throughput: {ratio:.3f} ({'within' if ratio >= 0.9 else 'NOT within'} 10%)")
    return 0 if ok and ratio >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
