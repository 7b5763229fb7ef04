"""BatchLLM's counters and gauges in SGLang's Prometheus metrics (`--enable-metrics`).

Exported by the scheduler process next to SGLang's own `sglang:*` metrics, from `STATS`
(`runtime/stats.py`), at most once per prefill round. Names: `sglang:batchllm_<name>`.
"""

from __future__ import annotations

from .stats import STATS

GAUGES = {
    "groups_live": "Shared prefix groups whose prefix is pinned now.",
    "pinned_tokens": "KV tokens held by group pins.",
    "last_step_tokens": "Tokens (prefill + riding decodes) of the last prefill or mixed step.",
}
COUNTERS = {
    "prefix_tokens_planned": "Shared-prefix tokens of the groups planned so far.",
    "prefix_tokens_computed": "Shared-prefix tokens actually prefilled (ideally = planned).",
    "prefix_recomputations": "Members that prefilled part of their group's prefix again.",
    "retractions": "Requests retracted from a decode batch.",
    "groups_done": "Shared groups finished (pin released).",
}


class BatchLLMMetrics:
    def __init__(self, labels: dict[str, str]):
        from prometheus_client import Counter, Gauge

        names = list(labels)
        self._labels = labels
        self._gauges = {k: Gauge(f"sglang:batchllm_{k}", doc, labelnames=names, multiprocess_mode="mostrecent")
                        for k, doc in GAUGES.items()}
        self._counters = {k: Counter(f"sglang:batchllm_{k}", doc, labelnames=names) for k, doc in COUNTERS.items()}
        self._exported = {k: 0 for k in COUNTERS}

    def export(self) -> None:
        snap = STATS.snapshot()
        for k, g in self._gauges.items():
            g.labels(**self._labels).set(snap[k])
        for k, c in self._counters.items():
            delta = snap[k] - self._exported[k]
            if delta > 0:
                c.labels(**self._labels).inc(delta)
                self._exported[k] = snap[k]
