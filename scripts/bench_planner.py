"""Benchmark the global prefix planner on seeded synthetic batches (one CPU core).

    python scripts/bench_planner.py                      # every workload
    python scripts/bench_planner.py --workload large --tracemalloc

Each workload runs in a fresh child process pinned to one core, so its peak RSS (the whole
process: inputs, planner, plan) is its own. Times:
  ingest  building the `PlanRequest`s from Python lists of ints (validation + packing);
  tree    inserting them into the radix tree (`IncrementalPlanner.add`);
  plan    choosing groups, ordering them and building the `Plan` (`IncrementalPlanner.plan`);
  total   ingest + tree + plan, i.e. lists of ints in, plan out.
Before reporting, each result is checked: `Plan.check_invariants()` (not timed) and, where the
workload's structure fixes it, the exact number of groups and prefill tokens. The paper's
flattening rule runs on the same tree for comparison.

Workloads (token ids < 65536; each prompt's distinct part starts with a token drawn without
replacement, so the sharing structure is exact; input order shuffled, seeded):
  authors    400 groups x 16 = 6,400 requests, prefix 2000 + distinct 200 (the paper's)
  large      10,000 groups x 10 = 100,000 requests, prefix 2000 + distinct 200
  nested     system 500 -> 200 documents of 1500 -> 32 questions of 200: 6,400 requests
  multiturn  300 conversations x 20 turns of 100 tokens, every turn a request: 6,000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import tracemalloc
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_batchllm.planner import IncrementalPlanner, PlannerConfig, PlanRequest  # noqa: E402

WORKLOADS = ("authors", "large", "nested", "multiturn")
VOCAB = 1 << 16


def _tokens(rng: random.Random, n: int) -> array:
    return array("H", rng.randbytes(2 * n))


class _Distinct:
    """First tokens drawn without replacement: no two distinct parts start alike."""

    def __init__(self, rng: random.Random) -> None:
        self.pool = list(range(VOCAB))
        rng.shuffle(self.pool)

    def part(self, rng: random.Random, n: int) -> array:
        if not self.pool:
            raise RuntimeError("more distinct parts than token ids")
        out = _tokens(rng, n)
        out[0] = self.pool.pop()
        return out


def generate(name: str, seed: int):
    """Yield (rid, input_ids list, max_new_tokens) in shuffled order, and the expected result."""
    rng = random.Random(seed)
    if name in ("authors", "large"):
        groups, members = (400, 16) if name == "authors" else (10_000, 10)
        prefix, suffix = 2000, 200
        starts = _Distinct(rng)
        prefixes = [starts.part(rng, prefix).tobytes() for _ in range(groups)]
        order = list(range(groups * members))
        rng.shuffle(order)
        expect = {"shared_groups": groups, "physical": groups * prefix + groups * members * suffix}

        def requests():
            for i in order:
                # each member's distinct part starts with a token chosen from its index, so
                # members of one group never share beyond the prefix
                distinct = _tokens(rng, suffix)
                distinct[0] = i % members
                yield f"g{i // members}m{i % members}", array("H", prefixes[i // members]).tolist() + distinct.tolist(), 100

        return requests(), expect
    if name == "nested":
        system = _tokens(rng, 500)
        starts = _Distinct(rng)
        docs = [starts.part(rng, 1500) for _ in range(200)]
        order = [(d, q) for d in range(200) for q in range(32)]
        rng.shuffle(order)
        expect = {"levels": {1: 200 * 2000 + 6400 * 200, 2: 500 + 200 * 1500 + 6400 * 200}}

        def requests():
            for d, q in order:
                question = _tokens(rng, 200)
                question[0] = q
                yield f"d{d}q{q}", (system + docs[d] + question).tolist(), 50 + q

        return requests(), expect
    if name == "multiturn":
        starts = _Distinct(rng)
        convs = [[starts.part(rng, 100) for _ in range(20)] for _ in range(300)]
        order = [(c, t) for c in range(300) for t in range(20)]
        rng.shuffle(order)

        def requests():
            for c, t in order:
                ids = array("H")
                for turn in convs[c][: t + 1]:
                    ids.extend(turn)
                yield f"c{c}t{t}", ids.tolist(), 200

        return requests(), {}
    raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def run_one(name: str, seed: int, levels: int, page_size: int, use_tracemalloc: bool) -> dict:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    stream, expect = generate(name, seed)
    ingest, reqs = 0.0, []
    for rid, ids, max_new in stream:
        t = time.perf_counter()
        reqs.append(PlanRequest(rid, ids, max_new))
        ingest += time.perf_counter() - t
    del ids
    config = PlannerConfig(page_size=page_size, levels=levels, min_prefix_tokens=32)
    if use_tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    planner = IncrementalPlanner(config)
    planner.add(reqs)
    t1 = time.perf_counter()
    plan = planner.plan()
    t2 = time.perf_counter()
    traced = tracemalloc.get_traced_memory()[1] if use_tracemalloc else None
    tracemalloc.stop()
    paper = planner.paper_plan() if levels == 1 else None
    t3 = time.perf_counter()
    plan.check_invariants()  # self-check before reporting
    m = plan.metrics
    if page_size > 1:
        expect = {}  # the expected numbers below assume unaligned prefixes
    if "shared_groups" in expect:
        assert m.num_shared_groups == expect["shared_groups"], (m.num_shared_groups, expect)
        assert m.physical_prefill_tokens == expect["physical"], (m.physical_prefill_tokens, expect)
    if "levels" in expect and levels in expect["levels"]:
        assert m.physical_prefill_tokens == expect["levels"][levels], (m.physical_prefill_tokens, expect)
    return {
        "workload": name,
        "levels": levels,
        "page_size": page_size,
        "requests": len(reqs),
        "prompt_tokens": m.logical_prefill_tokens,
        "ingest_s": ingest,
        "tree_s": t1 - t0,
        "plan_s": t2 - t1,
        "total_s": ingest + t2 - t0,
        "paper_s": t3 - t2 if paper else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "traced_planner_peak_mb": traced / 2**20 if traced is not None else None,
        "saving": m.saving,
        "paper_saving": paper.metrics.saving if paper else None,
        "shared_groups": m.num_shared_groups,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--levels", type=int, nargs="+", default=None,
                   help="levels to run (default: 1, and 1 2 for nested/multiturn)")
    p.add_argument("--tracemalloc", action="store_true",
                   help="also trace the planner's own peak allocation (slows the timed part ~2x)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        name, levels = args.child.split(":")
        print(json.dumps(run_one(name, args.seed, int(levels), args.page_size, args.tracemalloc)))
        return
    print("command: python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    names = WORKLOADS if args.workload == "all" else (args.workload,)
    header = (f"{'workload':<10} {'lv':>2} {'requests':>8} {'tokens':>11} {'ingest s':>8} {'tree s':>7} {'plan s':>7}"
              f" {'total s':>7} {'peak RSS MB':>11} {'traced MB':>9} {'saving':>7} {'paper':>7}")
    print(header)
    for name in names:
        for levels in args.levels or ((1, 2) if name in ("nested", "multiturn") else (1,)):
            cmd = [sys.executable, __file__, "--child", f"{name}:{levels}", "--seed", str(args.seed),
                   "--page-size", str(args.page_size)] + (["--tracemalloc"] if args.tracemalloc else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            traced = f"{r['traced_planner_peak_mb']:.0f}" if r["traced_planner_peak_mb"] is not None else "-"
            paper = f"{r['paper_saving']:.2%}" if r["paper_saving"] is not None else "-"
            print(f"{name:<10} {levels:>2} {r['requests']:>8,} {r['prompt_tokens']:>11,} {r['ingest_s']:>8.2f}"
                  f" {r['tree_s']:>7.2f} {r['plan_s']:>7.2f} {r['total_s']:>7.2f} {r['peak_rss_mb']:>11.0f}"
                  f" {traced:>9} {r['saving']:>7.2%} {paper:>7}", flush=True)


if __name__ == "__main__":
    main()
