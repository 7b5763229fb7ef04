"""The SGLang settings a BatchLLM run changes unless the user sets them: one table for the
launcher (as flags) and the Engine (as keywords)."""

from __future__ import annotations

# ServerArgs field -> value. `radix_cache_backend`: the pinned radix cache (a RadixCache that can
# hold a group's prefix for the group's lifetime); `attention_backend`: SGLang's Triton kernels,
# with the fused cascade kernel for decode rows that share a cached prefix, in decode steps (CUDA
# graphs too) and in mixed steps (runtime/attention_backend.py).
SERVER_DEFAULTS: dict[str, str] = {
    "radix_cache_backend": "batchllm",
    "attention_backend": "batchllm",
}


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def with_default_flags(argv: list[str]) -> list[str]:
    given = {a.split("=", 1)[0] for a in argv}
    extra: list[str] = []
    for field, value in SERVER_DEFAULTS.items():
        if flag(field) not in given:
            extra += [flag(field), value]
    return argv + extra


def with_default_kwargs(kwargs: dict) -> dict:
    """A keyword the user left out (or passed as None) takes BatchLLM's default."""
    if "server_args" in kwargs:
        return kwargs
    out = dict(kwargs)
    for field, value in SERVER_DEFAULTS.items():
        if out.get(field) is None:
            out[field] = value
    return out
