"""A compact radix tree over the prompts of a batch.

Each node stands for the token range `[start, end)` of every prompt below it; `end` is the
node's depth, the length of the prefix its requests share. Edges are not copied: a node
points at the packed tokens (`src`) of one request that contains its range.

    root ─[0,2000)─ A ─[2000,2199)─ leaf: r1        A.end = 2000 tokens shared by r1, r2
                      └[2000,2199)─ leaf: r2
         ─[0,7)──── B ...

A request is inserted with its *shareable* length `len(prompt) - 1`: the engine must compute
at least the last prompt token of every request itself (SGLang matches at most `len - 1`
cached tokens), so no plan may give a request a prefix covering its whole prompt.

Insertion compares whole edges with one slice compare (`memcmp`) and splits an edge at the
exact first differing token. The tree of a set of prompts is the same whatever the insertion
order (only `src`, which tokens an edge reads, and list orders differ), which is what makes
incremental planning equal to planning all at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from .inputs import PlanInputError, PlanRequest
from .tokens import TOKEN_BYTES, common_prefix_len


def token_at(src: bytes, pos: int) -> int:
    at = pos * TOKEN_BYTES
    return int.from_bytes(src[at : at + TOKEN_BYTES], sys.byteorder)


class Node:
    """A tree node; `ends` holds the requests whose shareable part ends exactly here."""

    __slots__ = ("parent", "start", "end", "src", "children", "ends", "count", "memo")

    def __init__(self, parent: Node | None, start: int, end: int, src: bytes) -> None:
        self.parent = parent
        self.start = start
        self.end = end
        self.src = src
        self.children: dict[int, Node] = {}  # first token of the child's range -> child
        self.ends: list[PlanRequest] = []
        self.count = 0  # requests in this subtree (ends here and below)
        self.memo: dict = {}  # the grouping solver's cache; cleared when the subtree changes

    def __repr__(self) -> str:
        return f"Node([{self.start},{self.end}), count={self.count}, children={len(self.children)})"


class PrefixTree:
    """The radix tree of a batch, grown one request at a time."""

    def __init__(self) -> None:
        self.root = Node(None, 0, 0, b"")
        self.requests: dict[str, PlanRequest] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def check_new(self, requests: list[PlanRequest]) -> None:
        """Raise `PlanInputError` unless every request is a new `PlanRequest` with a new id."""
        seen: set[str] = set()
        for req in requests:
            if not isinstance(req, PlanRequest):
                raise PlanInputError(f"expected PlanRequest, got {type(req).__name__}; wrap each request in PlanRequest")
            if req.rid in seen or req.rid in self.requests:
                raise PlanInputError(f"duplicate request id {req.rid!r}; every request needs a unique id")
            seen.add(req.rid)

    def insert(self, req: PlanRequest) -> None:
        """Add one request (its id must be new: see `check_new`)."""
        src = req._packed
        shareable = req.prompt_len - 1
        node, pos = self.root, 0
        path = [node]
        while pos < shareable:
            tok = token_at(src, pos)
            child = node.children.get(tok)
            if child is None:
                child = Node(node, pos, shareable, src)
                node.children[tok] = child
                path.append(child)
                break
            edge = child.end - child.start
            same = common_prefix_len(child.src, child.start, src, pos, min(edge, shareable - pos))
            if same < edge:  # split the edge at the first differing token (or where req ends)
                mid = Node(node, child.start, child.start + same, child.src)
                mid.count = child.count
                mid.children[token_at(child.src, child.start + same)] = child
                child.parent = mid
                child.start += same
                node.children[tok] = mid
                child = mid
            path.append(child)
            node, pos = child, pos + (child.end - child.start)
        path[-1].ends.append(req)
        for n in path:
            n.count += 1
            n.memo.clear()
        self.requests[req.rid] = req

    def nodes(self) -> Iterator[Node]:
        """Every node, parents before children (no particular order among siblings)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check_invariants(self) -> None:
        total = 0
        for node in self.nodes():
            assert node.count == len(node.ends) + sum(c.count for c in node.children.values()), node
            total += len(node.ends)
            for tok, child in node.children.items():
                assert child.parent is node and child.start == node.end < child.end, child
                assert token_at(child.src, child.start) == tok, child
                if node is not self.root:
                    assert node.src[: node.end * TOKEN_BYTES] == child.src[: node.end * TOKEN_BYTES], child
            for req in node.ends:
                assert req.prompt_len - 1 == node.end, (req.rid, node)
                assert req._packed[: node.end * TOKEN_BYTES] == node.src[: node.end * TOKEN_BYTES]
            if node is not self.root:
                # a compact tree has no pass-through node: it branches or some request ends here
                assert len(node.children) >= 2 or node.ends, node
        assert total == len(self.requests)
