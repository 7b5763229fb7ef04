"""The plan: what crosses from the planner to the scheduler and the attention backend.

Token accounting (method doc section 1), with each shared segment counted once:

    logical  = sum of prompt lengths (what a cache-less engine prefills)
    physical = sum over groups of their own segment (prefix_len - segment_start)
             + sum over requests of their suffix (prompt_len - prefix_len of their group)
    saving   = 1 - physical / logical
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .inputs import PlannerConfig, PlanRequest
from .order import GroupSpec, execution_order
from .tokens import TokenIds


@dataclass(frozen=True)
class Group:
    """Requests that run together and share `prefix_ids` (empty for a request alone).

    members: ids of the requests whose longest shared prefix is this group's, in execution
        order; `suffix_lens[i]` = prompt length of members[i] minus `prefix_len` (always >= 1).
    parent: gid of the enclosing group (levels > 1), whose prefix is a prefix of this one;
        this group then computes only tokens `[segment_start, prefix_len)` of its prefix.
    level: 0 for a request alone, 1 for a top-level shared group, parent's level + 1 nested.
    num_requests: requests that read this prefix: the members plus nested groups' requests.
    decode_share: sum of max_new_tokens / sum of prompt tokens over those requests.
    """

    gid: int
    prefix_len: int
    prefix_ids: TokenIds
    members: tuple[str, ...]
    suffix_lens: tuple[int, ...]
    parent: int | None
    segment_start: int
    level: int
    num_requests: int
    decode_share: float

    @property
    def is_shared(self) -> bool:
        return self.prefix_len > 0

    def to_dict(self, include_token_ids: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gid": self.gid,
            "prefix_len": self.prefix_len,
            "members": list(self.members),
            "suffix_lens": list(self.suffix_lens),
            "parent": self.parent,
            "segment_start": self.segment_start,
            "level": self.level,
            "num_requests": self.num_requests,
            "decode_share": self.decode_share,
        }
        if include_token_ids:
            out["prefix_ids"] = self.prefix_ids.tolist()
        return out


@dataclass(frozen=True)
class PlanMetrics:
    logical_prefill_tokens: int
    physical_prefill_tokens: int
    saving: float
    num_groups: int
    num_shared_groups: int
    group_size_histogram: dict[int, int]  # num_requests of a group -> how many groups


@dataclass(frozen=True)
class Plan:
    """Groups in execution order; `order` lists every request id once, group by group."""

    config: PlannerConfig
    groups: tuple[Group, ...]
    order: tuple[str, ...]
    metrics: PlanMetrics
    _requests: Mapping[str, PlanRequest] = field(repr=False, compare=False)
    _gid_of: Mapping[str, int] = field(repr=False, compare=False)

    def group_of(self, rid: str) -> Group:
        try:
            return self.groups[self._gid_of[rid]]
        except KeyError:
            raise KeyError(f"request {rid!r} is not in this plan") from None

    def request(self, rid: str) -> PlanRequest:
        return self._requests[rid]

    def to_dict(self, include_token_ids: bool = False) -> dict[str, Any]:
        m = self.metrics
        return {
            "config": self.config.to_dict(),
            "logical_prefill_tokens": m.logical_prefill_tokens,
            "physical_prefill_tokens": m.physical_prefill_tokens,
            "saving": m.saving,
            "num_requests": len(self.order),
            "num_groups": m.num_groups,
            "num_shared_groups": m.num_shared_groups,
            "group_size_histogram": {str(k): v for k, v in m.group_size_histogram.items()},
            "order": list(self.order),
            "groups": [g.to_dict(include_token_ids) for g in self.groups],
        }

    def check_invariants(self) -> None:
        """Assert every rule the scheduler relies on; tests call it on every plan they make."""
        cfg, groups, reqs = self.config, self.groups, self._requests
        assert sorted(self.order) == sorted(reqs), "every request appears exactly once"
        assert list(self.order) == [rid for g in groups for rid in g.members], "members contiguous, in group order"
        family: list[list[int]] = [[len(g.members), 0, 0] for g in groups]  # requests, decode, prompt
        open_path: list[int] = []  # gids of the enclosing groups of the current one (pre-order check)
        for g in groups:
            assert len(g.members) == len(g.suffix_lens)
            assert g.prefix_len % cfg.page_size == 0, f"group {g.gid}: prefix not page aligned"
            assert len(g.prefix_ids) == g.prefix_len
            for rid, suffix in zip(g.members, g.suffix_lens):
                req = reqs[rid]
                assert self._gid_of[rid] == g.gid
                assert suffix == req.prompt_len - g.prefix_len >= 1, f"{rid}: suffix must keep >= 1 token"
                assert req.input_ids[: g.prefix_len] == g.prefix_ids, f"{rid}: prefix is not its prefix"
                family[g.gid][1] += req.max_new_tokens
                family[g.gid][2] += req.prompt_len
            while open_path and open_path[-1] != g.parent:
                open_path.pop()
            if not g.is_shared:
                assert len(g.members) == 1 and g.parent is None and g.level == 0, f"group {g.gid}"
            elif g.parent is None:
                assert g.level == 1 and g.segment_start == 0, f"group {g.gid}"
            else:
                assert open_path, f"group {g.gid} does not follow its parent's family"
                p = groups[g.parent]
                assert p.is_shared and g.level == p.level + 1 <= cfg.levels, f"group {g.gid}: level"
                assert g.segment_start == p.prefix_len < g.prefix_len, f"group {g.gid}: segment"
                assert g.prefix_ids[: p.prefix_len] == p.prefix_ids, f"group {g.gid}: parent prefix"
            if g.is_shared:
                assert g.prefix_len >= max(cfg.min_prefix_tokens, 1), f"group {g.gid}: prefix too short"
            open_path.append(g.gid)
        for g in reversed(groups):
            assert groups[g.gid] is g
            if g.parent is not None:
                for k in range(3):
                    family[g.parent][k] += family[g.gid][k]
        for g, (n, decode, prompt) in zip(groups, family):
            assert g.num_requests == n and (n >= 2 or not g.is_shared), f"group {g.gid}: num_requests"
            assert g.decode_share == decode / prompt, f"group {g.gid}: decode_share"
        assert _metrics(cfg, groups, reqs) == self.metrics, "metrics add up"


def _metrics(config: PlannerConfig, groups: tuple[Group, ...], requests: Mapping[str, PlanRequest]) -> PlanMetrics:
    logical = sum(r.prompt_len for r in requests.values())
    physical = sum(g.prefix_len - g.segment_start + sum(g.suffix_lens) for g in groups)
    histogram = Counter(g.num_requests for g in groups)
    return PlanMetrics(
        logical_prefill_tokens=logical,
        physical_prefill_tokens=physical,
        saving=1.0 - physical / logical if logical else 0.0,
        num_groups=len(groups),
        num_shared_groups=sum(1 for g in groups if g.is_shared),
        group_size_histogram=dict(sorted(histogram.items())),
    )


def assemble_plan(config: PlannerConfig, specs: list[GroupSpec], requests: Mapping[str, PlanRequest]) -> Plan:
    """Order the solver's groups and freeze them into a `Plan`."""
    order = execution_order(specs)
    gid_of_spec = {spec_index: gid for gid, spec_index in enumerate(order)}
    groups: list[Group] = []
    gid_of: dict[str, int] = {}
    for gid, i in enumerate(order):
        spec = specs[i]
        parent = None if spec.parent is None else gid_of_spec[spec.parent]
        start = 0 if parent is None else groups[parent].prefix_len
        level = 0 if not spec.prefix_len else 1 if parent is None else groups[parent].level + 1
        for req in spec.members:
            gid_of[req.rid] = gid
        groups.append(
            Group(
                gid=gid,
                prefix_len=spec.prefix_len,
                prefix_ids=TokenIds.from_packed(spec.prefix),
                members=tuple(r.rid for r in spec.members),
                suffix_lens=tuple(r.prompt_len - spec.prefix_len for r in spec.members),
                parent=parent,
                segment_start=start,
                level=level,
                num_requests=spec.num_requests,
                decode_share=spec.decode_share,
            )
        )
    frozen = tuple(groups)
    return Plan(
        config=config,
        groups=frozen,
        order=tuple(rid for g in frozen for rid in g.members),
        metrics=_metrics(config, frozen, requests),
        _requests=requests,
        _gid_of=gid_of,
    )
