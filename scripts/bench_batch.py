#!/usr/bin/env python
"""Vanilla SGLang vs BatchLLM on the same GPU, model and requests; see docs/benchmarks.md.

    python scripts/bench_batch.py --quick
    python scripts/bench_batch.py --workload authors --out bench-out/authors
"""

import sys
from pathlib import Path

# Run this working tree's package, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_batchllm.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
