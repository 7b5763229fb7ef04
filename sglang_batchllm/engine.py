"""`sglang_batchllm.Engine`: `sglang.Engine` with BatchLLM on.

Takes every `sglang.Engine` keyword (they are `ServerArgs` fields) plus our settings, either as
`batchllm=BatchLLMConfig(...)` or as `batchllm_<field>=value` keywords. With no `model_path`
it serves the bundled model and its trained weights (sglang_batchllm/bundled_model).
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


def with_default_model(kwargs: dict) -> dict:
    """The bundled model when no `model_path` (or built `server_args`) is given. Its weights
    ship in the package, so SGLang's default `load_format` loads them."""
    if "server_args" in kwargs or kwargs.get("model_path") is not None:
        return kwargs
    return dict(kwargs, model_path=bundled_model.model_dir())


class Engine(_SGLangEngine):
    def __init__(self, *, batchllm: BatchLLMConfig | None = None, **kwargs: Any):
        check_sglang_version()
        require_entry_point()
        if "server_args" not in kwargs:  # a built ServerArgs has its device already
            require_cuda(kwargs.get("device"), what="sglang_batchllm.Engine()", other_device="device=")
        base = batchllm if batchllm is not None else BatchLLMConfig.from_env()
        config = split_batchllm_kwargs(kwargs, base).replace(enable=True)
        kwargs = with_default_kwargs(with_default_model(kwargs))
        self.batchllm_config = config
        # The scheduler processes are spawned inside super().__init__ and inherit the
        # environment at that moment; restore it afterwards so that a plain sglang.Engine
        # started later in this process stays plain.
        with config.exported():
            super().__init__(**kwargs)
