"""The plugin: registered, inert unless enabled, idempotent, CUDA-free, version-gated.

SGLang loads plugins once per process, so each scenario runs in a fresh interpreter."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest

OUR_PLUGIN = "batchllm"


def _run(code: str, env_extra: dict[str, str] | None = None, args: list[str] | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *(args or [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return out


PROBE = """
import json, sys
from sglang.srt.plugins import load_plugins
from sglang.srt.plugins.hook_registry import HookRegistry
load_plugins()
import torch
ours = sorted(t for t, hooks in HookRegistry._hooks.items()
              for _, _, src in hooks if src is not None and src.plugin_name == "batchllm")
print(json.dumps({
    "our_hooks": ours,
    "all_hook_targets": sorted(HookRegistry._hooks),
    "patches_imported": "sglang_batchllm.patches" in sys.modules,
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""


def _probe(env_extra=None) -> dict:
    out = _run(PROBE, env_extra)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_entry_point_is_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get(OUR_PLUGIN) == "sglang_batchllm.plugin:register"


def _without_our_plugin() -> dict:
    others = [ep.name for ep in entry_points(group="sglang.srt.plugins") if ep.name != OUR_PLUGIN]
    return {"SGLANG_PLUGINS": ",".join(others) or "none"}


def test_inert_when_not_enabled():
    result = _probe()
    assert result["our_hooks"] == []
    assert not result["patches_imported"]
    assert not result["cuda_initialized"]
    # Every hook in the process is one the other installed plugins would register anyway.
    assert result["all_hook_targets"] == _probe(_without_our_plugin())["all_hook_targets"]


def test_inert_even_with_other_batchllm_variables_set():
    # A typo'd or stale variable must not break (or change) a plain sglang run.
    result = _probe({"SGLANG_BATCHLLM_LEVELS": "not-a-number"})
    assert result["our_hooks"] == [] and not result["patches_imported"]


def test_enabled_registers_patches_without_cuda():
    result = _probe({"SGLANG_BATCHLLM_ENABLE": "1"})
    assert result["our_hooks"] == sorted(ENABLED_HOOKS)
    assert not result["cuda_initialized"]


def test_schedule_off_keeps_only_the_flags_the_reports_and_the_attention_facts():
    # the batchllm attention backend also groups rows that SGLang's own radix matching made
    # share, so its per-row facts stay on without BatchLLM's scheduler; retractions are still
    # counted and reported (the batch command's summary)
    result = _probe({"SGLANG_BATCHLLM_ENABLE": "1", "SGLANG_BATCHLLM_SCHEDULE": "0"})
    assert result["our_hooks"] == sorted(FLAG_HOOKS + REPORT_HOOKS + FORWARD_FACTS_HOOKS)


FLAG_HOOKS = [
    "sglang.srt.server_args.ServerArgs.add_cli_args",
    "sglang.srt.server_args.ServerArgs.from_cli_args",
]
REPORT_HOOKS = [
    "sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode",
    "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
]
FORWARD_FACTS_HOOKS = [
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
    "sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch",
]
ENABLED_HOOKS = FLAG_HOOKS + [
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._should_use_batch_tokenization",
    "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw",
    "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
    "sglang.srt.mem_cache.common.release_kv_cache",
    # the gather hold's clock from TP rank 0 (on by default: --batchllm-gather-ms 5)
    "sglang.srt.managers.scheduler_components.request_receiver.SchedulerRequestReceiver._pull_raw_reqs",
    "sglang.srt.managers.scheduler.Scheduler.process_input_requests",
] + REPORT_HOOKS + FORWARD_FACTS_HOOKS  # per-row cached-prefix facts for the attention backend


def test_register_is_idempotent():
    code = """
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang_batchllm.plugin import register
    load_plugins(); register(); register(); HookRegistry.apply_hooks()
    n = {t: sum(1 for _, _, src in h if src is not None and src.plugin_name == "batchllm")
         for t, h in HookRegistry._hooks.items()}
    n = {t: c for t, c in n.items() if c}
    print(n)
    assert all(v == 1 for v in n.values()) and len(n) == %d, n
    """ % len(ENABLED_HOOKS)
    out = _run(code, {"SGLANG_BATCHLLM_ENABLE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]


def test_wrong_sglang_version_stops_with_a_clear_message():
    code = """
    import sglang_batchllm.compat as compat
    compat.installed_sglang_version = lambda: "0.5.16"
    from sglang_batchllm.plugin import register
    register()
    """
    out = _run(code, {"SGLANG_BATCHLLM_ENABLE": "1"})
    assert out.returncode != 0
    assert "supports only SGLang 0.5.17, but SGLang 0.5.16 is installed" in out.stderr
    assert "pip install sglang==0.5.17" in out.stderr


def test_wrong_version_is_ignored_when_not_enabled():
    code = """
    import sglang_batchllm.compat as compat
    compat.installed_sglang_version = lambda: "0.5.16"
    from sglang_batchllm.plugin import register
    register()
    print("ok")
    """
    out = _run(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_bad_setting_stops_when_enabled():
    code = """
    from sglang_batchllm.plugin import register
    register()
    """
    out = _run(code, {"SGLANG_BATCHLLM_ENABLE": "1", "SGLANG_BATCHLLM_LEVELS": "0"})
    assert out.returncode != 0 and "out of range" in out.stderr


def test_unreadable_master_switch_stops_a_process_that_loads_the_plugin():
    # Set but neither on nor off: a user error, not a plain run. SystemExit passes SGLang's loader.
    code = """
    from sglang.srt.plugins import load_plugins
    load_plugins()
    print("ran")
    """
    out = _run(code, {"SGLANG_BATCHLLM_ENABLE": "maybe"})
    assert out.returncode != 0 and "ran" not in out.stdout
    assert "SGLANG_BATCHLLM_ENABLE='maybe'" in out.stderr and "1/true/yes/on" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr[-3000:]


def test_empty_master_switch_is_off():
    result = _probe({"SGLANG_BATCHLLM_ENABLE": ""})
    assert result["our_hooks"] == [] and not result["patches_imported"]


def _sglang_help(env_extra=None) -> str:
    # SGLang builds some choice lists from sets: fix the hash seed so two runs print alike.
    env_extra = {"PYTHONHASHSEED": "0", **(env_extra or {})}
    out = _run("import runpy, sys; runpy.run_module('sglang.launch_server', run_name='__main__')",
               env_extra, ["--help"])
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("enabled", [False, True])
def test_plain_sglang_launcher_help(enabled):
    # Plain `python -m sglang.launch_server` is unchanged by the installed package unless
    # BatchLLM is enabled: its --help equals the one with our plugin excluded entirely.
    without_us = _sglang_help(_without_our_plugin())
    with_us = _sglang_help({"SGLANG_BATCHLLM_ENABLE": "1"} if enabled else None)
    if enabled:
        assert "--batchllm-levels" in with_us
    else:
        assert with_us == without_us
        assert "batchllm" not in with_us.lower()


def test_missing_entry_point_stops_the_engine_and_launcher():
    code = """
    import importlib.metadata as md
    import sglang_batchllm.plugin as plugin
    plugin.entry_points = lambda group: []
    try:
        plugin.require_entry_point()
    except SystemExit as exc:
        print(exc)
    """
    out = _run(code)
    assert "entry point is missing" in out.stdout and "python -m pip install -e ." in out.stdout
