"""Scale check of the batch-file reader and planner (issue 10, point 8), CPU only.

Writes a file of N token-id requests (default 100,000 x 2,200 tokens: 400 groups sharing a
2,000-token prefix, 200 distinct tokens each, about 1.5 GB of JSON), then, in a fresh process,
reads and validates every line and plans the batch, printing wall time and peak memory
(`resource.getrusage` max RSS). Target: under 60 s and under 2 GB on one core.

    python scripts/bench_batch_reader.py [--requests N] [--tokens T] [--file PATH] [--keep]
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


def measure(path: str) -> None:
    from sglang_batchllm.jobs.reader import read_file
    from sglang_batchllm.planner import PlannerConfig
    from sglang_batchllm.planner.build import IncrementalPlanner

    t0 = time.perf_counter()
    result = read_file(path)
    t1 = time.perf_counter()
    planner = IncrementalPlanner(PlannerConfig())
    planner.add(r.plan for r in result.requests)
    plan = planner.plan()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"requests": len(result.requests), "bytes": result.size, "read_validate_s": round(t1 - t0, 1),
                      "plan_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1), "peak_rss_gib": round(peak, 2),
                      "groups": plan.metrics.num_shared_groups, "saving": round(plan.metrics.saving, 4)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--tokens", type=int, default=2200)
    p.add_argument("--file", help="use (or write) this file instead of a temporary one")
    p.add_argument("--keep", action="store_true", help="keep the generated file")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure)
        return
    path = args.file or os.path.join(tempfile.gettempdir(), f"batch-{args.requests}x{args.tokens}.jsonl")
    if not os.path.exists(path):
        t = time.perf_counter()
        generate(path, args.requests, args.tokens)
        print(f"wrote {path}: {os.path.getsize(path) / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    print(f"reproduce: {sys.executable} {' '.join(sys.argv)}", file=sys.stderr)
    try:
        subprocess.run([sys.executable, __file__, "--measure", path], check=True)
    finally:
        if not args.keep and not args.file:
            os.remove(path)


if __name__ == "__main__":
    main()
