"""A simulated scheduler and KV pool, to test the admission policy without a GPU.

It follows SGLang's step structure closely enough for the properties that matter:

- each step, the policy offers requests and the "engine" admits them in order while the
  step's prefill token budget lasts; the last admitted request may be chunked (its rest runs
  first in the next step, as SGLang's `chunked_req`);
- a request allocates one KV slot per prompt token it computes and per token it decodes;
  members of a group whose prefix is pinned compute only their own tokens;
- a leader's prefix counts as cached once its prefill is complete; the adapter's role is then
  played by `_pin_ready_prefixes` (pin it, move its slots from the leader to the pin);
- every running request whose prompt is complete decodes one token per step; in a step that
  also prefills, only when the step mixes (`mix`: "rule", the engine's, `admission.py` rule 6;
  "always" / "never"); a request that reached
  its budget finishes and its own slots return to the pool (the radix cache's evictable part
  counts as free).

`run()` asserts the pool is never over-committed: that is "no retraction" in SGLang terms.

Time (for the gather hold): the engine keeps a clock. Each step lasts `TimeModel.step_s` of its
work (a roofline from the project's measured H200 ceilings, see `TimeModel`); a step with
nothing to run jumps the clock to the next event (an arrival, or a held group's release), as
SGLang's loop spins until something can run. `run(arrivals=...)` feeds requests at given clock
values; `trickle_programs` models SGLang's `run_batch` (a thread pool of clients, one request
per program step, each step sent when the previous one finished). The clock value is passed to
the session and the policy, which read none themselves.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from sglang_batchllm.planner.inputs import PlanRequest
from sglang_batchllm.planner.session import GroupState, Pin, PlanningSession, Unpin

from .admission import AdmissionConfig, PoolView, mixes, plan_admission, running_need


MIX_RULES = ("rule", "always", "never")


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
    start: float = 0.0
    held: int = 0  # groups held back to gather this step
    mixed: bool = False  # it prefilled and the running decodes rode with it


@dataclass(frozen=True)
class TimeModel:
    """Seconds per step: max(weights read, matmul of the step's tokens) + decode KV reads.

    Defaults are the measured ceilings of the project's H200 and the Llama-3.1-8B shape
    (docs/baseline.md): bf16 matmul 790 TFLOP/s, device copy 4.3 TB/s, about 15 GFLOP of matmul
    per token (so about 15 GB of bf16 weights read per step), 128 KiB of KV per token."""

    matmul_flops_per_s: float = 790e12
    copy_bytes_per_s: float = 4.3e12
    flops_per_token: float = 15e9
    weight_bytes: float = 15e9
    kv_bytes_per_token: float = 128 * 1024

    def step_s(self, prefill_tokens: int, decode_tokens: int, decode_context: int) -> float:
        matmul = (prefill_tokens + decode_tokens) * self.flops_per_token / self.matmul_flops_per_s
        weights = self.weight_bytes / self.copy_bytes_per_s
        kv = decode_context * self.kv_bytes_per_token / self.copy_bytes_per_s
        return max(matmul, weights) + kv


@dataclass
class SimResult:
    steps: list[StepRecord] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    prefix_tokens_computed: dict[int, int] = field(default_factory=dict)  # gid -> tokens
    gid_of: dict[str, int] = field(default_factory=dict)
    prefill_tokens: int = 0  # prompt tokens computed, all requests
    arrived_at: dict[str, float] = field(default_factory=dict)
    admitted_at: dict[str, float] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    # every hold: (now, gid, is_shared, earliest arrival among its members, prefix_len)
    holds: list[tuple[float, int, bool, float, int]] = field(default_factory=list)
    prefix_len_of: dict[int, int] = field(default_factory=dict)  # gid -> prefix length when computed
    shared_at_admission: dict[str, bool] = field(default_factory=dict)  # rid -> its group shared a prefix
    end: float = 0.0


class SimulatedEngine:
    def __init__(self, capacity: int, step_tokens: int, page_size: int = 1,
                 admission: AdmissionConfig = AdmissionConfig(), session: PlanningSession | None = None,
                 time_model: TimeModel | None = None, mix: str = "rule"):
        if mix not in MIX_RULES:
            raise ValueError(f"mix must be one of {', '.join(MIX_RULES)}, not {mix!r}")
        self.mix = mix
        self.capacity, self.step_tokens, self.page_size = capacity, step_tokens, page_size
        self.admission = admission
        self.session = session or PlanningSession()
        self.time = time_model or TimeModel()
        self.now = 0.0
        self.on_finish = None  # callback(engine, rid) when a request finishes (closed-loop clients)
        self._arrivals: list[tuple[float, int, PlanRequest]] = []  # heap of (time, seq, request)
        self._seq = 0
        self._release_at: float | None = None
        self.pinned: dict[int, int] = {}  # gid -> pinned slots
        self.running: dict[str, SimRequest] = {}
        self.chunked: SimRequest | None = None
        self.requests: dict[str, PlanRequest] = {}
        self.result = SimResult()

    # ---- the adapter's part ---------------------------------------------------------------
    def submit(self, batch: list[PlanRequest]) -> None:
        for r in batch:
            self.requests[r.rid] = r
            self.result.arrived_at[r.rid] = self.now
        self.session.add(batch, now=self.now)

    def arrive(self, at: float, req: PlanRequest) -> None:
        """Queue `req` to arrive when the clock reaches `at`."""
        heapq.heappush(self._arrivals, (at, self._seq, req))
        self._seq += 1

    def _deliver(self) -> bool:
        batch = []
        while self._arrivals and self._arrivals[0][0] <= self.now:
            batch.append(heapq.heappop(self._arrivals)[2])
        if batch:  # one scheduler round's receive: planned together, as SGLang's adapter does
            self.submit(batch)
        return bool(batch)

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
        arrived = self._deliver()
        self._pin_ready_prefixes()
        budget, prefill, admitted = self.step_tokens, 0, 0
        prefilled = set()  # requests that computed prompt tokens in this step
        if self.chunked is not None:  # the in-flight chunk goes first, as in SGLang
            prefilled.add(self.chunked.rid)
            prefill += self._prefill(self.chunked, budget)
            budget = self.step_tokens - prefill
        adm = plan_admission(self.session, self.pool(), self.admission, now=self.now)
        self._release_at = adm.release_at
        for gid in adm.held:
            g = self.session.group(gid)
            first = min(self.result.arrived_at[r] for r in (*g.pending, *g.running))
            self.result.holds.append((self.now, gid, g.is_shared, first, g.prefix_len))
        for rid in adm.offer:
            if budget <= 0 or self.chunked is not None:
                break
            req, group = self.requests[rid], self.session.group_of(rid)
            cached = group.prefix_len if group.state is GroupState.CACHED and group.is_shared else 0
            sim = SimRequest(rid, req.prompt_len, req.max_new_tokens, cached=cached)
            self.result.gid_of[rid] = group.gid
            self.result.admitted_at[rid] = self.now
            self.result.shared_at_admission[rid] = group.is_shared
            self._apply(self.session.admitted(rid))
            if group.is_shared and group.leader == rid and cached == 0:
                self.result.prefix_tokens_computed[group.gid] = (
                    self.result.prefix_tokens_computed.get(group.gid, 0) + group.prefix_len)
                self.result.prefix_len_of[group.gid] = group.prefix_len
            self.running[rid] = sim
            admitted += 1
            prefilled.add(rid)
            done = self._prefill(sim, budget)
            prefill += done
            budget -= done
        decode, context, done = 0, 0, []
        mixing = self.mix == "always" or (self.mix == "rule" and mixes(adm, self.step_tokens, arrived))
        for rid, r in list(self.running.items()):
            if not r.prompt_done or r is self.chunked:
                continue
            if prefill and not mixing and rid not in prefilled:
                continue  # a prefill step without decode rows (a prompt finished in it still
                # samples its first token, as SGLang's prefill does)
            if r.output < r.max_new_tokens:
                r.output += 1
                r.own_slots += 1
                decode += 1
                context += r.prompt_len + r.output
            if r.output >= r.max_new_tokens:
                del self.running[rid]
                done.append(rid)
                self._apply(self.session.finished(rid))
        used = self.used_slots()
        assert used <= self.capacity, f"KV pool over-committed: {used} > {self.capacity} (a retraction)"
        rec = StepRecord(prefill, decode, used, admitted, start=self.now, held=len(adm.held),
                         mixed=bool(prefill) and mixing)
        self.result.steps.append(rec)
        self.result.prefill_tokens += prefill
        if prefill or decode:
            self.now += self.time.step_s(prefill, decode, context)
        else:  # nothing ran: the loop spins until the next arrival or hold release
            nxt = [t for t in (self._release_at, self._arrivals[0][0] if self._arrivals else None) if t is not None]
            if nxt:
                self.now = max(self.now, min(nxt))
        for rid in done:  # finished at the end of the step that produced the last token
            self.result.finished.append(rid)
            self.result.finished_at[rid] = self.now
            if self.on_finish is not None:
                self.on_finish(self, rid)
        self.result.end = self.now
        return rec

    def _prefill(self, r: SimRequest, budget: int) -> int:
        n = min(r.prompt_len - r.cached - r.computed, budget)
        r.computed += n
        r.own_slots += n
        self.chunked = None if r.prompt_done else r
        return n

    def run(self, max_steps: int = 1_000_000) -> SimResult:
        for _ in range(max_steps):
            if not self.running and len(self.session) == 0 and not self._arrivals:
                return self.result
            before = (len(self.result.finished), self.used_slots(), len(self.running))
            rec = self.step()
            self.session.check_invariants()
            progressed = rec.prefill_tokens or rec.decode_tokens or rec.admitted or (
                (len(self.result.finished), self.used_slots(), len(self.running)) != before)
            waiting_on_clock = rec.held > 0 or (not self.running and len(self.session) == 0 and self._arrivals)
            assert progressed or self._pin_pending() or waiting_on_clock, (
                f"the queue stalled while work remains: {self._describe()}")
        raise AssertionError("simulation did not finish")

    def _describe(self) -> str:
        groups = [(g.gid, g.state.value, g.prefix_len, len(g.pending), len(g.running)) for g in self.session.groups()]
        return f"{self.pool()}, pinned={self.pinned}, chunked={self.chunked}, groups={groups}"

    def _pin_pending(self) -> bool:
        return any(g.state is GroupState.PREFILLING for g in self.session.groups())
