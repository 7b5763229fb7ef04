"""Prefix-first, memory-centric admission: which waiting requests SGLang may prefill now.

Rules (BatchLLM section 2-3), applied every time the scheduler forms a prefill batch:

1. **Prefix first.** A shared group's first admitted member (its leader) computes the prefix;
   the other members are offered only once the prefix is cached and pinned, so none of them
   computes it again. A group's own members come before any new group (pins are released
   sooner and their prefix never waits in memory for nothing).
2. **Whole-group reservation.** A group is opened (its leader offered) only when the KV pool
   can hold everything the group will still need: the leader's prompt, every member's own
   tokens and every member's whole decode budget. That reservation stays until the members
   are admitted, so admitting a group's members never fails for memory, and, since running
   requests are charged their whole remaining decode budget too, a batch job never retracts.
   How many groups are in flight is thus a memory decision, not a fixed wave size.
3. **Plan order.** New groups open in the session's order (decode-heavy first); the first
   one that does not fit stops the opening (no small group overtakes, the order is kept).
4. **Gather hold.** With `gather_s > 0` and a clock value `now` passed in, a WAITING shared
   group that could open is *held* (its memory reserved, its leader not offered) while
   `now - born < min(gather_s, prefix_len / prefill_tokens_per_s)`: `born` is its earliest
   member's arrival, so no request is held more than `gather_s` after it arrived, and never
   longer than computing the group's prefix once takes (a hold exists to let siblings gather
   into the group while its prefix is still open to regrouping; waiting longer than the prefill
   a sibling could save costs more than it can gain). Requests that share nothing (unshared
   groups) are never held. The policy reads no clock: `now` is an input.
5. **Progress.** When nothing runs and nothing is reserved, the first waiting group is opened
   even if it does not fit as a whole: its members then enter one by one as memory frees,
   so a group larger than the pool runs in waves instead of deadlocking.

6. **Mixed steps unless a known tail carries the decodes** (`mixes`). Running decodes ride with
   the prefill (`runtime/scheduler.py`) unless (a) no waiting request waits for KV memory
   (`memory_bound` is false) and (b) the prompt tokens still to compute of every waiting
   request (`waiting_tokens`) exceed this step's prefill budget. Then the requests admitted
   last, one or more steps from now, will need a full tail of decode steps after their prefill,
   and the running decodes fit in those steps: riding along now would only move them from
   decode steps into compute-bound prefill steps, for no step saved. When memory binds, the
   ride finishes running requests sooner and frees the memory the waiting ones need (fewer
   steps in all); when the known waiting work fits this step (the last chunks of a batch, an
   online server), no tail is known and each mixed round saves a decode step; and when
   requests came in since the last round (`arrivals`: an open system, such as the clients of
   SGLang's `run_batch`, which send a program's next request when its last one finished),
   finishing sooner brings the next requests sooner, so the known work is no tail either. Measured on an H200 (docs/benchmarks.md, fourth session), every round mixed against
   none: decode-heavy (memory binds, waves) 55.24 s against 60.43 s; short-prefix (everything
   fits, 323k prompt tokens waiting) 13.08 s against 12.41 s.

The step's token budget (how many of the offered prompt tokens run in this step) is SGLang's
chunked-prefill budget; see `runtime/scheduler.py` for how decode rows ride with it.

Pure: the inputs are the planning session and a `PoolView` of plain ints.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_batchllm.planner.session import GroupState, LiveGroup, Member, PlanningSession

# SGLang clips its own estimate of a request's remaining decode at 4096 tokens
# (SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION); a request with a larger budget that really decodes
# that long can still be retracted. A batch job's budgets are far below it.
DEFAULT_CLIP_MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class PoolView:
    """The KV pool as the policy sees it, in tokens.

    free: slots SGLang can hand out now: allocator available + radix-cache evictable
        (eviction is lazy at allocation). Pinned prefixes and running requests' KV are not in it.
    running_need: slots the admitted, unfinished requests will still allocate: the rest of
        their prompt (a chunked prefill) plus their remaining decode budget.
    """

    capacity: int
    free: int
    running_need: int
    page_size: int = 1


# Prefill rate the gather hold's "never longer than it saves" bound assumes: 790 TFLOP/s bf16
# matmul measured on the project's H200 (docs/baseline.md) over about 15 GFLOP of matmul per
# token for Llama-3.1-8B (same place): about 52,700 prompt tokens/s. A faster engine only
# shortens what a hold may cost, so a slower model (larger ones) holds at most this long.
DEFAULT_PREFILL_TOKENS_PER_S = 790e12 / 15e9


@dataclass(frozen=True)
class AdmissionConfig:
    clip_max_new_tokens: int = DEFAULT_CLIP_MAX_NEW_TOKENS
    gather_s: float = 0.0  # longest gather hold, seconds; 0: never hold
    prefill_tokens_per_s: float = DEFAULT_PREFILL_TOKENS_PER_S


@dataclass(frozen=True)
class Admission:
    """offer: request ids SGLang may admit now, in the order to try them (a prefix of it will
    run, as the step's token budget allows). opened: groups whose leader is offered.
    headroom: free tokens left after running needs and every reservation (may be < 0 only
    under the progress rule)."""

    offer: tuple[str, ...]
    opened: tuple[int, ...]
    reserved: int
    headroom: int
    held: tuple[int, ...] = ()  # groups whose leader is held back to gather (memory reserved)
    release_at: float | None = None  # the earliest `now` at which a held group stops being held
    memory_bound: bool = False  # a waiting request waits for KV memory (rule 6)
    # prompt tokens the waiting requests still compute (cached prefixes excluded); exact when
    # memory_bound is false, a lower bound otherwise (the scan stops at what does not fit)
    waiting_tokens: int = 0


def hold_until(group: LiveGroup, config: AdmissionConfig) -> float:
    """The clock value until which `group` may be held to gather (see rule 4)."""
    if config.gather_s <= 0 or not group.is_shared:
        return float("-inf")
    worth = group.prefix_len / config.prefill_tokens_per_s if config.prefill_tokens_per_s > 0 else 0.0
    return group.born + min(config.gather_s, worth)


def request_prefill(member: Member, group: LiveGroup) -> int:
    """Prompt tokens `member` computes: its own tokens once its group's prefix is cached; a
    leader (or an unshared request) computes its whole prompt."""
    cached = group.prefix_len if group.is_shared and group.state is not GroupState.WAITING else 0
    return member.prompt_len - cached


def decode_reserve(member: Member, page_size: int, clip: int) -> int:
    """KV slots `member` allocates after its prompt: its (clipped) decode budget, plus one page
    of slack for the rounding of its last page. Its whole cost is this plus its prefill."""
    return min(member.max_new_tokens, clip) + page_size


def group_prefill(session: PlanningSession, group: LiveGroup) -> int:
    """Prompt tokens a waiting group computes: the leader's prompt, the others' own tokens."""
    total = 0
    for i, rid in enumerate(group.pending):
        m = session.member(rid)
        total += m.prompt_len if i == 0 or not group.is_shared else m.prompt_len - group.prefix_len
    return total


def group_budgets(session: PlanningSession, group: LiveGroup, page_size: int, clip: int) -> int:
    """The decode reserves of a waiting group's members; with `group_prefill`, all it needs."""
    return sum(decode_reserve(session.member(rid), page_size, clip) for rid in group.pending)


def _claim(session: PlanningSession, g: LiveGroup, costs: list[int]) -> int:
    """What an open group still holds in reserve: its reserved pending members' costs, plus
    the prefix of a group whose leader finished before its prefix was pinned (that KV sits
    evictable in the radix cache until the pin takes it)."""
    claim = sum(c for rid, c in zip(g.pending, costs) if rid not in g.late)
    if g.state is GroupState.PREFILLING and g.leader not in g.running:
        claim += g.prefix_len
    return claim


def plan_admission(
    session: PlanningSession, pool: PoolView, config: AdmissionConfig = AdmissionConfig(),
    now: float | None = None,
) -> Admission:
    """`now`: the caller's clock value (the same on every TP rank); None disables the hold."""
    page, clip = pool.page_size, config.clip_max_new_tokens
    spendable = pool.free - pool.running_need
    claimed = 0  # reservations of the open groups seen so far that stay unspent this round
    offer: list[str] = []
    late: list[tuple[str, int]] = []
    memory_bound = False
    waiting_tokens = 0

    # 1. members of cached groups, oldest group first. A group's reservation is its own, and
    #    the groups before it have the first claim on memory, so the oldest open group can
    #    always go on, and a group's members never fail for memory that was promised to it.
    for g in session.groups():
        if not g.is_shared or g.state is GroupState.WAITING:
            continue
        members = [session.member(r) for r in g.pending]
        prefills = [request_prefill(m, g) for m in members]
        costs = [p + decode_reserve(m, page, clip) for p, m in zip(prefills, members)]
        waiting_tokens += sum(prefills)
        taken: set[str] = set()
        if g.state is GroupState.CACHED:
            available = spendable - claimed
            for rid, cost in zip(g.pending, costs):
                if rid in g.late:
                    late.append((rid, cost))
                elif cost <= available:
                    taken.add(rid)
                    offer.append(rid)
                    available -= cost
                    spendable -= cost
                else:
                    memory_bound = True
                    break  # members run in the group's order
        claimed += _claim(session, g, costs) - sum(c for rid, c in zip(g.pending, costs) if rid in taken)
    reserved = claimed
    headroom = spendable - claimed

    # 2. late joiners of cached groups, from memory nobody claimed
    for rid, cost in late:
        if cost <= headroom:
            offer.append(rid)
            headroom -= cost
        else:
            memory_bound = True

    # 3. open waiting groups in plan order while the whole group fits
    opened: list[int] = []
    held: list[int] = []
    release_at = None
    hold = now is not None and config.gather_s > 0
    idle = pool.running_need == 0 and reserved == 0
    for g in session.groups():
        if g.state is not GroupState.WAITING:
            continue
        prefill = group_prefill(session, g)
        cost = prefill + group_budgets(session, g, page, clip)
        waiting_tokens += prefill
        if cost > headroom:
            memory_bound = True
            if not (idle and not opened and not offer and not held):
                break
        headroom -= cost  # a held group keeps its place in the plan order and its memory
        if hold:
            until = hold_until(g, config)
            if now < until:
                held.append(g.gid)
                release_at = until if release_at is None else min(release_at, until)
                continue
        offer.append(g.pending[0])
        opened.append(g.gid)
    return Admission(tuple(offer), tuple(opened), reserved, headroom, tuple(held), release_at,
                     memory_bound, waiting_tokens)


def mixes(decision: Admission, step_budget: int, arrivals: bool = False) -> bool:
    """Rule 6: should the running decodes ride with this round's prefill of at most
    `step_budget` prompt tokens? `arrivals`: requests came in since the last round."""
    return arrivals or decision.memory_bound or decision.waiting_tokens <= step_budget


def running_need(prompt_left: int, max_new_tokens: int, output_len: int, clip: int = DEFAULT_CLIP_MAX_NEW_TOKENS) -> int:
    """Slots an admitted request will still allocate: its prompt not yet prefilled plus the rest
    of its (clipped) decode budget."""
    return max(0, prompt_left) + max(0, min(max_new_tokens, clip) - output_len)
