"""The human-readable report of the CLI: what the plan shares and what it saves."""

from __future__ import annotations

from collections.abc import Sequence

from .batch_file import LineError
from .lru import CacheSimResult
from .result import Group, Plan


def group_saving(group: Group) -> int:
    """Prefill tokens this group's own segment saves: computed once instead of per request."""
    return (group.num_requests - 1) * (group.prefix_len - group.segment_start) if group.is_shared else 0


def format_report(
    plan: Plan,
    *,
    source: str = "<batch>",
    skipped: Sequence[LineError] = (),
    cache_runs: Sequence[tuple[str, CacheSimResult]] = (),
    paper: Plan | None = None,
    top: int = 10,
) -> str:
    m, cfg = plan.metrics, plan.config
    shared = [g for g in plan.groups if g.is_shared]
    alone = m.num_groups - m.num_shared_groups
    in_shared = len(plan.order) - alone
    out = [
        f"Prefix plan for {source}: {len(plan.order):,} requests"
        + (f" ({len(skipped):,} bad lines skipped, listed on stderr)" if skipped else ""),
        f"  settings        page size {cfg.page_size}, levels {cfg.levels}, min prefix {cfg.min_prefix_tokens} tokens",
        (
            f"  prefill tokens  {m.logical_prefill_tokens:,} in prompts -> {m.physical_prefill_tokens:,} computed"
            f" (saving {m.saving:.1%})"
        ),
        (
            f"  groups          {m.num_shared_groups:,} shared prefixes hold {in_shared:,} requests;"
            f" {alone:,} requests run alone"
        ),
    ]
    sizes = {k: v for k, v in m.group_size_histogram.items() if k > 1 or alone == 0}
    if sizes:
        out.append("  group sizes     " + _histogram(sizes))
    if cfg.levels > 1 and shared:
        by_level: dict[int, int] = {}
        for g in shared:
            by_level[g.level] = by_level.get(g.level, 0) + 1
        out.append("  nesting         " + ", ".join(f"level {k}: {v:,}" for k, v in sorted(by_level.items())))
    if paper is not None:
        out.append(
            f"  paper's rule    {paper.metrics.physical_prefill_tokens:,} computed (saving {paper.metrics.saving:.1%},"
            f" {paper.metrics.num_shared_groups:,} shared prefixes)"
        )
    if cache_runs:
        out.append("")
        sim = cache_runs[0][1]
        batching = f"prefill batches of {sim.prefill_tokens:,} tokens" if sim.prefill_tokens else "one request at a time"
        out.append(f"  an LRU prefix cache of {sim.capacity_tokens:,} tokens instead (simulated: {batching},"
                   " prompt tokens only)")
        for label, run in cache_runs:
            out.append(
                f"    {label:<14} computes {run.computed_tokens:,} tokens (saving {run.saving:.1%}),"
                f" {run.computed_tokens - m.physical_prefill_tokens:+,} vs this plan"
            )
    if shared and top > 0:
        best = sorted(shared, key=lambda g: (-group_saving(g), g.gid))[:top]
        out.append("")
        out.append(f"  top {len(best)} of {len(shared):,} shared prefixes by tokens saved")
        out.append("      gid  level  requests   prefix  own segment  saves tokens  decode share  first member")
        for g in best:
            out.append(
                f"    {g.gid:>5}  {g.level:>5}  {g.num_requests:>8,}  {g.prefix_len:>7,}  {g.prefix_len - g.segment_start:>11,}"
                f"  {group_saving(g):>12,}  {g.decode_share:>12.4f}  {g.members[0] if g.members else '-'}"
            )
    return "\n".join(out)


def _histogram(sizes: dict[int, int], limit: int = 8) -> str:
    items = sorted(sizes.items())
    parts = [f"{n:,} x {size}" for size, n in items[:limit]]
    if len(items) > limit:
        rest = items[limit:]
        parts.append(f"{sum(n for _, n in rest):,} x {rest[0][0]}..{rest[-1][0]}")
    return ", ".join(parts) + "  (groups x requests)"
