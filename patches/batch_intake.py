"""Text batches reach the scheduler whole, so the planner sees the whole batch at once.

Target (SGLang 0.5.17): `TokenizerManager._should_use_batch_tokenization`, AROUND (main
process). SGLang sends a batch `GenerateReqInput` as ONE message to the scheduler only when it
is pre-tokenized or `--enable-tokenizer-batch-encode` is set; a text batch is otherwise
tokenized and sent item by item, and the scheduler starts prefilling the first items (and
planning them alone) before the rest arrive. With BatchLLM on, a batch whose items are all
plain text (no images, no embeddings) takes SGLang's batch-tokenization path too: tokenized
once, in one call, sent in one message. Batches that path cannot take (multimodal items,
input embeddings, a mix of text and token ids, DP attention) keep SGLang's behaviour.

Why no official seam serves: the choice is a private method of the TokenizerManager; the
server flag would make multimodal batches fail (SGLang refuses them under batch encoding).
"""

from __future__ import annotations

from sglang_batchllm.compat import SUPPORTED_SGLANG_VERSION
from sglang_batchllm.config import BatchLLMConfig
from sglang_batchllm.patches import Patch


def plain_text_batch(batch_size: int, requests) -> bool:
    for i in range(batch_size):
        item = requests[i]
        if not item.text or item.input_ids is not None or getattr(item, "input_embeds", None) is not None:
            return False
        if item.contains_mm_input():
            return False
    return batch_size > 0


def _around_should_use_batch_tokenization(original, self, batch_size, requests):
    if original(self, batch_size, requests):
        return True
    return not self.server_args.enable_dp_attention and plain_text_batch(batch_size, requests)


def _install(config: BatchLLMConfig) -> None:
    if not config.schedule:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._should_use_batch_tokenization",
        _around_should_use_batch_tokenization,
        HookType.AROUND,
    )


PATCH = Patch(
    name="batch_intake",
    targets=("sglang.srt.managers.tokenizer_manager.TokenizerManager._should_use_batch_tokenization",),
    sglang_version=SUPPORTED_SGLANG_VERSION,
    why_no_seam="the batch/sequential choice is private to TokenizerManager; the flag breaks multimodal batches",
    install=_install,
)
