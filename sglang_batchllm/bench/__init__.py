"""Benchmark vanilla SGLang against BatchLLM (`scripts/bench_batch.py`, docs/benchmarks.md).

| module | concept |
|---|---|
| `workloads` | named, seeded request lists and their sharing structure |
| `model` | the model config (default: Llama-3.1-8B architecture) and its shape numbers |
| `floor` | the prefill compute floor and the measured matmul rate |
| `step_recorder` | per-step measurement inside the scheduler process |
| `runner` | one engine over the workloads (a child process per engine) |
| `launch` | the child processes and their environments |
| `compare` | the output-agreement rule |
| `record` | per-run metrics, ratio and output check as one JSON-ready record |
| `report` | result.json, report.md and the PNG charts |
| `cli` | the command line |

Nothing here imports torch or SGLang at import time; only the child processes do.
"""
