"""Choose which tree nodes become shared groups: a dynamic program over the radix tree.

Model. Opening a node `v` makes a group whose prefix is the first `share(v)` tokens of its
requests (`share` = the node's depth cut down to the page size, or 0 if that is below
`min_prefix_tokens`). Each request joins the deepest open node above it and saves that
group's prefix; each group costs its prefix once:

    saving = sum over requests of share(group)  -  sum over groups of cost(group)

With `levels = 1` a group's cost is its whole prefix (the paper's single level of sharing).
With `levels = K > 1` a group may nest in an enclosing group of level < K and costs only its
own segment `share(v) - share(parent)`; a request then reads up to K shared segments.

The solver computes, for each node and each *state* handed down by the ancestors, the best
saving of the node's subtree. A state is `(g, b, lvl)`:
    g   = share of the nearest open ancestor (what a request ending here saves if not regrouped);
    b   = share of the group a new group would nest in (0: it would be top-level);
    lvl = nesting level of the nearest open ancestor (0: none).
At a node the choices are: stay closed; open and nest under the ancestor group of level
min(lvl, K-1) ("attach"); open as a new top-level group ("restart", only when b > 0).
For levels 1 and 2 these are all the possibilities, so the result is optimal (tests compare
it with brute force). For levels >= 3 a group could also nest under a shallower ancestor
group than the deepest one allowed; the solver does not try that.

Ties go to the simpler plan: closed before attach before restart, i.e. fewer, larger groups.
The number of states at a node grows with the number of open-able ancestors (about its
depth in the compact tree, squared for levels >= 2): small for real batches (system prompt
-> document -> question is depth 3), larger for long chains of prompts nesting in each other.
"""

from __future__ import annotations

from .inputs import PlannerConfig
from .order import GroupSpec
from .tokens import TOKEN_BYTES
from .tree import Node, PrefixTree

CLOSED, ATTACH, RESTART = 0, 1, 2
ROOT_STATE = (0, 0, 0)


class GroupSolver:
    """Solves the grouping on a `PrefixTree`; results are cached in the nodes' `memo`.

    The tree clears the memo of every node on an insertion path, so after adding requests only
    the changed paths (and states never asked before) are recomputed.
    """

    def __init__(self, config: PlannerConfig) -> None:
        self.page = config.page_size
        self.levels = config.levels
        self.min_prefix = config.min_prefix_tokens

    def share(self, node: Node) -> int:
        aligned = node.end - node.end % self.page
        return aligned if aligned >= max(self.min_prefix, 1) else 0

    def options(self, node: Node, state: tuple[int, int, int]) -> list[tuple[int, int, int, tuple]]:
        """(choice, saving per request ending here, cost, state for the children)."""
        g, b, lvl = state
        opts = [(CLOSED, g, 0, state)]
        a = self.share(node)
        if a <= g:
            return opts
        new_lvl = min(lvl, self.levels - 1) + 1
        opts.append((ATTACH, a, a - b, (a, a if new_lvl < self.levels else b, new_lvl)))
        if b > 0:
            opts.append((RESTART, a, a, (a, a if self.levels > 1 else 0, 1)))
        return opts

    def _leaf_value(self, node: Node, state: tuple) -> int:
        """`_best(node, state)[0]` for a node without children, in closed form."""
        g, b, _ = state
        k, a = len(node.ends), self.share(node)
        # open: attach (k*a - (a - b)) is never worse than restart (k*a - a)
        return max(k * g, k * a - a + b) if a > g else k * g

    def _best(self, node: Node, opts: list) -> tuple[int, int]:
        """(saving, choice) among `opts` at `node`; the children's values must be known."""
        best_val, best_choice = -1, CLOSED
        n_ends = len(node.ends)
        children = node.children.values()
        for choice, gain, cost, child_state in opts:
            val = n_ends * gain - cost
            for child in children:
                val += child.memo[child_state][0] if child.children else self._leaf_value(child, child_state)
            if val > best_val:
                best_val, best_choice = val, choice
        return best_val, best_choice

    def solve(self, tree: PrefixTree) -> int:
        """Fill the memos from the root's state down; return the best total saving."""
        stack = [(tree.root, ROOT_STATE)]
        while stack:
            node, state = stack[-1]
            if state in node.memo:
                stack.pop()
                continue
            opts = self.options(node, state)
            missing = [
                (child, child_state)
                for _, _, _, child_state in opts
                for child in node.children.values()
                if child.children and child_state not in child.memo
            ]
            if missing:
                stack.extend(missing)
                continue
            node.memo[state] = self._best(node, opts)
            stack.pop()
        return tree.root.memo[ROOT_STATE][0]

    def extract(self, tree: PrefixTree) -> list[GroupSpec]:
        """The groups of the solved tree; parents precede nested groups; singletons at the end."""
        self.solve(tree)
        specs: list[GroupSpec] = []
        alone = []
        stack: list[tuple[Node, tuple, tuple[int, ...]]] = [(tree.root, ROOT_STATE, ())]
        while stack:
            node, state, chain = stack.pop()  # chain: spec indices of the open groups above, outermost first
            opts = self.options(node, state)
            choice = node.memo[state][1] if node.children else self._best(node, opts)[1]
            opt = next(o for o in opts if o[0] == choice)
            if choice != CLOSED:
                a = opt[1]
                base = min(len(chain), self.levels - 1) if choice == ATTACH else 0
                parent = chain[base - 1] if base > 0 else None
                specs.append(GroupSpec(a, node.src[: a * TOKEN_BYTES], [], parent))
                chain = chain[:base] + (len(specs) - 1,)
            if node.ends:
                if chain:
                    specs[chain[-1]].members.extend(node.ends)
                else:
                    alone.extend(node.ends)
            for child in node.children.values():
                stack.append((child, opt[3], chain))
        specs.extend(GroupSpec(0, b"", [req]) for req in alone)
        return specs
