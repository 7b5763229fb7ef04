"""Which rows of a step read one shared prefix: a pure rule over host-side row facts.

The attention backend knows, per batch row, the radix node its cached prefix ends at (`key`)
and that prefix's length. Rows with the same key hold the same KV slots for positions
[0, prefix_len): a radix path is unique, and a running request keeps its node locked, so those
slots stay put while any of them runs. Such rows form a group when the cost rule says sharing
pays (`cost_model.should_share_prefix`); every other row runs as a plain request.

No torch: lists in, lists out, so the rule is tested on its own and costs little per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .cost_model import should_share_prefix, should_use_cascade

NO_KEY = -1


@dataclass(frozen=True)
class StepGroups:
    request_group: list[int]  # per row: its group, or -1
    group_rows: list[int]  # per group: one member row (its slots [0, prefix) are the group's)
    group_prefix_len: list[int]  # per group
    suffix_start: list[int]  # per row: where its own tokens start (its group's prefix, or 0)

    @property
    def num_groups(self) -> int:
        return len(self.group_rows)


def group_rows(
    keys: Sequence[int],
    prefix_lens: Sequence[int],
    seq_lens: Sequence[int],
    *,
    mode: str = "decode",
) -> StepGroups:
    """Group rows by shared cached prefix. `seq_lens` are whole contexts, this step's tokens
    included, so a row's own part `seq_len - prefix_len` is at least 1."""
    n = len(keys)
    if len(prefix_lens) != n or len(seq_lens) != n:
        raise ValueError("keys, prefix_lens and seq_lens need one entry per row")
    members: dict[int, list[int]] = {}
    lens: dict[int, int] = {}
    for row, (key, plen, slen) in enumerate(zip(keys, prefix_lens, seq_lens)):
        if key == NO_KEY or plen <= 0 or plen >= slen:
            continue
        if lens.setdefault(key, plen) != plen:
            raise ValueError(
                f"rows sharing prefix node {key} report prefix lengths {lens[key]} and {plen}; "
                "one radix node has one path length"
            )
        members.setdefault(key, []).append(row)
    request_group = [-1] * n
    suffix_start = [0] * n
    group_rows_, group_len = [], []
    for key, rows in members.items():  # insertion order: first row of each key, deterministic
        plen = lens[key]
        own = sum(seq_lens[r] - plen for r in rows)
        if not should_share_prefix(len(rows), plen, own, mode):
            continue
        g = len(group_rows_)
        group_rows_.append(rows[0])
        group_len.append(plen)
        for r in rows:
            request_group[r] = g
            suffix_start[r] = plen
    return StepGroups(request_group, group_rows_, group_len, suffix_start)


def cascade_pays(groups: StepGroups, seq_lens: Sequence[int], mode: str = "decode") -> bool:
    """The step-level rule (`cost_model.should_use_cascade`) over these groups. A prefill step
    that shares nothing stays on SGLang's extend kernel (bit for bit): the fused kernel's edge
    there (1.06-1.14x) was measured on short chunks only, sharing is where it pays."""
    if mode == "extend" and groups.num_groups == 0:
        return False
    sizes = [0] * groups.num_groups
    for g in groups.request_group:
        if g >= 0:
            sizes[g] += 1
    other = sum(s - start for s, start in zip(seq_lens, groups.suffix_start))
    return should_use_cascade(sizes, groups.group_prefix_len, other, mode)
