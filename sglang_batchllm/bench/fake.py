"""A stand-in for `sglang.Engine` with no GPU: `scripts/bench_batch.py --fake-engine` runs the
whole benchmark pipeline (child processes, step log, comparison, report) on a CPU, and the tests
drive `runner.run_workloads` with it.

It answers `generate` with deterministic token ids (a function of the prompt and the request
id, never of the batch) and writes the step records a scheduler with the step recorder would:
per batch of up to `batch_size` requests one EXTEND step (the whole prompts, no cache) then one
DECODE step per output token. As BatchLLM, its steps also carry BatchLLM's counters
(step_recorder.BATCHLLM_STEP_FIELDS): while a batch runs, the requests of it that share their
first token form a live group that pins their common prefix. `get_server_info()` reports the KV pool, `max_total_tokens` (SGLang's own
keyword, so `--engine-arg max_total_tokens=N` reaches it) or `KV_TOTAL`.
Knobs (engine keywords; the CLI's `--batchllm fake_flip=0.5` reaches the BatchLLM side only):
- `fake_as`: "vanilla" or "batchllm", what its scheduler header reports as plugin state;
- `batchllm_fake_flip`: fraction of requests whose outputs are changed from the first token;
- `batchllm_fake_plugin_active`: override the reported plugin state;
- `batchllm_fake_crash`: fail in the timed `generate` call;
- `batchllm_fake_step_sleep_s`: seconds each step takes.
"""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace
from typing import Any, Sequence

from .drivers import POOL_SIZE_KEY
from .step_recorder import StepWriter
from .workloads import common_prefix_len

KV_TOTAL = 1_000_000


class FakeEngine:
    def __init__(self, steps_path: str, *, fake_as: str = "vanilla", batch_size: int = 64,
                 step_sleep_s: float = 0.0005, max_total_tokens: int | None = None, **kwargs: Any):
        self.writer = StepWriter(steps_path)
        self.kv_total = max_total_tokens or KV_TOTAL
        self.as_batchllm = fake_as == "batchllm"
        self.prefix_tokens = 0  # BatchLLM's cumulative counter, as SchedulerStats keeps it
        self.flip = float(kwargs.get("batchllm_fake_flip", 0.0))
        self.plugin_active = bool(kwargs.get("batchllm_fake_plugin_active", fake_as == "batchllm"))
        self.crash = bool(kwargs.get("batchllm_fake_crash", False))
        self.batch_size = batch_size
        self.step_sleep_s = float(kwargs.get("batchllm_fake_step_sleep_s", step_sleep_s))
        self.vocab = 1000
        self.generate_calls: list[list[str]] = []
        self.flushes = 0
        self._header = False

    def generate(self, input_ids: Sequence[Sequence[int]], sampling_params: Sequence[dict], rid: Sequence[str]) -> list[dict]:
        self.generate_calls.append(list(rid))
        if self.crash and not rid[0].startswith("warmup/"):
            raise RuntimeError("fake engine: crash requested with batchllm_fake_crash")
        if not self._header:
            self._header = True
            self.writer.write("header", kv_total=self.kv_total, page_size=1, batchllm_active=self.plugin_active,
                              batchllm_config="fake" if self.plugin_active else None)
        outs = []
        for start in range(0, len(input_ids), self.batch_size):
            ids, params, rids = (x[start:start + self.batch_size] for x in (input_ids, sampling_params, rid))
            lens = [len(p) for p in ids]
            steps = max(sp["max_new_tokens"] for sp in params)
            groups = shared_prefixes(ids)
            self.prefix_tokens += sum(groups)
            self._step("EXTEND", len(ids), sum(lens), 0, sum(lens), groups)
            for k in range(1, steps):
                running = sum(1 for sp in params if sp["max_new_tokens"] > k)
                self._step("DECODE", running, 0, running, sum(lens) + k * running, groups)
            for p, sp, r in zip(ids, params, rids):
                n = sp["max_new_tokens"]
                outs.append({"output_ids": self.tokens(p, n, r),
                             "meta_info": {"prompt_tokens": len(p), "completion_tokens": n, "cached_tokens": 0}})
        self.writer.idle()
        return outs

    def tokens(self, prompt: Sequence[int], n: int, rid: str) -> list[int]:
        flipped = int(hashlib.sha256(rid.encode()).hexdigest(), 16) % 10_000 < self.flip * 10_000
        seed = prompt[-1] + (1 if flipped else 0)
        return [(seed + 7 * k) % self.vocab for k in range(n)]

    def _step(self, mode: str, reqs: int, prefill: int, decode: int, kv_used: int, groups: list[int]) -> None:
        self.writer.write("step", mode=mode, reqs=reqs, prefill=prefill, decode=decode,
                          kv_used=min(kv_used, self.kv_total), kv_evictable=0, **self._batchllm_fields(groups))
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def _batchllm_fields(self, groups: list[int]) -> dict:
        if not self.as_batchllm:
            return {}
        return {"groups_live": len(groups), "pinned_tokens": sum(groups), "prefix_tokens_planned": self.prefix_tokens,
                "prefix_tokens_computed": self.prefix_tokens, "prefix_recomputations": 0,
                "decode_rows": 0, "cascade_rows": 0, "cascade_shared_rows": 0, "extend_rows": 0,
                "extend_shared_rows": 0}

    def get_server_info(self) -> dict:
        return {POOL_SIZE_KEY: self.kv_total}

    def flush_cache(self) -> SimpleNamespace:
        self.flushes += 1
        return SimpleNamespace(success=True)

    def shutdown(self) -> None:
        self.writer.flush()


def shared_prefixes(prompts: Sequence[Sequence[int]]) -> list[int]:
    """The common prefix length of each set of 2+ prompts that start with the same token."""
    by_first: dict[int, list[Sequence[int]]] = {}
    for p in prompts:
        by_first.setdefault(p[0], []).append(p)
    return [min(common_prefix_len(ps[0], p) for p in ps[1:]) for ps in by_first.values() if len(ps) > 1]
