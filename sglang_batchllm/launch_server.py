"""`python -m sglang_batchllm.launch_server [SGLang flags] [--batchllm-* flags]`

Starts SGLang's HTTP server with BatchLLM on. Every SGLang flag works as with
`python -m sglang.launch_server`; `--help` lists SGLang's flags and ours. With no
`--model-path` it serves the bundled model (small trained weights shipped in the package, no
download). It also serves the
OpenAI Files and Batches API (`sglang_batchllm/batch_api/`, docs/batch-api.md).
"""

from __future__ import annotations

import os
import sys

from sglang_batchllm import bundled_model
from sglang_batchllm.compat import check_sglang_version, device_in_argv, require_cuda
from sglang_batchllm.config import env_name
from sglang_batchllm.defaults import with_default_flags
from sglang_batchllm.plugin import require_entry_point

_MODEL_FLAGS = ("--model-path", "--model", "--config")
_HELP_FLAGS = ("-h", "--help")


def _given(argv: list[str], flags: tuple[str, ...]) -> bool:
    return any(a in flags or a.split("=", 1)[0] in flags for a in argv)


def with_default_model(argv: list[str]) -> list[str]:
    """Append the bundled model unless the user named a model (or a config file that may)."""
    if _given(argv, _MODEL_FLAGS + _HELP_FLAGS):
        return argv
    return argv + ["--model-path", bundled_model.model_dir()]


def server_args_from_argv(argv: list[str]):
    """SGLang's ServerArgs for a BatchLLM run, from flags: BatchLLM's default flags and the
    bundled model unless the user set them. Every entry point that builds ServerArgs from flags
    (this launcher, the batch command) goes through here, because argparse accepts `batchllm`
    as an attention or radix-cache backend only once it is registered in this process, which a
    process that has not loaded the plugin (the batch command builds the args before its
    Engine loads it) has not done. Registering is inert: it only names the factories."""
    from sglang.srt.server_args import prepare_server_args

    from sglang_batchllm.runtime import attention_backend, pinned_cache

    pinned_cache.register()
    attention_backend.register()
    if not _given(argv, _HELP_FLAGS):
        argv = with_default_flags(argv)
    return prepare_server_args(with_default_model(argv))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ[env_name("enable")] = "1"
    check_sglang_version()
    require_entry_point()
    if not _given(argv, _HELP_FLAGS):  # --help works on any machine
        require_cuda(device_in_argv(argv), what="`python -m sglang_batchllm.launch_server`")

    from sglang.srt.plugins import load_plugins

    load_plugins()

    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    server_args = server_args_from_argv(argv)
    from sglang_batchllm.batch_api.mount import mount_on_sglang

    mount_on_sglang(server_args)  # /v1/files and /v1/batches on SGLang's app (docs/batch-api.md)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
