#!/usr/bin/env python
"""Issue 12's benchmark: SGLang frontend programs through `run_batch` against vanilla
`sglang.launch_server` and ours, plain and through the `sglang_batchllm.run_batch` drop-in;
see docs/frontend.md ("Measuring it") and sglang_batchllm/bench/frontend_bench.py.

    python scripts/bench_run_batch.py --dry-run                       # workload token statistics, no GPU
    python scripts/bench_run_batch.py --out bench-out/run-batch       # speed: the three arms (GPU)
    python scripts/bench_run_batch.py --equality --out bench-out/run-batch-equality   # greedy outputs (GPU)
    python scripts/bench_run_batch.py --fake-server --scale 0.01 --out /tmp/rb        # CPU pipeline check
"""

import sys
from pathlib import Path

# Run this working tree's package, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_batchllm.bench.frontend_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
