import os
import subprocess
import sys

import pytest

from sglang_batchllm.bundled_model import model_dir
from sglang_batchllm.config import cli_fields, flag_name
from sglang_batchllm.launch_server import with_default_model


def test_help_lists_sglang_and_batchllm_flags_on_cpu():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-m", "sglang_batchllm.launch_server", "--help"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for flag in ["--model-path", "--tp-size", "--schedule-policy", "--attention-backend"]:
        assert flag in out.stdout
    for f in cli_fields():
        assert flag_name(f.name) in out.stdout
    assert "BatchLLM (sglang_batchllm)" in out.stdout


def test_bundled_model_is_the_default():
    argv = with_default_model(["--port", "30001"])
    assert argv == ["--port", "30001", "--model-path", model_dir()]  # its trained weights


@pytest.mark.parametrize(
    "argv",
    [["--model-path", "/m"], ["--model=/m"], ["--config", "c.yaml"], ["--help"], ["-h"]],
)
def test_user_model_is_kept(argv):
    assert with_default_model(list(argv)) == argv


def test_user_load_format_is_kept():
    argv = with_default_model(["--load-format", "auto"])
    assert argv == ["--load-format", "auto", "--model-path", model_dir()]


def test_flags_reach_the_environment_and_are_validated(monkeypatch):
    # What the spawned schedulers will see: from_cli_args exports our flags as env vars.
    code = """
import os
os.environ["SGLANG_BATCHLLM_ENABLE"] = "1"
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
from sglang_batchllm.bundled_model import model_dir
prepare_server_args(["--model-path", model_dir(), "--batchllm-levels", "3", "--device", "cpu"])
print(os.environ["SGLANG_BATCHLLM_LEVELS"], os.environ["SGLANG_BATCHLLM_MIN_PREFIX_TOKENS"])
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    env["SGLANG_BATCHLLM_MIN_PREFIX_TOKENS"] = "48"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "3 48"

    bad = code.replace('"3"', '"0"')
    out = subprocess.run([sys.executable, "-c", bad], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "out of range" in (out.stdout + out.stderr)


def test_engine_is_an_sglang_engine_and_splits_our_keywords():
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    from sglang_batchllm import Engine
    from sglang_batchllm.config import BatchLLMConfig, ConfigError
    from sglang_batchllm.engine import split_batchllm_kwargs

    assert issubclass(Engine, SGLangEngine)
    assert Engine.run_scheduler_process_func is SGLangEngine.run_scheduler_process_func
    kwargs = {"model_path": "m", "batchllm_levels": 2}
    assert split_batchllm_kwargs(kwargs, BatchLLMConfig()) == BatchLLMConfig(levels=2)
    assert kwargs == {"model_path": "m"}
    with pytest.raises(ConfigError, match="batchllm_levels"):
        split_batchllm_kwargs({"batchllm_level": 2}, BatchLLMConfig())


# ---- no CUDA GPU: a plain message, not SGLang's "No accelerator" traceback -------------------

def _no_gpu_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("SGLANG_USE_CPU_ENGINE", None)
    return env


def _assert_plain_no_gpu_message(out):
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "No accelerator" not in out.stderr, out.stderr[-3000:]
    assert "needs a CUDA GPU" in out.stderr
    for runs_without_one in ("sglang_batchllm.plan", "sglang_batchllm.batch", "--dry-run", "pytest"):
        assert runs_without_one in out.stderr


def test_launch_server_without_a_gpu_says_so_plainly():
    out = subprocess.run([sys.executable, "-m", "sglang_batchllm.launch_server", "--port", "30123"],
                         capture_output=True, text=True, env=_no_gpu_env(), timeout=300)
    _assert_plain_no_gpu_message(out)


def test_engine_without_a_gpu_says_so_plainly():
    code = "import sglang_batchllm; sglang_batchllm.Engine()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_no_gpu_env(),
                         timeout=300)
    _assert_plain_no_gpu_message(out)
    assert "device=" in out.stderr


def test_gpu_check_respects_an_explicit_device(monkeypatch, tmp_path):
    from sglang_batchllm import compat

    monkeypatch.setattr(compat, "cuda_available", lambda: False)
    with pytest.raises(compat.NoCudaGPU, match="needs a CUDA GPU"):
        compat.require_cuda(None, environ={})
    compat.require_cuda("cpu", environ={})  # the user asked for another device: SGLang's business
    compat.require_cuda(None, environ={"SGLANG_USE_CPU_ENGINE": "1"})
    monkeypatch.setattr(compat, "cuda_available", lambda: True)
    compat.require_cuda(None, environ={})

    assert compat.device_in_argv(["--port", "1"]) is None
    assert compat.device_in_argv(["--device", "cpu"]) == "cpu"
    assert compat.device_in_argv(["--device=xpu"]) == "xpu"
    config = tmp_path / "c.yaml"
    config.write_text("device: cpu\nport: 1\n")
    assert compat.device_in_argv(["--config", str(config)]) == "cpu"
    config.write_text("port: 1\n")
    assert compat.device_in_argv([f"--config={config}"]) is None


def test_engine_checks_the_gpu_before_building_server_args(monkeypatch):
    """With mocks on CPU: no GPU and no device stops with NoCudaGPU before SGLang is involved; a
    device (or a ready ServerArgs) reaches SGLang's constructor."""
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    from sglang_batchllm import Engine, compat

    monkeypatch.setattr(compat, "cuda_available", lambda: False)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    reached = []
    monkeypatch.setattr(SGLangEngine, "__init__", lambda self, **kw: reached.append(kw))
    with pytest.raises(compat.NoCudaGPU):
        Engine()
    assert reached == []
    Engine(device="cpu")
    Engine(server_args=object())
    assert len(reached) == 2 and reached[0]["device"] == "cpu"


def test_server_args_from_flags_accept_batchllm_backends_in_a_fresh_process():
    """The batch command builds ServerArgs from flags before any plugin is loaded in its
    process; SGLang's argparse then knew neither `batchllm` backend and the command stopped
    with "invalid choice: 'batchllm'" on the GPU (found there, 2026-12-04). A fresh
    interpreter, BatchLLM off in its environment, is the case that matters."""
    code = """
from sglang.srt.server_args import prepare_server_args
from sglang_batchllm.defaults import with_default_flags
try:
    prepare_server_args(with_default_flags(["--device", "cpu", "--model-path", "x"]))
    print("PLAIN ACCEPTED")
except SystemExit:
    print("PLAIN REFUSED")
from sglang_batchllm.launch_server import server_args_from_argv
args = server_args_from_argv(["--device", "cpu"])
print("BUILT", args.attention_backend, args.radix_cache_backend, args.model_path)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # without registering first, SGLang's parser refuses our default flags: what the helper is for
    assert "PLAIN REFUSED" in out.stdout
    assert f"BUILT batchllm batchllm {model_dir()}" in out.stdout

