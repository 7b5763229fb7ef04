"""Where the default of `--batchllm-gather-ms` comes from: the simulator under trickle arrivals.

There is no GPU in the development loop, so the default is read off this model instead of a
measurement: `SimulatedEngine` (the real session and policy) with its `TimeModel` (the project's
measured H200 ceilings, docs/baseline.md), fed by `TrickleClients`, a model of SGLang's
`run_batch`: a pool of client threads, each running one program at a time, every program step
one request sent when the previous step's reply came back. Requests reach the scheduler one by
one: SGLang's tokenizer manager tokenizes them one after another, `arrival_gap_s` apart (1.6 ms:
the bundled tokenizer's median time to encode an 1,850-token prompt, measured on the
development CPU; see docs/scheduler.md).

    python -m sglang_batchllm.policy.gather_model            # the issue's workload, full size
    python -m sglang_batchllm.policy.gather_model --programs 400 --gather-ms 0,5,20

prints, per gather setting, the simulated makespan, the prompt tokens computed and the mean
request latency; the default is the setting with the shortest makespan (ties: the smaller).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from sglang_batchllm.planner.inputs import PlannerConfig, PlanRequest
from sglang_batchllm.planner.session import PlanningSession

from .admission import AdmissionConfig
from .sim import SimulatedEngine, TimeModel

ARRIVAL_GAP_S = 1.6e-3  # measured: bundled tokenizer, 1,850-token prompt, median of 50 (see module doc)


@dataclass(frozen=True)
class ProgramShape:
    """`system + document + question` with `gens` dependent gen calls (the issue's shape)."""

    system: int = 300
    documents: int = 100
    document: int = 1500
    question: int = 50
    gens: int = 2
    gen_tokens: int = 64


def program_steps(shape: ProgramShape, pid: int, rng: random.Random) -> list[list[int]]:
    """The prompts of one program's steps: step k's prompt is step k-1's plus its answer and the
    next question (an answer's tokens are the program's own)."""
    base = 1_000_000
    system = list(range(base, base + shape.system))
    doc = rng.randrange(shape.documents)
    d0 = base * 2 + doc * shape.document
    prompt = system + list(range(d0, d0 + shape.document))
    own = base * 10 + pid * 10_000
    steps = []
    for k in range(shape.gens):
        prompt = prompt + list(range(own, own + shape.question))
        own += shape.question
        steps.append(prompt)
        prompt = prompt + list(range(own, own + shape.gen_tokens))  # the answer
        own += shape.gen_tokens
    return steps


class TrickleClients:
    """`threads` clients; each runs programs one after another, one request per step."""

    def __init__(self, engine: SimulatedEngine, programs: list[list[list[int]]], threads: int,
                 gen_tokens: int, arrival_gap_s: float = ARRIVAL_GAP_S):
        self.engine, self.programs, self.gen_tokens, self.gap = engine, programs, gen_tokens, arrival_gap_s
        self.next_program = 0
        self.last_arrival = 0.0
        self.step_of: dict[int, int] = {}
        engine.on_finish = self._finished
        for _ in range(min(threads, len(programs))):
            self._start(0.0)

    def _send(self, at: float, pid: int, k: int) -> None:
        # the tokenizer handles one request at a time: arrivals are at least `gap` apart
        self.last_arrival = max(at, self.last_arrival) + self.gap
        self.engine.arrive(self.last_arrival, PlanRequest(f"p{pid}s{k}", self.programs[pid][k], self.gen_tokens))

    def _start(self, at: float) -> None:
        if self.next_program < len(self.programs):
            pid, self.next_program = self.next_program, self.next_program + 1
            self.step_of[pid] = 0
            self._send(at, pid, 0)

    def _finished(self, engine: SimulatedEngine, rid: str) -> None:
        pid = int(rid[1:rid.index("s")])
        k = self.step_of[pid] + 1
        if k < len(self.programs[pid]):
            self.step_of[pid] = k
            self._send(engine.now, pid, k)
        else:
            self._start(engine.now)


@dataclass(frozen=True)
class Outcome:
    gather_ms: float
    makespan_s: float
    prefill_tokens: int
    mean_latency_s: float
    held_steps: int


def simulate(gather_ms: float, programs: int = 2000, threads: int = 96, shape: ProgramShape = ProgramShape(),
             capacity: int = 800_000, step_tokens: int = 8192, seed: int = 0,
             config: PlannerConfig = PlannerConfig(page_size=1, levels=1, min_prefix_tokens=32),
             mix: str = "rule") -> Outcome:
    rng = random.Random(seed)
    progs = [program_steps(shape, pid, rng) for pid in range(programs)]
    session = PlanningSession(config, max_prefix_tokens=capacity // 2)
    engine = SimulatedEngine(capacity, step_tokens, session=session, time_model=TimeModel(),
                             admission=AdmissionConfig(gather_s=gather_ms / 1000), mix=mix)
    TrickleClients(engine, progs, threads, shape.gen_tokens)
    res = engine.run()
    lat = [res.finished_at[r] - res.arrived_at[r] for r in res.finished]
    return Outcome(gather_ms, res.end, res.prefill_tokens, sum(lat) / len(lat), sum(1 for s in res.steps if s.held))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=96)
    ap.add_argument("--gather-ms", default="0,1,2,5,10,20,50")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    outs = [simulate(float(g), args.programs, args.threads, seed=args.seed) for g in args.gather_ms.split(",")]
    print("gather_ms  makespan_s  prefill_tokens  mean_latency_s  held_steps")
    for o in outs:
        print(f"{o.gather_ms:9g}  {o.makespan_s:10.3f}  {o.prefill_tokens:14,d}  {o.mean_latency_s:14.3f}  {o.held_steps:10d}")
    best = min(outs, key=lambda o: (round(o.makespan_s, 3), o.gather_ms))
    print(f"shortest makespan: gather_ms={best.gather_ms:g}")


if __name__ == "__main__":
    main()
