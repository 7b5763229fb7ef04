"""BatchLLM's counters and gauges in the scheduler process.

One process-global `SchedulerStats`, written by the scheduler adapter (`runtime/scheduler.py`)
and the attention backend (`runtime/attention_backend.py`, decode-row counters)
and read by whoever wants to look: SGLang's metrics (`--enable-metrics`), the benchmark's step
recorder (`snapshot()` once per step; plain ints, no GPU sync) and the log lines. Only the
scheduler process of a BatchLLM run writes it; elsewhere every field stays 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SchedulerStats:
    active: bool = False  # a BatchLLM scheduler adapter runs in this process
    batches: int = 0  # batches handed to the planning session
    groups_live: int = 0  # shared groups opened and not yet done
    groups_done: int = 0
    pinned_tokens: int = 0  # KV tokens held by group pins (counted once per node)
    prefix_tokens_planned: int = 0  # sum of the shared prefixes of the groups opened so far
    prefix_tokens_computed: int = 0  # prefix tokens the group leaders actually prefilled
    prefix_recomputations: int = 0  # a member prefilled part of its group's prefix again
    retractions: int = 0  # requests retracted from a decode batch
    last_step_tokens: int = 0  # prefill + decode tokens of the last scheduled step
    # the batchllm attention backend (in the same process as the scheduler)
    decode_rows: int = 0  # decode rows it planned (decode steps and mixed steps' decode rows)
    cascade_rows: int = 0  # of those, rows the fused cascade kernel ran
    cascade_shared_rows: int = 0  # of those, rows that read a prefix shared with other rows
    extend_rows: int = 0  # prefill rows the fused kernel ran (EXTEND steps, MIXED prefill rows)
    extend_shared_rows: int = 0  # of those, rows that read a prefix shared with other rows

    def snapshot(self) -> dict[str, int | bool]:
        return asdict(self)


STATS = SchedulerStats()


def snapshot() -> dict[str, int | bool]:
    return STATS.snapshot()
