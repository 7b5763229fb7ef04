"""Client side of BatchLLM for SGLang frontend programs (docs/frontend.md).

`run_batch(program, batch_kwargs, **options)` is `program.run_batch(batch_kwargs, **options)` with
each step of all programs sent to the server as one batch `/generate` request;
`CoalescingRuntimeEndpoint` is the backend that does the coalescing.

Importing this package imports SGLang's frontend language (and torch with it); the top-level
`sglang_batchllm` package loads it only on first use of `sglang_batchllm.run_batch`.
"""

from sglang_batchllm.frontend.coalescing import BatchCancelled, Coalescer, CoalescingRuntimeEndpoint
from sglang_batchllm.frontend.runner import run_batch

__all__ = ["BatchCancelled", "Coalescer", "CoalescingRuntimeEndpoint", "run_batch"]
