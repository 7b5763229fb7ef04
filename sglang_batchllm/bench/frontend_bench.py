"""`scripts/bench_run_batch.py`: issue 12's frontend benchmark (docs/frontend.md, "Measuring it").

SGLang frontend programs (bench/frontend_workload.py) through `run_batch` against HTTP servers
this command starts and stops itself, one server per arm:

- `vanilla`: `program.run_batch` against `python -m sglang.launch_server` (BatchLLM's plugin
  left out of its environment, as in bench/launch.py);
- `batchllm-plain`: the same `program.run_batch` against `python -m sglang_batchllm.launch_server`;
- `batchllm-dropin`: `sglang_batchllm.run_batch` against our server.

Every server gets the same flags: the speed runs serve a generated Llama-3.1-8B-shaped
config.json with `--load-format dummy` and the bundled tokenizer; `--equality` serves the bundled
model with its trained weights and compares each arm's greedy outputs with vanilla's, program by
program. Only the run_batch call is timed: server start-up and a warm-up (programs of the same
shape with texts of their own, then /flush_cache) come before. `run_batch`'s own default
num_threads, temperature 0, `ignore_eos` so that every gen decodes its 64 tokens in every arm.

Per arm OUT/raw/<arm>.json (result and the hash of its settings), <arm>.outputs.jsonl (every
program's two answers) and <arm>.server.log; OUT/result.json and OUT/report.md for all arms with
the same settings. Exit status: 0 ok, 1 an arm's outputs differ from vanilla's (--equality),
2 a server or program failed, or bad input; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import entry
from . import frontend_workload as fw
from .cli import VANILLA_BACKENDS
from .launch import git_info, installed_plugin_names, vanilla_env
from .model import write_llama31_8b_dir

ARMS: dict[str, str] = {
    "vanilla": "program.run_batch against python -m sglang.launch_server",
    "batchllm-plain": "program.run_batch against python -m sglang_batchllm.launch_server",
    "batchllm-dropin": "sglang_batchllm.run_batch against python -m sglang_batchllm.launch_server",
}
REFERENCE = "vanilla"
# Issue 12's targets: wall-time speed-up over vanilla.
TARGETS = {"batchllm-plain": 1.5, "batchllm-dropin": 2.0}
RESULT_SCHEMA = 1
_ROOT = Path(__file__).resolve().parents[2]  # this working tree: servers import its package
# SGLang's own counters worth a line in the report (deltas over the timed run), when
# --enable-metrics gives them.
SGLANG_COUNTERS = ("sglang:num_requests_total", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                   "sglang:cached_tokens_total")


# ---- command line ----------------------------------------------------------------------------


def parse_arms(text: str) -> tuple[str, ...]:
    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise argparse.ArgumentTypeError(f"unknown arm(s) {', '.join(unknown) or '(none)'}; known: {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise argparse.ArgumentTypeError(f"an arm is named twice in {text!r}")
    return arms


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench_run_batch.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", type=parse_arms, default=tuple(ARMS), metavar="A,B,...",
                   help=f"arms to run in this command, in order: {', '.join(ARMS)} (default: all); arms run earlier "
                        "into the same --out with the same settings join the report")
    p.add_argument("--out", help="output directory (default: bench-out/run-batch-<UTC time>)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the number of programs (2,000) and documents (100); token lengths stay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--equality", action="store_true",
                   help="serve the bundled model with its trained weights and compare every arm's greedy outputs "
                        "with vanilla's, program by program")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs of the selected arms already in --out whose settings match")
    p.add_argument("--dry-run", action="store_true", help="build the workload, print its token statistics and the "
                   "server commands; start nothing (no GPU needed)")
    p.add_argument("--fake-server", action="store_true",
                   help="CPU run of the whole pipeline against the fake HTTP server (bench/fake_http.py) in place of "
                        "SGLang; its times say nothing about speed")
    p.add_argument("--server-arg", action="append", default=[], metavar="'--FLAG VALUE'",
                   help="extra flags for every arm's server (shell-split; repeatable), e.g. '--mem-fraction-static 0.85'")
    p.add_argument("--warmup", type=int, default=32, metavar="N",
                   help="warm-up programs before the timed run, same arm and shape, texts of their own (default %(default)s)")
    p.add_argument("--server-timeout", type=float, default=900.0, metavar="S",
                   help="seconds a server may take to answer /health and /get_model_info (default %(default)s)")
    p.add_argument("--progress-bar", action="store_true", help="run_batch's progress bar")
    p.add_argument("--vanilla-backend", default="triton", choices=VANILLA_BACKENDS,
                   help="the vanilla server's attention backend (default %(default)s; SGLang's own default on "
                        "Hopper is fa3, which this SGLang build may lack); a --server-arg "
                        "'--attention-backend X' sets every arm's instead")
    args = p.parse_args(argv)
    if args.scale <= 0:
        p.error("--scale must be > 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.dry_run:
        extra = [f for f, on in (("--resume", args.resume), ("--fake-server", args.fake_server),
                                 ("--progress-bar", args.progress_bar)) if on]
        if extra:
            p.error(f"--dry-run starts nothing; {', '.join(extra)} would have no effect")
    try:
        args.server_flags = [x for a in args.server_arg for x in shlex.split(a)]
    except ValueError as exc:
        p.error(f"--server-arg: {exc}")
    if args.fake_server and args.server_flags:
        p.error("--server-arg has no effect with --fake-server (the fake takes no SGLang flags)")
    return args


def command_line(argv: Sequence[str]) -> str:
    return entry.command_line(argv, "scripts/bench_run_batch.py")


# ---- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    """How an arm's server is started. `flags` are the settings every arm shares (they enter
    the settings hash); `module` and `env` are what makes it vanilla or BatchLLM."""

    module: str
    flags: list[str]
    env: dict[str, str]

    def command(self, port: int) -> list[str]:
        return [sys.executable, "-m", self.module, *self.flags, "--host", "127.0.0.1", "--port", str(port)]


def model_flags(args: argparse.Namespace, out: Path, write: bool = True) -> tuple[list[str], str]:
    """The flags naming the model, and a label for the report; `write=False` (dry run) names the
    generated config directory without writing it."""
    from sglang_batchllm import bundled_model

    if args.equality:
        return ["--model-path", bundled_model.model_dir()], "bundled model, trained weights"
    model_dir = out / "model-llama-3.1-8b"
    model_dir = write_llama31_8b_dir(model_dir) if write else str(model_dir)
    # The dummy weights' random output ids mostly lie beyond the bundled tokenizer's 1,024 ids
    # and decode to nothing, so the second gen's prompt grows by a few tokens only.
    return ["--model-path", model_dir, "--tokenizer-path", bundled_model.model_dir(), "--load-format", "dummy"], \
        "Llama-3.1-8B shape, dummy weights, bundled tokenizer"


def server_spec(arm: str, args: argparse.Namespace, out: Path, write: bool = True) -> ServerSpec:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    if args.fake_server:
        flags = ["--latency-ms", "2"] + (["--batchllm"] if arm != "vanilla" else [])
        return ServerSpec("sglang_batchllm.bench.fake_http", flags, env)
    # --enable-metrics for every arm: SGLang's counters (cached tokens) for all, BatchLLM's
    # sglang:batchllm_* where the server exports them. --random-seed: the same sampler seed.
    flags = model_flags(args, out, write)[0] + ["--enable-metrics", "--random-seed", "0", *args.server_flags]
    if arm == REFERENCE:
        if not any(f.split("=", 1)[0] == "--attention-backend" for f in args.server_flags):
            flags += ["--attention-backend", args.vanilla_backend]
        return ServerSpec("sglang.launch_server", flags, vanilla_env(env, installed_plugin_names()))
    return ServerSpec("sglang_batchllm.launch_server", flags, env)


class Server:
    """One server process (and its children: SGLang's scheduler and detokenizer) in a process
    group of its own, stopped as a group on exit, error or Ctrl-C, so the GPU is free after."""

    def __init__(self, spec: ServerSpec, log_path: Path, timeout_s: float):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = spec.command(self.port)
        self.env = spec.env
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None

    def __enter__(self) -> "Server":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=str(_ROOT), start_new_session=True)
        finally:
            log.close()  # the child holds its own descriptor
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _wait_ready(self) -> None:
        import requests

        t0 = time.monotonic()
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(f"the server exited with status {rc} before it was ready: {shlex.join(self.cmd)}\n"
                                   f"last lines of {self.log_path}:\n{self.log_tail()}")
            try:
                if (requests.get(self.url + "/health", timeout=5).status_code == 200
                        and requests.get(self.url + "/get_model_info", timeout=5).status_code == 200):
                    self.ready_s = time.monotonic() - t0
                    return
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > self.timeout_s:
                raise RuntimeError(f"the server did not answer /health and /get_model_info within {self.timeout_s:g} s "
                                   f"(--server-timeout): {shlex.join(self.cmd)}\nlast lines of {self.log_path}:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            import psutil

            family = psutil.Process(proc.pid).children(recursive=True)
        except Exception:  # psutil missing, or the process is gone
            family = []
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc.pid, signal.SIGKILL)  # what is left of the group, the leader included
        for p in family:  # children that left the group (a setsid of their own)
            with contextlib.suppress(Exception):
                p.kill()
        with contextlib.suppress(Exception):
            proc.wait(10)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _get_json(url: str) -> Any:
    import requests

    try:
        r = requests.get(url, timeout=30)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


SERVER_INFO_KEYS = ("model_path", "tokenizer_path", "load_format", "attention_backend", "radix_cache_backend",
                    "chunked_prefill_size", "max_running_requests", "max_total_num_tokens", "mem_fraction_static",
                    "schedule_policy", "cuda_graph_max_bs", "disable_radix_cache", "version", "fake", "batchllm")


def server_info(url: str) -> dict:
    info = _get_json(url + "/get_server_info") or _get_json(url + "/server_info") or {}
    flat = dict(info)
    for sub in info.get("internal_states") or []:  # SGLang puts the scheduler's facts here
        if isinstance(sub, dict):
            flat.update({k: v for k, v in sub.items() if k not in flat})
    return {k: flat[k] for k in SERVER_INFO_KEYS if k in flat}


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN|[+-]Inf)\s*$")


def scrape_metrics(url: str) -> dict[str, float] | None:
    """/metrics summed over label sets per name; None when the server has no /metrics."""
    import requests

    try:
        r = requests.get(url + "/metrics", timeout=30)
    except requests.RequestException:
        return None
    if r.status_code != 200:
        return None
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        m = _METRIC_LINE.match(line.strip())
        if m and not line.startswith("#"):
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def metric_deltas(before: dict | None, after: dict | None) -> dict:
    """Counters (`*_total`) as their change over the timed run, gauges as read after it."""
    if after is None:
        return {}
    before = before or {}
    return {k: (v - before.get(k, 0.0) if k.endswith("_total") else v) for k, v in sorted(after.items())
            if k.startswith("sglang:batchllm_") or k in SGLANG_COUNTERS}


# BatchLLM's scheduler log lines (runtime/scheduler.py), counted over the timed run: the stats
# that reach us when the server exports no sglang:batchllm_* metrics.
_PLANNED = re.compile(r"sglang_batchllm: batch of (\d+) requests -> (\d+) shared groups \((\d+) requests joined")
_LOG_EVENTS = {
    "groups_done_logged": re.compile(r"sglang_batchllm: group \d+ done"),
    "recomputation_warnings": re.compile(r"sglang_batchllm: request \S+ recomputes"),
    "retraction_warnings": re.compile(r"sglang_batchllm: \d+ requests retracted"),
    "unplanned_warnings": re.compile(r"sglang_batchllm: (request \S+ runs unplanned|batch planned request by request)"),
}


def log_stats(text: str) -> dict:
    planned = [tuple(int(x) for x in m.groups()) for m in _PLANNED.finditer(text)]
    out = {k: len(p.findall(text)) for k, p in _LOG_EVENTS.items()}
    if planned:
        out.update(planned_batches=len(planned), planned_requests=sum(p[0] for p in planned),
                   shared_groups=sum(p[1] for p in planned), joined_live_groups=sum(p[2] for p in planned))
    return out if any(out.values()) else {}


# ---- one arm ---------------------------------------------------------------------------------


class HttpCounter:
    """Counts the /generate requests and items the client sends (both endpoints call
    `http_request` from their module's globals, so both are wrapped while the arm runs)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.items = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator["HttpCounter"]:
        import sglang.lang.backend.runtime_endpoint as plain
        import sglang_batchllm.frontend.coalescing as coalescing

        modules = [m for m in (plain, coalescing) if hasattr(m, "http_request")]
        originals = [m.http_request for m in modules]

        def wrap(orig: Callable) -> Callable:
            def counted(url, *a, **kw):
                if url.endswith("/generate"):
                    body = kw.get("json") or {}
                    inp = body.get("text", body.get("input_ids"))
                    single = isinstance(inp, str) or not inp or not isinstance(inp[0], (list, str))
                    with self.lock:
                        self.requests += 1
                        self.items += 1 if single else len(inp)
                return orig(url, *a, **kw)

            return counted

        for m, orig in zip(modules, originals):
            m.http_request = wrap(orig)
        try:
            yield self
        finally:
            for m, orig in zip(modules, originals):
                m.http_request = orig


def _call(arm: str, program, args_list: list[dict], url: str, progress_bar: bool) -> list:
    from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

    backend = RuntimeEndpoint(url)
    # the same options for all arms; num_threads left at run_batch's default ("auto")
    options = dict(backend=backend, temperature=0, max_new_tokens=fw.GEN_TOKENS, ignore_eos=True,
                   progress_bar=progress_bar)
    if arm == "batchllm-dropin":
        import sglang_batchllm

        return sglang_batchllm.run_batch(program, args_list, **options)
    return program.run_batch(args_list, **options)


def _outputs(states: list) -> tuple[list[dict], list[str]]:
    rows, errors = [], []
    for i, s in enumerate(states):
        err = s.error()
        if err is not None:
            errors.append(f"program {i}: {type(err).__name__}: {err}")
        rows.append({"i": i, **{n: s.stream_executor.variables.get(n) for n in fw.GEN_NAMES},
                     "error": None if err is None else f"{type(err).__name__}: {err}"})
    return rows, errors


def run_arm(arm: str, args: argparse.Namespace, workload: fw.FrontendWorkload, out: Path, settings: dict) -> dict:
    """Start the arm's server, warm up, time run_batch over the workload, stop the server."""
    import requests

    raw = out / "raw"
    spec = server_spec(arm, args, out)
    program = fw.make_program()
    batch = workload.args()
    log_path = raw / f"{arm}.server.log"
    with Server(spec, log_path, args.server_timeout) as server:
        print(f"  server ready in {server.ready_s:.1f} s: {shlex.join(server.cmd)}", flush=True)
        info = server_info(server.url)
        if args.warmup:
            t = time.perf_counter()
            states = _call(arm, program, fw.warmup_args(args.warmup, args.seed), server.url, False)
            _, errors = _outputs(states)
            if errors:
                raise RuntimeError(f"the warm-up failed ({len(errors)} of {args.warmup} programs), first: {errors[0]}\n"
                                   f"last lines of {log_path}:\n{server.log_tail()}")
            print(f"  warm-up: {args.warmup} programs in {time.perf_counter() - t:.1f} s", flush=True)
        # Start the timed run with an empty prefix cache in every arm.
        flushed = requests.post(server.url + "/flush_cache", timeout=60).status_code == 200
        metrics_before = scrape_metrics(server.url)
        log_offset = log_path.stat().st_size
        counter = HttpCounter()
        with counter.installed():
            t0 = time.perf_counter()
            states = _call(arm, program, batch, server.url, args.progress_bar)
            wall = time.perf_counter() - t0
        metrics_after = scrape_metrics(server.url)
        time.sleep(0.5 if not args.fake_server else 0)  # let the scheduler's last log lines reach the file
        with open(log_path, "rb") as f:
            f.seek(log_offset)
            timed_log = f.read().decode(errors="replace")
    rows, errors = _outputs(states)
    with open(raw / f"{arm}.outputs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    deltas = metric_deltas(metrics_before, metrics_after)
    batchllm = {k.removeprefix("sglang:batchllm_"): v for k, v in deltas.items() if k.startswith("sglang:batchllm_")}
    logged = log_stats(timed_log)
    return {
        "arm": arm,
        "description": ARMS[arm],
        "settings_hash": settings_hash(arm, settings),
        "settings": settings,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": wall,
        "programs": len(batch),
        "programs_per_s": len(batch) / wall if wall > 0 else None,
        "errors": len(errors),
        "first_errors": errors[:5],
        "client_http": {"generate_requests": counter.requests, "generate_items": counter.items},
        "server": {"command": shlex.join(spec.command(0)).replace("--port 0", "--port PORT"),
                   "ready_s": server.ready_s, "info": info, "flushed_before_run": flushed},
        "server_metrics": {k: v for k, v in deltas.items() if not k.startswith("sglang:batchllm_")},
        "batchllm_stats": {"metrics": batchllm or None, "log": logged or None},
        "outputs": str(raw / f"{arm}.outputs.jsonl"),
    }


# ---- settings, resume, comparison -----------------------------------------------------------


def run_settings(args: argparse.Namespace, workload: fw.FrontendWorkload) -> dict:
    """Everything an arm's result depends on (not the port, not --out): two results with equal
    settings measure the same thing."""
    if args.fake_server:
        model = "fake server"
    elif args.equality:
        model = "bundled model, trained weights"
    else:
        model = "Llama-3.1-8B shape (bench/model.py), dummy weights, bundled tokenizer"
    return {"schema": RESULT_SCHEMA, "mode": "equality" if args.equality else "speed", "fake_server": args.fake_server,
            "model": model, "server_flags": list(args.server_flags), "workload": workload.workload_info()["fingerprint"],
            "seed": args.seed, "scale": args.scale, "programs": workload.num_programs, "warmup": args.warmup,
            "gen_tokens": fw.GEN_TOKENS, "sampling": {"temperature": 0, "ignore_eos": True}}


def settings_hash(arm: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps([arm, settings], sort_keys=True).encode()).hexdigest()[:16]


def stored_result(out: Path, arm: str, settings: dict) -> dict | None:
    path = out / "raw" / f"{arm}.json"
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if previous.get("settings_hash") != settings_hash(arm, settings) or not Path(previous.get("outputs", "")).exists():
        return None
    return {**previous, "reused_from": str(path)}


def read_outputs(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_outputs(reference: list[dict], other: list[dict]) -> dict:
    """Program by program: identical when both gens' texts are equal and neither failed."""
    if len(reference) != len(other):
        raise ValueError(f"output files hold {len(reference)} and {len(other)} programs; they come from different runs")
    differ = [r["i"] for r, o in zip(reference, other)
              if r.get("error") or o.get("error") or any(r.get(n) != o.get(n) for n in fw.GEN_NAMES)]
    first_gen_differ = sum(1 for r, o in zip(reference, other) if r.get("answer") != o.get("answer"))
    return {"programs": len(reference), "identical": len(reference) - len(differ), "differ": len(differ),
            "first_gen_differ": first_gen_differ, "first_differing": differ[:10]}


# ---- report ---------------------------------------------------------------------------------


def assemble(header: dict, results: dict[str, dict], equality: bool) -> dict:
    ref = results.get(REFERENCE)
    arms = {}
    for arm in ARMS:
        if arm not in results:
            continue
        r = dict(results[arm])
        r["ratio_to_vanilla"] = (ref["wall_s"] / r["wall_s"]) if ref and r["wall_s"] else None
        arms[arm] = r
    comparisons = {}
    if ref is not None:
        ref_out = read_outputs(ref["outputs"])
        for arm, r in arms.items():
            if arm != REFERENCE:
                comparisons[arm] = compare_outputs(ref_out, read_outputs(r["outputs"]))
    problems = [f"{arm}: {r['errors']} program(s) failed, first: {r['first_errors'][0]}"
                for arm, r in arms.items() if r["errors"]]
    differ = [arm for arm, c in comparisons.items() if c["differ"]]
    return {**header, "arms": arms, "equality": comparisons, "problems": problems,
            "outputs_identical": not differ if comparisons else None, "checked_equality": equality}


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _stats_cell(r: dict) -> str:
    stats = r.get("batchllm_stats") or {}
    parts = []
    for k, v in sorted((stats.get("metrics") or {}).items()):
        parts.append(f"{k} {v:,.0f}")
    for k, v in sorted((stats.get("log") or {}).items()):
        parts.append(f"{k} {v:,}")
    return ", ".join(parts) if parts else "none exported"


def markdown(record: dict) -> str:
    s = record["settings"]
    tok = record["workload"]["tokens"]
    fake = s["fake_server"]
    lines = [
        f"# Frontend run_batch benchmark ({s['mode']}{', FAKE SERVER' if fake else ''})",
        "",
        f"- Date: {record['date']}",
        f"- Command: `{record['command']}`",
        f"- Commit: {record['git'].get('commit') or '-'}{' (dirty tree)' if record['git'].get('dirty') else ''}",
        f"- Host: {record['host']['gpu'] or 'no GPU'}, Python {record['host']['python']}, SGLang {record['host']['sglang'] or '-'}",
        f"- Model: {s['model']}; extra server flags: `{shlex.join(s['server_flags']) or '(none)'}`",
        f"- Workload: {tok['programs']:,} programs, {tok['documents']:,} documents; tokens (bundled tokenizer): system "
        f"{tok['system']['mean']:.0f}, document mean {tok['document']['mean']:.0f}, question mean "
        f"{tok['question']['mean']:.0f}, first-gen prompt mean {tok['first_gen_prompt']['mean']:.0f}; 2 gens x "
        f"{tok['gen_tokens']} tokens, temperature 0, ignore_eos; seed {s['seed']}, scale {s['scale']:g}",
        "- Timed: the run_batch call only (server start-up and warm-up before it, prefix cache flushed)",
    ]
    if fake:
        lines.append("- **The fake server is no model: these times test the pipeline and measure nothing.**")
    lines += ["", "| arm | wall s | programs/s | x vanilla | target | /generate requests (items) | errors | BatchLLM stats |",
              "|---|---:|---:|---:|---|---:|---:|---|"]
    for arm, r in record["arms"].items():
        target = TARGETS.get(arm)
        ratio = r.get("ratio_to_vanilla")
        if target is None:
            tcell = "-"
        elif ratio is None or fake or s["mode"] != "speed":
            tcell = f">= {target:g}x"
        else:
            tcell = f">= {target:g}x: {'met' if ratio >= target else 'NOT met'}"
        http = r.get("client_http", {})
        reused = " (earlier command)" if r.get("reused_from") else ""
        lines.append(f"| {arm}{reused} | {_f(r['wall_s'])} | {_f(r['programs_per_s'])} | {_f(ratio)} | {tcell} | "
                     f"{http.get('generate_requests', 0):,} ({http.get('generate_items', 0):,}) | {r['errors']} | "
                     f"{_stats_cell(r)} |")
    lines += ["", "Server counters over the timed run (SGLang's /metrics):", ""]
    for arm, r in record["arms"].items():
        m = r.get("server_metrics") or {}
        lines.append(f"- {arm}: " + (", ".join(f"{k.removeprefix('sglang:')} {v:,.0f}" for k, v in m.items())
                                    or "none (no /metrics)") + f"; server: `{r['server']['command']}`, "
                     + ", ".join(f"{k} {v}" for k, v in (r["server"].get("info") or {}).items()))
    if record["equality"]:
        lines += ["", "## Outputs against vanilla (program by program, both gens' texts)", "",
                  "| arm | identical | differ | first gen differs | first differing programs |", "|---|---:|---:|---:|---|"]
        for arm, c in record["equality"].items():
            lines.append(f"| {arm} | {c['identical']:,} / {c['programs']:,} | {c['differ']:,} | {c['first_gen_differ']:,} | "
                         f"{', '.join(map(str, c['first_differing'])) or '-'} |")
    for p in record["problems"]:
        lines.append(f"\n**Problem: {p}**")
    return "\n".join(lines) + "\n"


def write_report(record: dict, out: Path) -> list[Path]:
    (out / "result.json").write_text(json.dumps(record, indent=1))
    (out / "report.md").write_text(markdown(record))
    return [out / "result.json", out / "report.md"]


# ---- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = command_line(argv)
    return entry.run_command(lambda: _run(args, command), command,
                             "the server was stopped; finished arms stay in OUT/raw/ and the same command "
                             "with --resume reuses them")


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(args: argparse.Namespace, command: str) -> int:
    t = time.perf_counter()
    workload = fw.build(args.seed, args.scale)
    stats = workload.token_stats()
    print(fw.format_token_stats(stats))
    print(f"  workload fingerprint {workload.fingerprint()} (built and measured in {time.perf_counter() - t:.1f} s)",
          flush=True)
    out = Path(args.out or f"bench-out/run-batch-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}").resolve()
    if args.dry_run:
        for arm in args.arms:
            cmd = shlex.join(server_spec(arm, args, out, write=False).command(0)).replace("--port 0", "--port PORT")
            print(f"  {arm}: {ARMS[arm]}\n    server: {cmd}")
        print("dry run: no server started, no GPU used")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args, workload)
    results: dict[str, dict] = {}
    for n, arm in enumerate(args.arms, 1):
        print(f"[{n}/{len(args.arms)}] {arm}: {ARMS[arm]}", flush=True)
        previous = stored_result(out, arm, settings) if args.resume else None
        if previous is not None:
            print(f"  reusing {previous['reused_from']} (same settings)", flush=True)
            results[arm] = previous
            continue
        (out / "raw" / f"{arm}.json").unlink(missing_ok=True)
        result = run_arm(arm, args, workload, out, settings)
        result["command"] = command
        (out / "raw" / f"{arm}.json").write_text(json.dumps(result, indent=1))
        results[arm] = result
        print(f"  {result['wall_s']:.2f} s, {result['programs_per_s']:.1f} programs/s, {result['errors']} failed, "
              f"{result['client_http']['generate_requests']:,} /generate requests", flush=True)
    for arm in ARMS:  # arms of earlier commands into this --out with the same settings
        if arm not in results:
            earlier = stored_result(out, arm, settings)
            if earlier is not None:
                print(f"[{arm}] from an earlier command: {earlier['reused_from']}", flush=True)
                results[arm] = earlier
    header = {
        "schema": RESULT_SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git": git_info(),
        "host": {"gpu": _gpu_name(), "python": platform.python_version(), "sglang": _version("sglang")},
        "settings": settings,
        "workload": workload.workload_info(),
    }
    record = assemble(header, results, args.equality)
    paths = write_report(record, out)
    print("\n" + markdown(record))
    print(f"Wrote {', '.join(str(p) for p in paths)}")
    for p in record["problems"]:
        print(f"error: {p}", file=sys.stderr)
    print(f"Reproduce with: {command}")
    if record["problems"]:
        return 2
    if args.equality and record["outputs_identical"] is False:
        return 1
    return 0
