"""Which SGLang this patch set was written for, and the check that enforces it.

Our patches hook SGLang internals by dotted path (see `sglang_batchllm.patches`); those paths
and the behaviour around them are only known for one release. Running them against another
release could fail in subtle ways, so enabling BatchLLM on any other version stops at once.
A plain `sglang` run never reaches this check: the plugin is inert unless enabled.
"""

from __future__ import annotations

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
