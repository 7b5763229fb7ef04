"""`sglang_batchllm.Engine`: `sglang.Engine` with BatchLLM on.

Takes every `sglang.Engine` keyword (they are `ServerArgs` fields) plus our settings, either as
`batchllm=BatchLLMConfig(...)` or as `batchllm_<field>=value` keywords. With no `model_path`
it serves the bundled model with dummy weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sglang.srt.entrypoints.engine import Engine as _SGLangEngine

from sglang_batchllm import bundled_model
from sglang_batchllm.compat import check_sglang_version, require_cuda
from sglang_batchllm.config import BatchLLMConfig, ConfigError
from sglang_batchllm.defaults import with_default_kwargs
from sglang_batchllm.plugin import require_entry_point

_KW_PREFIX = "batchllm_"


def split_batchllm_kwargs(kwargs: dict[str, Any], base: BatchLLMConfig) -> BatchLLMConfig:
    """Pop `batchllm_<field>` keywords out of `kwargs` and apply them to `base`."""
    known = {f.name for f in dataclasses.fields(BatchLLMConfig)}
    changes = {}
    for key in [k for k in kwargs if k.startswith(_KW_PREFIX)]:
        name = key[len(_KW_PREFIX):]
        if name not in known:
            raise ConfigError(
                f"Unknown keyword {key!r}; BatchLLM keywords are: "
                + ", ".join(sorted(_KW_PREFIX + k for k in known))
            )
        changes[name] = kwargs.pop(key)
    return base.replace(**changes)


class Engine(_SGLangEngine):
    def __init__(self, *, batchllm: BatchLLMConfig | None = None, **kwargs: Any):
        check_sglang_version()
        require_entry_point()
        if "server_args" not in kwargs:  # a built ServerArgs has its device already
            require_cuda(kwargs.get("device"), what="sglang_batchllm.Engine()", other_device="device=")
        base = batchllm if batchllm is not None else BatchLLMConfig.from_env()
        config = split_batchllm_kwargs(kwargs, base).replace(enable=True)
        if "server_args" not in kwargs and kwargs.get("model_path") is None:
            kwargs["model_path"] = bundled_model.model_dir()
            kwargs.setdefault("load_format", "dummy")
        kwargs = with_default_kwargs(kwargs)
        self.batchllm_config = config
        # The scheduler processes are spawned inside super().__init__ and inherit the
        # environment at that moment; restore it afterwards so that a plain sglang.Engine
        # started later in this process stays plain.
        with config.exported():
            super().__init__(**kwargs)
