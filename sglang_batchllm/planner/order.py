"""Groups as the solvers produce them, and the order they run in.

Order rule (method doc section 2): groups whose requests decode more per prompt token run
first, so their decode steps overlap later groups' prefill. Ties break on the longer prefix,
then on the smallest request id, so the order depends on the batch's content only, never on
the input order. A nested group runs right after its parent group's own members, and the
whole family of groups under one top-level group stays contiguous: the parent's prefix can be
freed as soon as the family is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .inputs import PlanRequest


@dataclass
class GroupSpec:
    """A group before ordering. `parent` indexes the same spec list; `prefix` is packed tokens."""

    prefix_len: int
    prefix: bytes
    members: list[PlanRequest]
    parent: int | None = None
    children: list[int] = field(default_factory=list)
    # filled by `execution_order`: totals over this group and its nested groups
    decode_tokens: int = 0
    prompt_tokens: int = 0
    num_requests: int = 0
    min_rid: str = ""

    @property
    def decode_share(self) -> float:
        return self.decode_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def member_key(req: PlanRequest) -> tuple[int, str]:
    """Inside a group: longer decode first, then by id."""
    return (-req.max_new_tokens, req.rid)


def _group_key(spec: GroupSpec) -> tuple[float, int, str]:
    return (-spec.decode_share, -spec.prefix_len, spec.min_rid)


def execution_order(specs: list[GroupSpec]) -> list[int]:
    """Sort members, fill the family totals, and return spec indices in execution order."""
    for spec in specs:
        spec.children = []
        spec.members.sort(key=member_key)
        spec.decode_tokens = sum(r.max_new_tokens for r in spec.members)
        spec.prompt_tokens = sum(r.prompt_len for r in spec.members)
        spec.num_requests = len(spec.members)
        spec.min_rid = min((r.rid for r in spec.members), default="")
    roots = []
    for i, spec in enumerate(specs):
        if spec.parent is None:
            roots.append(i)
        else:
            specs[spec.parent].children.append(i)
    # children come after their parent in the solvers' output, so a reverse sweep adds up families
    for i in range(len(specs) - 1, -1, -1):
        spec = specs[i]
        if spec.parent is not None:
            assert spec.parent < i, "a parent group must precede its nested groups"
            up = specs[spec.parent]
            up.decode_tokens += spec.decode_tokens
            up.prompt_tokens += spec.prompt_tokens
            up.num_requests += spec.num_requests
            if not up.min_rid or spec.min_rid < up.min_rid:
                up.min_rid = spec.min_rid

    order: list[int] = []
    stack = sorted(roots, key=lambda i: _group_key(specs[i]), reverse=True)
    while stack:  # pre-order: a group, then its nested groups by the same rule
        i = stack.pop()
        order.append(i)
        stack.extend(sorted(specs[i].children, key=lambda j: _group_key(specs[j]), reverse=True))
    return order
