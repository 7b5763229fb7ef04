"""Benchmark BatchLLM against vanilla SGLang, plain and driven by hand (`scripts/bench_batch.py`,
docs/benchmarks.md).

| module | concept |
|---|---|
| `workloads` | named, seeded request lists and their sharing structure |
| `model` | the model config (default: Llama-3.1-8B architecture) and its shape numbers |
| `floor` | the prefill compute floor and the measured matmul rate |
| `step_recorder` | per-step measurement inside the scheduler process |
| `step_log` | the step log read back: a timed window, its sums and chart columns |
| `arms` | the arms: an engine and a driver each, ratios and the plugin check |
| `drivers` | how an arm splits a workload into generate calls (one call; waves) |
| `runner` | one arm over the workloads (a child process per arm) |
| `launch` | the child processes, their environments, and the arm runs kept in OUT/raw/ |
| `compare` | the output-agreement rule |
| `record` | per-arm metrics, ratios and output checks as one JSON-ready record |
| `report` | result.json, report.md and the PNG charts |
| `cli` | the command line |

Nothing here imports torch or SGLang at import time; only the child processes do.
"""
