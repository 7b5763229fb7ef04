"""Global prefix planner (BatchLLM section 1-2): find the prefixes a whole batch shares.

Pure Python, deterministic, no torch or SGLang imports: every TP rank can run it and get the
same plan. See docs/planner.md.

    from sglang_batchllm.planner import PlanRequest, PlannerConfig, build_plan
    plan = build_plan([PlanRequest("a", ids_a, 100), ...], PlannerConfig(page_size=16))
    for group in plan.groups:  # execution order
        ...group.prefix_ids, group.members...
"""

from .build import IncrementalPlanner, build_plan
from .inputs import PlanInputError, PlannerConfig, PlanRequest
from .result import Group, Plan, PlanMetrics
from .tokens import TokenIds

__all__ = [
    "Group",
    "IncrementalPlanner",
    "Plan",
    "PlanInputError",
    "PlanMetrics",
    "PlannerConfig",
    "PlanRequest",
    "TokenIds",
    "build_plan",
]
