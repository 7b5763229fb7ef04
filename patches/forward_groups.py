"""Tell the attention backend which rows of a step start from the same cached prefix.

Targets (SGLang 0.5.17): `ForwardBatch.init_new`, AFTER: the batch's requests are at hand
there, in row order (a MIXED batch lists its prefill requests, then the running ones, as its
rows are laid out), before the step's results re-insert them into the radix tree. An extend
batch's new requests get their admission-time radix node and prefix length recorded; every
decode, extend or mixed step's rows are published for the backend (`runtime/row_prefixes.py`).
`EagerRunner.load_batch`, AFTER: an eager step (every decode batch larger than the largest
captured graph, every prefill) reaches the backend as a copy in the runner's static buffers,
so its facts are published again under the copy's `out_cache_loc`. Without this the backend
found no facts for any eager step and ran SGLang's kernels for it (measured: 1% of the
decode rows of a 1,600-request shared-prefix batch reached the fused kernel).

Why no official seam serves: SGLang's attention-backend interface receives a `ForwardBatch`
(or, under CUDA-graph replay, a view of the graph's buffers) with no per-request cache facts,
and there is no hook for per-step metadata from the scheduler to the backend.
"""

from __future__ import annotations

from sglang_batchllm.compat import SUPPORTED_SGLANG_VERSION
from sglang_batchllm.config import BatchLLMConfig
from sglang_batchllm.patches import Patch

TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
EAGER_TARGET = "sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch"


def _after_init_new(result, *args, **kwargs):
    from sglang_batchllm.runtime import row_prefixes

    batch = kwargs.get("batch")
    if batch is None:
        batch = next((a for a in args if hasattr(a, "reqs") and hasattr(a, "forward_mode")), None)
    reqs = getattr(batch, "reqs", None)
    mode = getattr(result, "forward_mode", None)
    if not reqs or mode is None:
        return result
    if mode.is_extend():  # EXTEND and MIXED: the new requests' admission-time prefixes
        row_prefixes.capture(reqs)
    if mode.is_decode() or mode.is_extend():
        row_prefixes.publish(result.out_cache_loc, row_prefixes.rows_of(reqs))
    return result


def _after_load_batch(result, *args, **kwargs):
    from sglang_batchllm.runtime import row_prefixes

    batch = kwargs.get("forward_batch")
    if batch is None:  # (self, forward_batch, ...): the first argument that is a batch
        batch = next((a for a in args if hasattr(a, "out_cache_loc") and hasattr(a, "forward_mode")), None)
    if batch is not None and result is not None:
        row_prefixes.carry(batch.out_cache_loc, getattr(result, "out_cache_loc", None))
    return result


def _install(config: BatchLLMConfig) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _after_init_new, HookType.AFTER)
    HookRegistry.register(EAGER_TARGET, _after_load_batch, HookType.AFTER)


PATCH = Patch(
    name="forward_groups",
    targets=(TARGET, EAGER_TARGET),
    sglang_version=SUPPORTED_SGLANG_VERSION,
    why_no_seam=(
        "SGLang's attention backends get no per-request radix-cache facts, and no hook carries "
        "per-step metadata from the scheduler's batch to the backend; the eager runner's copy "
        "of the batch keeps only its dataclass fields, in new tensors"
    ),
    install=_install,
)
