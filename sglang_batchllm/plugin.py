"""SGLang plugin entry point (`sglang.srt.plugins` group, name `batchllm`).

SGLang calls `register()` in every process that loads plugins: the launcher's main process,
`Engine.__init__`, and the first line of every spawned scheduler process. So it must be

- inert unless BatchLLM is enabled (`SGLANG_BATCHLLM_ENABLE=1`, set by our launcher and
  Engine): installing the package never changes a plain `sglang` run;
  a switch set to something that is neither on nor off (`maybe`) stops the process with
  a message, as it is a user error, not a plain run;
- idempotent: registering hooks twice in one process would wrap targets twice;
- free of CUDA: in the scheduler it runs before the device is configured, so it only
  registers hooks; nothing here allocates tensors or compiles kernels.

SGLang's loader logs and swallows ordinary exceptions from `register()`. Errors that must stop
the run (unsupported SGLang version, bad settings) are raised as `SystemExit`, which it does not
catch, so a misconfigured BatchLLM never silently runs as plain SGLang.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from sglang_batchllm.compat import check_sglang_version
from sglang_batchllm.config import BatchLLMConfig, ConfigError, is_enabled

logger = logging.getLogger(__name__)

_active_config: BatchLLMConfig | None = None


def register() -> None:
    global _active_config
    try:
        enabled = is_enabled()
    except ConfigError as err:  # the switch is set but unreadable: say so rather than run plain SGLang
        raise SystemExit(f"sglang_batchllm: {err}") from None
    if not enabled:
        return
    if _active_config is not None:
        return
    check_sglang_version()
    try:
        config = BatchLLMConfig.from_env()
    except ConfigError as err:
        raise SystemExit(f"sglang_batchllm: {err}") from None

    from sglang_batchllm import patches
    from sglang_batchllm.runtime import attention_backend, pinned_cache

    # official seams: SGLang's radix-cache and attention-backend registries
    pinned_cache.register()
    attention_backend.register()
    installed = patches.install_all(config)
    _active_config = config
    logger.info("sglang_batchllm enabled (%s); patches: %s", config, ", ".join(installed) or "none")


ENTRY_POINT = "sglang_batchllm.plugin:register"


def require_entry_point() -> None:
    """Stop unless SGLang's plugin loader will find us: the scheduler processes load the plugin
    only through its entry point, so a package that is merely importable (on PYTHONPATH, or
    installed by another interpreter's pip) would silently run as plain SGLang."""
    if ENTRY_POINT not in {ep.value for ep in entry_points(group="sglang.srt.plugins")}:
        raise SystemExit(
            "sglang_batchllm is importable but not installed as an SGLang plugin (its "
            "`sglang.srt.plugins` entry point is missing from this interpreter), so SGLang's "
            "scheduler processes would run without it. Install it with this interpreter: "
            "`python -m pip install -e .` in the repository."
        )


def active_config() -> BatchLLMConfig | None:
    """The config this process registered with, or None while the plugin is inert."""
    return _active_config
