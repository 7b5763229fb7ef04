#!/usr/bin/env python
"""BatchLLM against vanilla SGLang, plain and driven by hand ("waves"), on the same GPU, model
and requests; see docs/benchmarks.md.

    python scripts/bench_batch.py --quick
    # one arm per command (each fits a 10-minute GPU command); the last report has all three
    python scripts/bench_batch.py --workload authors --out bench-out/authors --arms vanilla
    python scripts/bench_batch.py --workload authors --out bench-out/authors --arms vanilla-waves
    python scripts/bench_batch.py --workload authors --out bench-out/authors --arms batchllm
"""

import sys
from pathlib import Path

# Run this working tree's package, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_batchllm.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
