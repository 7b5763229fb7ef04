"""A simulated scheduler and KV pool, to test the admission policy without a GPU.

It follows SGLang's step structure closely enough for the properties that matter:

- each step, the policy offers requests and the "engine" admits them in order while the
  step's prefill token budget lasts; the last admitted request may be chunked (its rest runs
  first in the next step, as SGLang's `chunked_req`);
- a request allocates one KV slot per prompt token it computes and per token it decodes;
  members of a group whose prefix is pinned compute only their own tokens;
- a leader's prefix counts as cached once its prefill is complete; the adapter's role is then
  played by `_pin_ready_prefixes` (pin it, move its slots from the leader to the pin);
- every running request whose prompt is complete decodes one token per step (decode rows ride
  with the prefill, as BatchLLM's mixed steps do); a request that reached its budget finishes
  and its own slots return to the pool (the radix cache's evictable part counts as free).

`run()` asserts the pool is never over-committed: that is "no retraction" in SGLang terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sglang_batchllm.planner.inputs import PlanRequest
from sglang_batchllm.planner.session import GroupState, Pin, PlanningSession, Unpin

from .admission import AdmissionConfig, PoolView, plan_admission, running_need


@dataclass
class SimRequest:
    rid: str
    prompt_len: int
    max_new_tokens: int
    cached: int = 0  # prompt tokens served from the pinned prefix
    computed: int = 0  # prompt tokens prefilled so far (beyond `cached`)
    output: int = 0
    own_slots: int = 0  # KV slots this request holds itself

    @property
    def prompt_done(self) -> bool:
        return self.cached + self.computed >= self.prompt_len


@dataclass
class StepRecord:
    prefill_tokens: int
    decode_tokens: int
    slots_used: int
    admitted: int


@dataclass
class SimResult:
    steps: list[StepRecord] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    prefix_tokens_computed: dict[int, int] = field(default_factory=dict)  # gid -> tokens
    gid_of: dict[str, int] = field(default_factory=dict)


class SimulatedEngine:
    def __init__(self, capacity: int, step_tokens: int, page_size: int = 1,
                 admission: AdmissionConfig = AdmissionConfig(), session: PlanningSession | None = None):
        self.capacity, self.step_tokens, self.page_size = capacity, step_tokens, page_size
        self.admission = admission
        self.session = session or PlanningSession()
        self.pinned: dict[int, int] = {}  # gid -> pinned slots
        self.running: dict[str, SimRequest] = {}
        self.chunked: SimRequest | None = None
        self.requests: dict[str, PlanRequest] = {}
        self.result = SimResult()

    # ---- the adapter's part ---------------------------------------------------------------
    def submit(self, batch: list[PlanRequest]) -> None:
        for r in batch:
            self.requests[r.rid] = r
        self.session.add(batch)

    def _apply(self, events) -> None:
        for ev in events:
            if isinstance(ev, Pin):
                assert ev.gid not in self.pinned, f"group {ev.gid} pinned twice"
                self.pinned[ev.gid] = ev.prefix_len
            elif isinstance(ev, Unpin):
                self.pinned.pop(ev.gid)

    def _pin_ready_prefixes(self) -> None:
        for g in list(self.session.groups()):
            if g.state is GroupState.PREFILLING:
                leader = self.running.get(g.leader)
                if leader is None or leader.prompt_done:  # finished leaders left the prefix in the tree
                    self._apply(self.session.prefix_cached(g.gid))
                    if leader is not None:  # the pin now owns the prefix slots
                        leader.own_slots -= g.prefix_len

    def used_slots(self) -> int:
        return sum(self.pinned.values()) + sum(r.own_slots for r in self.running.values())

    def pool(self) -> PoolView:
        need = sum(running_need(r.prompt_len - r.cached - r.computed, r.max_new_tokens, r.output,
                                self.admission.clip_max_new_tokens) for r in self.running.values())
        return PoolView(self.capacity, self.capacity - self.used_slots(), need, self.page_size)

    # ---- one step ---------------------------------------------------------------------------
    def step(self) -> StepRecord:
        self._pin_ready_prefixes()
        budget, prefill, admitted = self.step_tokens, 0, 0
        if self.chunked is not None:  # the in-flight chunk goes first, as in SGLang
            prefill += self._prefill(self.chunked, budget)
            budget = self.step_tokens - prefill
        adm = plan_admission(self.session, self.pool(), self.admission)
        for rid in adm.offer:
            if budget <= 0 or self.chunked is not None:
                break
            req, group = self.requests[rid], self.session.group_of(rid)
            cached = group.prefix_len if group.state is GroupState.CACHED and group.is_shared else 0
            sim = SimRequest(rid, req.prompt_len, req.max_new_tokens, cached=cached)
            self.result.gid_of[rid] = group.gid
            self._apply(self.session.admitted(rid))
            if group.is_shared and group.leader == rid and cached == 0:
                self.result.prefix_tokens_computed[group.gid] = (
                    self.result.prefix_tokens_computed.get(group.gid, 0) + group.prefix_len)
            self.running[rid] = sim
            admitted += 1
            done = self._prefill(sim, budget)
            prefill += done
            budget -= done
        decode = 0
        for rid, r in list(self.running.items()):
            if not r.prompt_done or r is self.chunked:
                continue
            if r.output < r.max_new_tokens:
                r.output += 1
                r.own_slots += 1
                decode += 1
            if r.output >= r.max_new_tokens:
                del self.running[rid]
                self.result.finished.append(rid)
                self._apply(self.session.finished(rid))
        used = self.used_slots()
        assert used <= self.capacity, f"KV pool over-committed: {used} > {self.capacity} (a retraction)"
        rec = StepRecord(prefill, decode, used, admitted)
        self.result.steps.append(rec)
        return rec

    def _prefill(self, r: SimRequest, budget: int) -> int:
        n = min(r.prompt_len - r.cached - r.computed, budget)
        r.computed += n
        r.own_slots += n
        self.chunked = None if r.prompt_done else r
        return n

    def run(self, max_steps: int = 1_000_000) -> SimResult:
        for _ in range(max_steps):
            if not self.running and len(self.session) == 0:
                return self.result
            before = (len(self.result.finished), self.used_slots(), len(self.running))
            rec = self.step()
            self.session.check_invariants()
            progressed = rec.prefill_tokens or rec.decode_tokens or rec.admitted or (
                (len(self.result.finished), self.used_slots(), len(self.running)) != before)
            assert progressed or self._pin_pending(), f"the queue stalled while work remains: {self._describe()}"
        raise AssertionError("simulation did not finish")

    def _describe(self) -> str:
        groups = [(g.gid, g.state.value, g.prefix_len, len(g.pending), len(g.running)) for g in self.session.groups()]
        return f"{self.pool()}, pinned={self.pinned}, chunked={self.chunked}, groups={groups}"

    def _pin_pending(self) -> bool:
        return any(g.state is GroupState.PREFILLING for g in self.session.groups())
