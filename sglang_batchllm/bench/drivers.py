"""How an arm sends a workload to its engine: which requests go into which `generate` call.

A driver turns (engine, workload) into a `CallPlan`: a list of calls, each a list of indices
into `workload.requests`, plus what the report should know about the split. The runner sends
the calls one after the other inside one timed region and puts the outputs back in workload
order. Planning the calls happens before the clock starts.

- `one-call`: the whole workload in ONE `generate` call (the scheduler sees the whole batch at
  once; docs/baseline.md's default row).
- `waves`: vanilla SGLang driven the way a careful user orders a batch so that its radix cache
  helps (docs/baseline.md, "by hand (waves)"). The requests are split by shared-prefix group
  into waves; per wave one call with ONE member of each group (the leaders: each computes its
  group's prefix once, and the radix cache keeps it), then one call with the other members of
  those groups (they hit the cached prefixes). Requests that share no prefix go in a final call.

    calls:  [leaders of wave 0] [rest of wave 0] [leaders of wave 1] [rest of wave 1] ... [loners]

Wave size: a wave holds as many groups as fit, in group order, into `WAVE_FILL` of the KV pool,
a group costing its prefix once plus every member's own prompt tokens and output tokens
(`group_kv_tokens`). So the prefixes of a wave stay cached until its second call has read them,
and the second call does not retract. Uniform groups (every named workload) give waves of W
groups and a last, smaller one; a group larger than the budget gets a wave of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .workloads import BenchRequest, Workload

WAVE_FILL = 0.9  # of the KV pool: room for the scheduler's own slack (chunking, decode growth)
POOL_SIZE_KEY = "max_total_num_tokens"  # engine.get_server_info(): the scheduler's KV pool (SGLang 0.5.17)


@dataclass(frozen=True)
class CallPlan:
    calls: list[list[int]]  # indices into workload.requests; every index exactly once
    info: dict = field(default_factory=dict)  # recorded with the run (report: generate calls, W)


@dataclass(frozen=True)
class PrefixGroup:
    prefix_len: int
    members: tuple[int, ...]  # 2+ indices into workload.requests; members[0] leads (computes the prefix)


def one_call(engine: Any, workload: Workload) -> CallPlan:
    return CallPlan([list(range(workload.num_requests))], {"driver": "one-call", "calls": 1})


def waves(engine: Any, workload: Workload) -> CallPlan:
    pool = kv_pool_tokens(engine)
    groups, loners = prefix_groups(workload.requests)
    budget = int(pool * WAVE_FILL)
    packed = pack_waves(groups, workload.requests, budget)
    calls = wave_calls(packed, loners)
    sizes = [len(w) for w in packed]
    return CallPlan(calls, {
        "driver": "waves",
        "calls": len(calls),
        "kv_pool_tokens": pool,
        "fill": WAVE_FILL,
        "budget_tokens": budget,
        "groups": len(groups),
        "loners": len(loners),
        "waves": len(packed),
        "wave_groups": max(sizes, default=0),  # W: groups per wave (all but the last, for uniform groups)
        "groups_per_wave": sizes,
        "peak_wave_kv_tokens": max((sum(group_kv_tokens(g, workload.requests) for g in w) for w in packed), default=0),
    })


# driver name -> (engine, workload) -> CallPlan
DRIVERS: dict[str, Callable[[Any, Workload], CallPlan]] = {"one-call": one_call, "waves": waves}


def kv_pool_tokens(engine: Any) -> int:
    """The KV pool's size in tokens, as the started engine's scheduler reports it."""
    info = engine.get_server_info()
    pool = info.get(POOL_SIZE_KEY)
    if isinstance(pool, bool) or not isinstance(pool, int) or pool <= 0:
        raise RuntimeError(
            f"the waves driver needs the KV pool size, but engine.get_server_info() has "
            f"{POOL_SIZE_KEY}={pool!r} (SGLang 0.5.17's scheduler reports it there); "
            f"on another SGLang version, find where its scheduler reports max_total_num_tokens and update POOL_SIZE_KEY"
        )
    return pool


def prefix_groups(requests: Sequence[BenchRequest]) -> tuple[list[PrefixGroup], list[int]]:
    """Shared-prefix groups (2+ members each) and the requests that share nothing.

    Derived from the prompts by the planner's one-level grouping (page size 1), not taken from
    the generator: one rule serves the named workloads and JSONL files alike, and it is the
    grouping BatchLLM's scheduler works from with its default settings (levels 1, the same
    minimum prefix), so the waves arm and the BatchLLM arm split the batch the same way."""
    from sglang_batchllm.planner import PlannerConfig, PlanRequest, build_plan

    plan = build_plan([PlanRequest(r.rid, r.input_ids, r.max_new_tokens) for r in requests],
                      PlannerConfig(page_size=1, levels=1))
    index = {r.rid: i for i, r in enumerate(requests)}
    groups, loners = [], []
    for g in plan.groups:
        members = tuple(index[rid] for rid in g.members)
        if g.is_shared:
            groups.append(PrefixGroup(g.prefix_len, members))
        else:
            loners.extend(members)
    return groups, sorted(loners)


def group_kv_tokens(group: PrefixGroup, requests: Sequence[BenchRequest]) -> int:
    """KV the group holds at most: its prefix once, each member's own prompt part and output."""
    own = sum(len(requests[i].input_ids) - group.prefix_len + requests[i].max_new_tokens for i in group.members)
    return group.prefix_len + own


def pack_waves(groups: Sequence[PrefixGroup], requests: Sequence[BenchRequest], budget_tokens: int) -> list[list[PrefixGroup]]:
    """Consecutive groups into waves; a wave closes when the next group would not fit."""
    packed: list[list[PrefixGroup]] = []
    used = 0
    for g in groups:
        cost = group_kv_tokens(g, requests)
        if not packed or used + cost > budget_tokens:
            packed.append([])
            used = 0
        packed[-1].append(g)
        used += cost
    return packed


def wave_calls(packed: Sequence[Sequence[PrefixGroup]], loners: Sequence[int]) -> list[list[int]]:
    """Per wave: the leaders' call, then the other members' call; the loners last."""
    calls = []
    for wave in packed:  # a shared group has 2+ members, so neither call is empty
        calls.append([g.members[0] for g in wave])
        calls.append([i for g in wave for i in g.members[1:]])
    if loners:
        calls.append(list(loners))
    return calls
