"""The BatchLLM paper's first-level flattening rule, kept as a reference to compare against.

Bottom-up over the radix tree, for a child C of a node and a grandchild G of C:

    gain(G) = (leaves(G) - 1) * len(G.tokens) - len(C.tokens)

If gain > 0, G becomes a sibling of C with tokens C.tokens + G.tokens (C's tokens are then
computed once more, G's tokens are shared by G's leaves). A C left with one child is merged
with it; what stays below C is flattened into C's group. The root's children end up as the
groups. The prefix is then cut down to the page size (and to `min_prefix_tokens`) after the
fact, which the gain does not see.

The planner itself uses `select.GroupSolver`, which is optimal for one level and so never
saves less than this rule; `tests/test_planner_optimality.py` shows a batch where it saves
more. Only `levels = 1` is meaningful here.
"""

from __future__ import annotations

from .inputs import PlannerConfig, PlanRequest
from .order import GroupSpec
from .tokens import TOKEN_BYTES
from .tree import Node, PrefixTree

# A flattened entry below a node: (tokens beyond the node's end, requests, a node to read them from)
_Entry = tuple[int, list[PlanRequest], Node]


def paper_groups(tree: PrefixTree, config: PlannerConfig) -> list[GroupSpec]:
    """Single-level groups chosen by the paper's rule, page-aligned, singletons included."""
    flat: dict[int, list[_Entry]] = {}  # id(node) -> its flattened children
    for node in _post_order(tree.root):
        entries: list[_Entry] = []
        for child in node.children.values():
            c_len = child.end - child.start
            kept: list[_Entry] = []
            for g_len, reqs, where in flat.pop(id(child)):
                if (len(reqs) - 1) * g_len - c_len > 0:
                    entries.append((c_len + g_len, reqs, where))
                else:
                    kept.append((g_len, reqs, where))
            if len(kept) == 1 and not child.ends:  # C left with one child: merge them
                g_len, reqs, where = kept[0]
                entries.append((c_len + g_len, reqs, where))
            elif kept or child.ends:
                members = list(child.ends)
                for _, reqs, _ in kept:
                    members.extend(reqs)
                entries.append((c_len, members, child))
        flat[id(node)] = entries

    page, min_prefix = config.page_size, max(config.min_prefix_tokens, 1)
    specs: list[GroupSpec] = []
    alone = list(tree.root.ends)
    for length, reqs, where in flat[id(tree.root)]:
        share = length - length % page
        if len(reqs) < 2 or share < min_prefix:
            alone.extend(reqs)
        else:
            specs.append(GroupSpec(share, where.src[: share * TOKEN_BYTES], list(reqs)))
    specs.extend(GroupSpec(0, b"", [req]) for req in alone)
    return specs


def _post_order(root: Node) -> list[Node]:
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children.values())
    out.reverse()  # every node now comes after all of its descendants
    return out
