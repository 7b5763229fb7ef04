"""sglang_batchllm: BatchLLM (global prefix sharing, prefix-first scheduling, memory-centric
token batching, fused cascade attention) as a plugin for SGLang 0.5.17.

Importing the package is cheap and imports no SGLang or torch; `Engine` and `run_batch` are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sglang_batchllm.config import BatchLLMConfig

__version__ = "0.1.0"
__all__ = ["BatchLLMConfig", "Engine", "__version__", "run_batch"]

if TYPE_CHECKING:
    from sglang_batchllm.engine import Engine
    from sglang_batchllm.frontend import run_batch


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from sglang_batchllm.engine import Engine

        return Engine
    if name == "run_batch":  # SGLang frontend `run_batch` with coalesced requests (docs/frontend.md)
        from sglang_batchllm.frontend import run_batch

        return run_batch
    raise AttributeError(f"module 'sglang_batchllm' has no attribute {name!r}")
