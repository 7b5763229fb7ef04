"""The step's batch as the cascade planner reads it: validated host-side arrays.

`read_step_batch` checks everything a caller can get wrong (shapes, dtypes, devices, indptr
arrays that do not match their index tensors, queries that are not part of their suffix) and
says what to fix; `cascade_plan.py` then works on a `StepBatch` it can trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CascadePlanError(ValueError):
    """The plan's inputs do not describe a valid batch; the message says what to fix."""


@dataclass(frozen=True)
class StepBatch:
    """Host (CPU int64) lengths of one step; index tensors stay the caller's (on device)."""

    prefix_kv_indptr: torch.Tensor  # [G+1]
    suffix_kv_indptr: torch.Tensor  # [B+1]
    request_group: torch.Tensor  # [B], -1 = no group
    qo_indptr: torch.Tensor  # [B+1]; decode: arange(B+1)
    device: torch.device  # where the KV slot indices live

    @property
    def num_groups(self) -> int:
        return self.prefix_kv_indptr.numel() - 1

    @property
    def num_requests(self) -> int:
        return self.suffix_kv_indptr.numel() - 1

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def prefix_len(self) -> torch.Tensor:
        return self.prefix_kv_indptr[1:] - self.prefix_kv_indptr[:-1]

    @property
    def suffix_len(self) -> torch.Tensor:
        return self.suffix_kv_indptr[1:] - self.suffix_kv_indptr[:-1]

    @property
    def q_len(self) -> torch.Tensor:
        return self.qo_indptr[1:] - self.qo_indptr[:-1]


def read_step_batch(
    *,
    prefix_kv_indptr,
    prefix_kv_indices,
    suffix_kv_indptr,
    suffix_kv_indices,
    request_group,
    qo_indptr,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> StepBatch:
    """Validate the planner's inputs (see cascade_plan.py for their meaning)."""
    _check_indices("prefix_kv_indices", prefix_kv_indices)
    _check_indices("suffix_kv_indices", suffix_kv_indices)
    device = suffix_kv_indices.device
    if prefix_kv_indices.device != device:
        raise CascadePlanError("prefix_kv_indices and suffix_kv_indices are on different devices")
    if num_q_heads <= 0 or num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        raise CascadePlanError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    if head_dim <= 0:
        raise CascadePlanError(f"head_dim must be positive, got {head_dim}")
    p_indptr = _host_ints("prefix_kv_indptr", prefix_kv_indptr)
    s_indptr = _host_ints("suffix_kv_indptr", suffix_kv_indptr)
    _check_indptr("prefix_kv_indptr", p_indptr, prefix_kv_indices, "group")
    _check_indptr("suffix_kv_indptr", s_indptr, suffix_kv_indices, "request")
    num_groups, num_requests = p_indptr.numel() - 1, s_indptr.numel() - 1
    group = _host_ints("request_group", request_group, num_requests)
    if num_requests and (int(group.min()) < -1 or int(group.max()) >= num_groups):
        raise CascadePlanError(f"request_group values must be -1 or in [0, {num_groups})")
    if qo_indptr is None:
        qo = torch.arange(num_requests + 1, dtype=torch.int64)
    else:
        qo = _host_ints("qo_indptr", qo_indptr, num_requests + 1)
        if qo[0] != 0 or bool((qo[1:] < qo[:-1]).any()):
            raise CascadePlanError("qo_indptr must start at 0 and be non-decreasing")
        suffix_len = s_indptr[1:] - s_indptr[:-1]
        bad = (qo[1:] - qo[:-1]) > suffix_len
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise CascadePlanError(
                f"request {b} has {int(qo[b + 1] - qo[b])} query tokens but only "
                f"{int(suffix_len[b])} suffix slots: a request's new tokens must be part of its "
                "suffix (write their KV first)"
            )
    return StepBatch(p_indptr, s_indptr, group, qo, device)


def _host_ints(name: str, x, length: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.numel() == 0 and not isinstance(x, torch.Tensor):
        t = t.to(torch.int64)  # torch.as_tensor([]) is float32
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise CascadePlanError(f"{name} must be a 1-D integer array, got {t.dtype} {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        raise CascadePlanError(f"{name} must have {length} entries, got {t.numel()}")
    return t.to(device="cpu", dtype=torch.int64)


def _check_indptr(name: str, indptr: torch.Tensor, indices: torch.Tensor, what: str) -> None:
    if indptr.numel() == 0 or indptr[0] != 0:
        raise CascadePlanError(f"{name} must start at 0 and have one entry per {what} plus one")
    if bool((indptr[1:] < indptr[:-1]).any()):
        raise CascadePlanError(f"{name} must be non-decreasing ({what} lengths >= 0)")
    if int(indptr[-1]) != indices.numel():
        raise CascadePlanError(
            f"{name}[-1] = {int(indptr[-1])} but its indices tensor holds {indices.numel()} slots"
        )


def _check_indices(name: str, indices) -> None:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
        raise CascadePlanError(f"{name} must be a 1-D tensor of KV slot indices")
    if indices.dtype not in (torch.int32, torch.int64):
        raise CascadePlanError(f"{name} must be int32 or int64, got {indices.dtype}")
