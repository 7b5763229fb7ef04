"""`--batchllm-*` flags on SGLang's own command line.

Targets (SGLang 0.5.17, `sglang/srt/server_args.py`):
- `ServerArgs.add_cli_args` (staticmethod), AFTER: adds a "BatchLLM" argument group, one
  flag per `BatchLLMConfig` field, so `--help` lists SGLang's flags and ours together.
- `ServerArgs.from_cli_args` (classmethod), AROUND: turns the parsed `--batchllm-*` values
  into a validated `BatchLLMConfig` and exports it as `SGLANG_BATCHLLM_*` variables, which
  the spawned scheduler processes inherit.

Why no official seam serves: SGLang has no hook for plugin flags. `ServerArgs` is a dataclass
that `from_cli_args` fills from its own fields only (anything else on the namespace is dropped),
it is read-only after `__post_init__`, and `bench_offline_throughput` rebuilds it through
`dataclasses.asdict`, so extra fields on it would be lost. The environment is the channel that
reaches every process.
"""

from __future__ import annotations

import argparse
import os

from sglang_batchllm.compat import SUPPORTED_SGLANG_VERSION
from sglang_batchllm.config import BatchLLMConfig, ConfigError, cli_fields, flag_name
from sglang_batchllm.patches import Patch

_GROUP_TITLE = "BatchLLM (sglang_batchllm)"


def add_batchllm_flags(parser: argparse.ArgumentParser) -> None:
    if any(action.dest == f"batchllm_{f.name}" for f in cli_fields(server=True) for action in parser._actions):
        return  # already added to this parser
    group = parser.add_argument_group(
        _GROUP_TITLE, "Also settable as SGLANG_BATCHLLM_<NAME> environment variables."
    )
    defaults = BatchLLMConfig()
    for f in cli_fields(server=True):
        is_bool, is_str = f.type in ("bool", bool), f.type in ("str", str)
        group.add_argument(
            flag_name(f.name),
            dest=f"batchllm_{f.name}",
            type=_parse_bool if is_bool else str if is_str else int,
            default=None,  # None = not given on the command line: keep the environment's value
            metavar="0|1" if is_bool else "PATH" if is_str else "N",
            help=f"{f.metadata['help']}" + (f" Default: {getattr(defaults, f.name)}." if getattr(defaults, f.name) != "" else ""),
        )


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")


def config_from_args(args: argparse.Namespace, base: BatchLLMConfig) -> BatchLLMConfig:
    given = {
        f.name: getattr(args, f"batchllm_{f.name}")
        for f in cli_fields(server=True)
        if getattr(args, f"batchllm_{f.name}", None) is not None
    }
    return base.replace(**given)


def _after_add_cli_args(result, parser, *args, **kwargs):
    add_batchllm_flags(parser)
    return result


def _around_from_cli_args(original, cls, args, *rest, **kwargs):
    try:
        config = config_from_args(args, BatchLLMConfig.from_env())
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    os.environ.update(config.to_env())
    return original(cls, args, *rest, **kwargs)


def _install(config: BatchLLMConfig) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.add_cli_args", _after_add_cli_args, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.server_args.ServerArgs.from_cli_args", _around_from_cli_args, HookType.AROUND
    )


PATCH = Patch(
    name="cli_flags",
    targets=(
        "sglang.srt.server_args.ServerArgs.add_cli_args",
        "sglang.srt.server_args.ServerArgs.from_cli_args",
    ),
    sglang_version=SUPPORTED_SGLANG_VERSION,
    why_no_seam="SGLang has no seam for plugin CLI flags and ServerArgs drops non-field values.",
    install=_install,
)
