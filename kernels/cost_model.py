"""When the fused cascade kernel beats SGLang's plain Triton attention: a pure rule.

No torch, no SGLang: plain numbers in, a bool out, so the backend can decide per step on the
host and tests can pin the rule down.

What the rule looks at: the KV bytes that sharing saves. A plain kernel reads every request's
whole sequence; the cascade kernel reads a group's prefix once. For one group of `g` members
with prefix `P` whose members also read `S` suffix tokens in total,

    saved_fraction = (g - 1) * P / (g * P + S)

Measured (scripts/bench_cascade.py decode sweep, H200, bf16, 32 q / 8 KV heads, head_dim 128,
512 requests with 200-300-token suffixes, default tile shapes; speedup = time of SGLang's
decode_attention_fwd over time of the fused kernel on the same KV):

    prefix  group  saved  speedup        prefix  group  saved  speedup
        32      1     0%     1.05           128      2    17%     1.36
        32      2   5.7%     1.22           512      2    33%     1.71
        32      4   8.5%     1.30          2048      2    44%     2.19
       128      1     0%     1.17          2048     16    87%     5.02

No measured point lost (no sharing at all: 1.05-1.36x), so the threshold sits at the smallest
saving measured, 5.7% (1.22x): batches that share less than that stay on SGLang's own kernel,
which is the regime (few sequences, long contexts, no sharing) the sweep did not cover.
A group below the threshold inside a batch that does use the fused kernel runs as plain
requests (its prefix streamed with each member's suffix).

Extend (prefill chunks): the fused kernel was faster than SGLang's extend_attention_fwd in every
measured case, sharing or not (1.06-1.14x at 256 new tokens per request, 2-10x at 16-64, where
SGLang's one-head 128-row tiles are mostly empty), so the rule only requires some tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

# decode sweep above: the smallest saving measured, 5.7%, ran 1.22x SGLang's decode kernel
MIN_SAVED_KV_FRACTION_DECODE = 0.05
# extend sweep (docs/kernel.md): >= 1.06x SGLang with no sharing at all
MIN_SAVED_KV_FRACTION_EXTEND = 0.0
# a group needs two members to share anything
MIN_GROUP_SIZE = 2
# The extend sweep measured up to this many new tokens per request; a step with a longer
# request keeps SGLang's extend kernel until longer chunks are measured.
EXTEND_MAX_MEASURED_NEW_TOKENS = 256


def saved_kv_fraction(group_size: int, prefix_len: int, member_suffix_tokens: int) -> float:
    """Fraction of a plain kernel's KV reads for this group that the cascade kernel skips."""
    if group_size < 0 or prefix_len < 0 or member_suffix_tokens < 0:
        raise ValueError("group_size, prefix_len and member_suffix_tokens must be >= 0")
    plain = group_size * prefix_len + member_suffix_tokens
    if plain == 0:
        return 0.0
    return max(group_size - 1, 0) * prefix_len / plain


def should_share_prefix(
    group_size: int, prefix_len: int, member_suffix_tokens: int, mode: str = "decode"
) -> bool:
    """Run this group with a shared prefix (GROUP tiles)? Otherwise pass its members as plain
    requests (group -1, their prefix slots prepended to their suffix)."""
    if group_size < MIN_GROUP_SIZE or prefix_len <= 0:
        return False
    return saved_kv_fraction(group_size, prefix_len, member_suffix_tokens) >= _threshold(mode)


def should_use_cascade(
    group_sizes: Sequence[int],
    prefix_lens: Sequence[int],
    other_kv_tokens: int,
    mode: str = "decode",
) -> bool:
    """Use the fused cascade kernel for this step rather than SGLang's plain Triton kernel?

    group_sizes / prefix_lens: per group, its members in this batch and its prefix length.
    other_kv_tokens: every other KV token the step reads (all suffixes, whole sequences of
    requests without a group): both kernels read these once.
    """
    if len(group_sizes) != len(prefix_lens):
        raise ValueError("group_sizes and prefix_lens must have one entry per group")
    if other_kv_tokens < 0:
        raise ValueError("other_kv_tokens must be >= 0")
    shared = sum(p for g, p in zip(group_sizes, prefix_lens) if g >= MIN_GROUP_SIZE)
    plain_tokens = sum(g * p for g, p in zip(group_sizes, prefix_lens)) + other_kv_tokens
    if plain_tokens == 0:
        return False
    saved = sum(g * p for g, p in zip(group_sizes, prefix_lens) if g >= MIN_GROUP_SIZE) - shared
    return saved / plain_tokens >= _threshold(mode)


def _threshold(mode: str) -> float:
    if mode == "decode":
        return MIN_SAVED_KV_FRACTION_DECODE
    if mode == "extend":
        return MIN_SAVED_KV_FRACTION_EXTEND
    raise ValueError(f"mode must be 'decode' or 'extend', not {mode!r}")
