"""Data parallelism by group: SGLang's DP controller sends whole prefix groups to one replica.

SGLang's `DataParallelController` splits a batch message into single requests and sends each
to a replica by round robin or by queue length, so a group's members land on every replica
and each replica computes the group's prefix again. With this patch:

- a batch message (`BatchTokenizedGenerateReqInput`) is planned into groups by a planning
  session in the controller (the same planner the schedulers run), the groups are placed by
  `policy.placement` (LPT over the replicas' loads, never splitting a group), and each replica
  gets ONE batch message with its groups' requests, in the batch's order, so its scheduler
  plans them as one batch again;
- a single request (`TokenizedGenerateReqInput`) whose prompt extends the prefix of a live
  group (the session's join rule) follows that group's replica; otherwise it goes to the
  least-loaded replica;
- requests the planner does not take (token embeddings, multimodal, an explicit
  `routed_dp_rank`, a disaggregation bootstrap room, a session) and every other message keep
  SGLang's dispatch. So do DP attention and PD disaggregation, where it was not checked.

The controller never hears that a request finished; the placer's loads are its own ledger of
the placed groups' costs, and a group is forgotten (session and placer) when more than
`max_groups` are remembered, least recently used first.

Targets (SGLang 0.5.17):
- `DataParallelController.dispatch_batch_generate`, AROUND (controller process);
- `DataParallelController.dispatching_with_trace`, AROUND (controller process);
- `sglang.srt.entrypoints.engine.run_data_parallel_controller_process`, a module attribute
  swapped in the launching process for `run_dp_controller_process`, which loads the plugins in
  the controller process and then runs SGLang's function.

Why no official seam serves: the dispatch policy is a private enum of the controller
(`--load-balance-method`); and the controller process, unlike the schedulers, never loads
plugins, while a HookRegistry wrapper of the process target cannot be pickled for `spawn` by
any name other than SGLang's own (which the child re-imports unpatched).
Not in `patches._MODULES` yet: it was only run against a fake controller (no multi-GPU machine).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from sglang_batchllm.compat import SUPPORTED_SGLANG_VERSION
from sglang_batchllm.patches import Patch
from sglang_batchllm.planner import PlanInputError, PlannerConfig, PlanRequest
from sglang_batchllm.planner.session import PlanningSession
from sglang_batchllm.policy.placement import DEFAULT_MAX_REMEMBERED_GROUPS, StickyPlacer, group_load

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default, used when a request has none


class GroupRouter:
    """Pure: request -> replica index, keeping groups whole. Deterministic in its calls."""

    def __init__(self, replicas: int, config: PlannerConfig = PlannerConfig(),
                 max_groups: int = DEFAULT_MAX_REMEMBERED_GROUPS) -> None:
        self.session = PlanningSession(config)
        self.placer = StickyPlacer(replicas, max_groups)
        self._rids_of: dict[int, list[str]] = {}  # remembered gid -> its requests in the session

    @property
    def replicas(self) -> int:
        return self.placer.replicas

    def route(self, requests: Sequence[PlanRequest]) -> list[int]:
        """The replica of each request, in order. Raises PlanInputError (nothing changed) on a
        request id already routed and still remembered."""
        created = set(self.session.add(requests))
        gid_of = [self.session.group_of(req.rid).gid for req in requests]
        members: dict[int, list[PlanRequest]] = {}
        for req, gid in zip(requests, gid_of):
            members.setdefault(gid, []).append(req)
        loads = []
        for gid, reqs in members.items():
            prefix_len = self.session.group(gid).prefix_len
            loads.append(group_load(gid, prefix_len, [r.prompt_len for r in reqs], [r.max_new_tokens for r in reqs],
                                    prefix_cached=gid not in created))
            self._rids_of.setdefault(gid, []).extend(r.rid for r in reqs)
        replica_of = self.placer.place(loads)
        for gid in self.placer.forgotten:
            self._forget(gid)
        self.placer.forgotten.clear()
        for gid in members:  # a group nobody can join holds nothing worth keeping in the session
            if gid in self._rids_of and not self.session.group(gid).is_shared:
                self._forget_in_session(gid)
        return [replica_of[gid] for gid in gid_of]

    def _forget_in_session(self, gid: int) -> None:
        for rid in self._rids_of.pop(gid, ()):
            if rid in self.session:
                self.session.aborted(rid)  # pending and never admitted here: leaves the session

    def _forget(self, gid: int) -> None:
        self._forget_in_session(gid)
        self.placer.done(gid)

    def check_invariants(self) -> None:
        self.session.check_invariants()
        self.placer.check_invariants()
        assert set(self._rids_of) <= {g.gid for g in self.session.groups()}, "router remembers a dead group"


# ---- the SGLang side (controller process) --------------------------------------------------

_config = None  # BatchLLMConfig of this process


def plan_request(req) -> PlanRequest | None:
    """The planner's view of a `TokenizedGenerateReqInput`, or None when it must keep SGLang's
    dispatch (no token ids, embeddings, multimodal, explicit routing, PD bootstrap, session)."""
    ids = getattr(req, "input_ids", None)
    if not ids or not getattr(req, "rid", None):
        return None
    for name in ("input_embeds", "mm_inputs", "routed_dp_rank", "bootstrap_room", "session_params"):
        if getattr(req, name, None) is not None:
            return None
    max_new = getattr(req.sampling_params, "max_new_tokens", None)
    try:
        return PlanRequest(req.rid, ids, DEFAULT_MAX_NEW_TOKENS if max_new is None else int(max_new))
    except PlanInputError:
        return None


def router_for(controller) -> GroupRouter | None:
    """The controller's router, made on first use; None where this patch keeps SGLang's
    dispatch (DP attention, PD disaggregation, replicas added or removed since)."""
    args = controller.server_args
    if args.enable_dp_attention or getattr(args, "disaggregation_mode", "null") != "null":
        return None
    active = tuple(controller._active_workers)
    router = getattr(controller, "_batchllm_router", None)
    if router is None:
        levels = getattr(_config, "levels", 1)
        min_prefix = getattr(_config, "min_prefix_tokens", PlannerConfig().min_prefix_tokens)
        config = PlannerConfig(page_size=max(1, int(getattr(args, "page_size", 1) or 1)), levels=levels,
                               min_prefix_tokens=min_prefix)
        router = GroupRouter(len(active), config)
        controller._batchllm_router, controller._batchllm_workers = router, active
    if controller._batchllm_workers != active or not all(controller.status[w] for w in active):
        return None  # elastic scaling changed the replica set: SGLang's dispatch knows it
    return router


def _sock_send(socket, obj) -> None:  # the transport, replaced in tests
    from sglang.srt.managers.io_struct import sock_send

    sock_send(socket, obj)


def send_to_worker(controller, worker: int, reqs: list) -> None:
    """Send requests to one replica as one message, with the dispatch times SGLang records."""
    from sglang.srt.managers.io_struct import BatchTokenizedGenerateReqInput, unwrap_from_pickle, wrap_as_pickle
    from sglang.srt.observability.req_time_stats import DPControllerReqTimeStats

    stats = []
    for req in reqs:
        ts = DPControllerReqTimeStats.new_from_obj(unwrap_from_pickle(req.time_stats))
        ts.set_dp_dispatch_time()
        req.time_stats = wrap_as_pickle(ts)
        stats.append(ts)
    message = reqs[0] if len(reqs) == 1 else BatchTokenizedGenerateReqInput(batch=reqs, rids=[r.rid for r in reqs])
    _sock_send(controller.workers[worker], message)
    for req, ts in zip(reqs, stats):
        req.time_stats = ts
        ts.set_dp_dispatch_finish_time()


def dispatch_by_group(controller, reqs: list) -> list:
    """Send the plannable requests by group; return the others (for SGLang's dispatch)."""
    router = router_for(controller)
    if router is None:
        return reqs
    views = [plan_request(r) for r in reqs]
    plannable = [(r, v) for r, v in zip(reqs, views) if v is not None]
    if not plannable:
        return reqs
    try:
        replicas = router.route([v for _, v in plannable])
    except PlanInputError as err:  # e.g. a request id routed before and still remembered
        logger.warning("sglang_batchllm: DP dispatch by group skipped for this batch: %s", err)
        return reqs
    workers = controller._batchllm_workers
    by_replica: dict[int, list] = {}
    for (req, _), r in zip(plannable, replicas):
        by_replica.setdefault(r, []).append(req)
    for r in sorted(by_replica):
        send_to_worker(controller, workers[r], by_replica[r])
    return [r for r, v in zip(reqs, views) if v is None]


def _around_dispatch_batch_generate(original, self, batch_req):
    rest = dispatch_by_group(self, list(batch_req))
    if len(rest) == len(batch_req):
        return original(self, batch_req)
    for req in rest:
        self.dispatching_with_trace(req, refresh_load_budget=False)


def _around_dispatching_with_trace(original, self, req, *args, **kwargs):
    from sglang.srt.managers.io_struct import TokenizedGenerateReqInput

    if isinstance(req, TokenizedGenerateReqInput) and not dispatch_by_group(self, [req]):
        return None
    return original(self, req, *args, **kwargs)


def run_dp_controller_process(*args, **kwargs):
    """The controller process's target: load the plugins (SGLang's controller does not), then
    run SGLang's controller. A plain module function, so `spawn` pickles it by this name."""
    from sglang.srt.managers.data_parallel_controller import run_data_parallel_controller_process
    from sglang.srt.plugins import load_plugins

    load_plugins()
    return run_data_parallel_controller_process(*args, **kwargs)


def _install(config) -> None:
    global _config
    _config = config
    if not config.schedule:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    dpc = "sglang.srt.managers.data_parallel_controller.DataParallelController"
    HookRegistry.register(f"{dpc}.dispatch_batch_generate", _around_dispatch_batch_generate, HookType.AROUND)
    HookRegistry.register(f"{dpc}.dispatching_with_trace", _around_dispatching_with_trace, HookType.AROUND)
    engine = sys.modules.get("sglang.srt.entrypoints.engine")  # present in the launching process only
    if engine is not None and getattr(engine, "run_data_parallel_controller_process", None) is not None:
        engine.run_data_parallel_controller_process = run_dp_controller_process


PATCH = Patch(
    name="dp_dispatch",
    targets=(
        "sglang.srt.managers.data_parallel_controller.DataParallelController.dispatch_batch_generate",
        "sglang.srt.managers.data_parallel_controller.DataParallelController.dispatching_with_trace",
        "sglang.srt.entrypoints.engine.run_data_parallel_controller_process",
    ),
    sglang_version=SUPPORTED_SGLANG_VERSION,
    why_no_seam="the DP dispatch policy is a private enum; the controller process loads no plugins",
    install=_install,
)
