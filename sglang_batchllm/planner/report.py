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
        out.extend(format_cache_runs(cache_runs, m.physical_prefill_tokens))
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


def format_cache_runs(cache_runs: Sequence[tuple[str, CacheSimResult]], plan_tokens: int) -> list[str]:
    """`--kv-tokens`: the LRU simulation's lines. They say what each number is, so that nobody
    reads a simulated LRU figure as a plan that lost: the simulation is SGLang's radix cache with
    no plan, on the file's order (and on the plan's order), in an idealised engine; the plan's
    figure is its physical prefill, every shared prefix computed once and kept while its group
    runs."""
    sim = cache_runs[0][1]
    batching = (f"prefill batches of {sim.prefill_tokens:,} tokens" if sim.prefill_tokens
                else "one request at a time, the cache's best case")
    out = [
        f"  without the plan: SGLang's LRU prefix cache alone, {sim.capacity_tokens:,} KV tokens (simulated: {batching};",
        f"  prompt tokens only, no decode memory), of {sim.prompt_tokens:,} prompt tokens computes",
    ]
    for label, run in cache_runs:
        diff = run.computed_tokens - plan_tokens
        if diff > 0:
            versus = f"{diff:,} more than the plan's {plan_tokens:,}"
        elif diff == 0:
            versus = f"as many as the plan's {plan_tokens:,}"
        else:
            versus = (f"{-diff:,} fewer than the plan's {plan_tokens:,}, from prefixes the plan does not share"
                      " (shorter than min prefix, or deeper than its levels)")
        out.append(f"    in {label:<14} {run.computed_tokens:>12,} (saving {run.saving:.1%}): {versus}")
    out.append(f"  the plan's {plan_tokens:,} is its physical prefill: each shared prefix computed once and held while"
               " its group runs")
    return out


def _histogram(sizes: dict[int, int], limit: int = 8) -> str:
    items = sorted(sizes.items())
    parts = [f"{n:,} x {size}" for size, n in items[:limit]]
    if len(items) > limit:
        rest = items[limit:]
        parts.append(f"{sum(n for _, n in rest):,} x {rest[0][0]}..{rest[-1][0]}")
    return ", ".join(parts) + "  (groups x requests)"
