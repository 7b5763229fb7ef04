"""Which SGLang this patch set was written for, and the check that enforces it.

Our patches hook SGLang internals by dotted path (see `sglang_batchllm.patches`); those paths
and the behaviour around them are only known for one release. Running them against another
release could fail in subtle ways, so enabling BatchLLM on any other version stops at once.
A plain `sglang` run never reaches this check: the plugin is inert unless enabled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

SUPPORTED_SGLANG_VERSION = "0.5.17"


class UnsupportedSGLangVersion(SystemExit):
    """Raised (as a SystemExit, so SGLang's plugin loader does not swallow it) when BatchLLM is
    enabled on an SGLang release it was not written for."""


def installed_sglang_version() -> str | None:
    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


def check_sglang_version(found: str | None = None) -> None:
    found = installed_sglang_version() if found is None else found
    if found == SUPPORTED_SGLANG_VERSION:
        return
    what = "SGLang is not installed" if found is None else f"SGLang {found} is installed"
    raise UnsupportedSGLangVersion(
        f"sglang_batchllm supports only SGLang {SUPPORTED_SGLANG_VERSION}, but {what}. "
        f"Install the supported release with `pip install sglang=={SUPPORTED_SGLANG_VERSION}`, "
        "or run without BatchLLM (unset SGLANG_BATCHLLM_ENABLE and use plain `sglang`)."
    )


# ---- a CUDA GPU ---------------------------------------------------------------------------

WITHOUT_A_GPU = (
    "Without a GPU you can still run: `python -m sglang_batchllm.plan FILE.jsonl` (the prefix plan of a "
    "batch file), `python -m sglang_batchllm.batch FILE.jsonl --dry-run` (check every line and preview "
    "the plan) and the CPU tests (`python -m pytest tests`; GPU tests skip themselves)."
)


class NoCudaGPU(SystemExit):
    """Raised (as a SystemExit: a plain message, no traceback) when BatchLLM would start an engine
    on a machine without a CUDA GPU and no other SGLang device was asked for."""


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver install reads as no GPU
        return False


def require_cuda(device: str | None = None, *, what: str = "Serving with BatchLLM",
                 other_device: str = "--device", environ: Mapping[str, str] | None = None) -> None:
    """Stop with a plain message unless a CUDA GPU is visible. A `device` the user asked for
    (SGLang's `--device cpu`, `xpu`, ...; or SGLang's CPU engine, SGLANG_USE_CPU_ENGINE=1) means
    they know what they are doing: SGLang handles it. Without this check SGLang ends in a long
    "No accelerator" traceback while building its ServerArgs."""
    environ = os.environ if environ is None else environ
    if device or environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1" or cuda_available():
        return
    raise NoCudaGPU(
        f"sglang_batchllm: {what} needs a CUDA GPU, and none is visible (torch.cuda.is_available() is "
        f"False; check the driver and CUDA_VISIBLE_DEVICES). {WITHOUT_A_GPU} To run on another SGLang "
        f"device anyway, pass {other_device} (e.g. cpu)."
    )


def device_in_argv(argv: list[str]) -> str | None:
    """The value of SGLang's `--device` in a command line (or in the YAML `--config` file it
    names), or None when it is not given."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path:
            try:
                import yaml

                with open(path, encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except Exception:  # noqa: BLE001 - SGLang's own parser reports a bad config file
                return "(see --config)"  # cannot tell: let SGLang decide
            if isinstance(data, dict) and data.get("device"):
                return str(data["device"])
    return None
