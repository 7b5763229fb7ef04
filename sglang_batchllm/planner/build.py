"""Entry points: plan a batch at once, or grow a plan as requests arrive."""

from __future__ import annotations

from collections.abc import Iterable

from .inputs import PlannerConfig, PlanRequest
from .paper import paper_groups
from .result import Plan, assemble_plan
from .select import GroupSolver
from .tree import PrefixTree


class IncrementalPlanner:
    """Accepts requests a few at a time; `plan()` equals `build_plan` of everything added.

    The radix tree grows in place and the solver's cached results survive outside the paths
    that new requests touched, so re-planning does not start over. `add` is all-or-nothing:
    a batch with a bad or duplicate request is rejected whole and nothing of it is added.
    """

    def __init__(self, config: PlannerConfig = PlannerConfig()) -> None:
        if not isinstance(config, PlannerConfig):
            raise TypeError(f"config must be a PlannerConfig, got {type(config).__name__}")
        self.config = config
        self._tree = PrefixTree()
        self._solver = GroupSolver(config)

    def __len__(self) -> int:
        return len(self._tree)

    def add(self, requests: Iterable[PlanRequest] | PlanRequest) -> None:
        batch = [requests] if isinstance(requests, PlanRequest) else list(requests)
        self._tree.check_new(batch)
        for req in batch:
            self._tree.insert(req)

    def plan(self) -> Plan:
        specs = self._solver.extract(self._tree)
        return assemble_plan(self.config, specs, dict(self._tree.requests))

    def paper_plan(self) -> Plan:
        """The plan the paper's flattening rule gives (single level), for comparison."""
        specs = paper_groups(self._tree, self.config)
        return assemble_plan(PlannerConfig(self.config.page_size, 1, self.config.min_prefix_tokens), specs,
                             dict(self._tree.requests))

    def check_invariants(self) -> None:
        self._tree.check_invariants()


def build_plan(requests: Iterable[PlanRequest], config: PlannerConfig = PlannerConfig()) -> Plan:
    """Plan a whole batch. Raises `PlanInputError` on a duplicate id or a non-`PlanRequest`."""
    planner = IncrementalPlanner(config)
    planner.add(requests)
    return planner.plan()
