"""The benchmark's child processes: the matmul calibration and one process per engine run
(runner.py says why an engine gets a process of its own), with the environment each needs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from .runner import RunSpec
from .workloads import Workload, WorkloadSpec

PLUGIN_NAME = "batchllm"  # our entry point in the sglang.srt.plugins group (pyproject.toml)


def vanilla_env(environ: Mapping[str, str], plugin_names: Sequence[str]) -> dict[str, str]:
    """The vanilla engine's environment: no BatchLLM settings, and the BatchLLM plugin left out
    of SGLANG_PLUGINS (other plugins stay as the user has them)."""
    env = {k: v for k, v in environ.items() if not k.startswith("SGLANG_BATCHLLM")}
    current = environ.get("SGLANG_PLUGINS", "")
    names = [n.strip() for n in current.split(",") if n.strip()] if current else list(plugin_names)
    kept = [n for n in names if n != PLUGIN_NAME]
    env["SGLANG_PLUGINS"] = ",".join(kept) if kept else "__none__"
    return env


def installed_plugin_names() -> list[str]:
    return [ep.name for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")]


def git_info() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip() or None, "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


# Children import this working tree's sglang_batchllm even where it is not pip-installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _run_child(module: str, arg: str, env: Mapping[str, str] | None = None) -> int:
    env = dict(env if env is not None else os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, "-m", module, arg], env=env)
    try:
        return proc.wait()
    except BaseException:  # interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the CLI)
        kill_tree(proc)
        raise


def kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a child and everything it started (an engine's scheduler and detokenizer
    processes hold the GPU), so that an interrupted benchmark leaves the GPU free."""
    try:
        import psutil

        procs = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except Exception:  # psutil missing, or the child is gone already
        procs = []
    for p in procs:
        try:
            p.terminate()
        except Exception:
            pass
    if procs:
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except Exception:
                pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _spec_hash(spec: RunSpec) -> str:
    key = json.dumps([spec.engine, spec.engine_kwargs, spec.workloads, spec.fingerprints, spec.warmup, spec.driver],
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def arm_spec(
    label: str, engine: str, driver: str, kwargs: dict, workloads: Sequence[Workload], specs: Sequence[WorkloadSpec],
    model_dir: str, out: Path, progress: str = "off",
) -> RunSpec:
    """What the arm `label` runs; its files are OUT/raw/<label>.{spec.json,json,steps.jsonl}."""
    raw = out / "raw"
    return RunSpec(engine, kwargs, model_dir, [s.to_dict() for s in specs], {w.name: w.fingerprint() for w in workloads},
                   str(raw / f"{label}.steps.jsonl"), str(raw / f"{label}.json"), progress, driver=driver)


def stored_result(spec: RunSpec) -> dict | None:
    """The result already at the spec's place in OUT/raw/ if it ran with identical settings
    (engine, keywords, workloads, driver), marked with where it came from; else None."""
    path = Path(spec.result_path)
    if not path.exists():
        return None
    previous = json.loads(path.read_text())
    if previous.get("spec_hash") != _spec_hash(spec):
        return None
    return {**previous, "reused_from": str(path)}


def run_engine(label: str, spec: RunSpec, resume: bool = False, command: str | None = None) -> dict:
    """One arm over all workloads in a child process; returns its result (runner.main).
    With `resume`, a result already in OUT/raw/ from identical settings is reused."""
    if resume:
        previous = stored_result(spec)
        if previous is not None:
            print(f"[{label}] reusing {previous['reused_from']} (same settings)", flush=True)
            return previous
    raw = Path(spec.result_path).parent
    raw.mkdir(parents=True, exist_ok=True)
    result_path = Path(spec.result_path)
    result_path.unlink(missing_ok=True)
    spec_path = raw / f"{label}.spec.json"
    spec.save(spec_path)
    env = vanilla_env(os.environ, installed_plugin_names()) if spec.engine == "vanilla" else None
    if spec.engine != "fake":
        wait_for_free_gpu()
    rc = _run_child("sglang_batchllm.bench.runner", str(spec_path), env)
    if rc != 0 or not result_path.exists():
        raise RuntimeError(f"the {label} run failed (exit status {rc}); its output is above, its spec in {spec_path}")
    result = json.loads(result_path.read_text())
    result.update(spec_hash=_spec_hash(spec), command=command)
    result_path.write_text(json.dumps(result))
    return result


def wait_for_free_gpu(timeout_s: float = 60.0) -> None:
    """Each engine must start on an empty GPU. The previous child has exited, but the driver may
    take a moment to release its memory; wait until no compute process is listed."""
    if shutil.which("nvidia-smi") is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            listed = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return
        if not listed:
            return
        if time.monotonic() > deadline:
            print(f"warning: the GPU still runs other processes (pid, memory): {listed}; starting anyway", flush=True)
            return
        time.sleep(1.0)


def measure_matmul(out: Path) -> dict:
    """The bf16 matmul rate, measured in a child process (floor.main)."""
    path = out / "raw" / "matmul.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if _run_child("sglang_batchllm.bench.floor", str(path)) != 0:
        raise RuntimeError("measuring the matmul rate failed (output above); pass --matmul-tflops to skip it")
    return json.loads(path.read_text())
