"""The fused cascade kernel against FlashInfer's two-level cascade wrapper, on the issue's
decode case (64 groups x 16 requests, prefix 2000, suffixes 200-300, 32 q / 8 KV heads,
head_dim 128, bf16, page size 16), with SGLang's Triton decode kernel as the common yardstick.

    PYTHONUNBUFFERED=1 python3 scripts/bench_flashinfer_cascade.py

Needs a GPU and `flashinfer` (installed with SGLang's stack; its kernels are JIT-built on first
use, which is timed separately and kept out of the comparison). Every output is checked against
the fp32 reference before anything is timed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cascade as bc  # noqa: E402  (the shared setup: batch, checks, timing)

PAGE = 16


def flashinfer_runner(batch):
    """FlashInfer's MultiLevelCascadeAttentionWrapper over the same pages: level 0 = each
    group's prefix for all its members' queries, level 1 = each request's own suffix. FlashInfer
    wants a group's queries contiguous, so requests are sorted by group; the output is put
    back in the batch's order."""
    import flashinfer

    groups = batch.request_group.tolist()
    order = sorted(range(len(groups)), key=lambda b: (groups[b], b))
    assert min(groups) >= 0, "every request of this case belongs to a group"
    num_groups = len(batch.prefix_kv_indptr) - 1

    def pages_of(slots):  # sequences start on a fresh page (synthetic.make_batch guarantees it)
        slots = slots.long()
        return slots[::PAGE] // PAGE, len(slots) - (len(slots) - 1) // PAGE * PAGE

    def level(seqs):
        indptr, indices, last = [0], [], []
        for slots in seqs:
            pages, last_len = pages_of(slots)
            indices.append(pages)
            indptr.append(indptr[-1] + len(pages))
            last.append(last_len)
        dev = batch.q.device
        return (torch.tensor(indptr, dtype=torch.int32, device=dev), torch.cat(indices).to(torch.int32),
                torch.tensor(last, dtype=torch.int32, device=dev))

    p_ind = batch.prefix_kv_indptr.tolist()
    prefix_seqs = [batch.prefix_kv_indices[p_ind[g]:p_ind[g + 1]] for g in range(num_groups)]
    s_ind = batch.suffix_kv_indptr.tolist()
    suffix_seqs = [batch.suffix_kv_indices[s_ind[b]:s_ind[b + 1]] for b in order]
    members = [groups.count(g) for g in range(num_groups)]
    dev = batch.q.device
    qo0 = torch.tensor([0] + members, dtype=torch.int32, device=dev).cumsum(0).to(torch.int32)
    qo1 = torch.arange(len(order) + 1, dtype=torch.int32, device=dev)
    kv0, kv1 = level(prefix_seqs), level(suffix_seqs)

    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    def plan():
        wrapper.plan([qo0, qo1], [kv0[0], kv1[0]], [kv0[1], kv1[1]], [kv0[2], kv1[2]],
                     bc.HQ, bc.HKV, bc.D, PAGE, causal=False, sm_scale=bc.SM_SCALE,
                     q_data_type=bc.DTYPE, kv_data_type=bc.DTYPE)
        torch.cuda.synchronize()

    plan()  # the first plan JIT-builds FlashInfer's kernels: not a per-step cost
    t0 = time.perf_counter()
    plan()
    plan_ms = (time.perf_counter() - t0) * 1e3
    num_pages = batch.k_buffer.shape[0] // PAGE
    cache = (batch.k_buffer.view(num_pages, PAGE, bc.HKV, bc.D), batch.v_buffer.view(num_pages, PAGE, bc.HKV, bc.D))
    perm = torch.tensor(order, device=dev)
    q_sorted = batch.q[perm].contiguous()
    out = torch.empty_like(batch.q)

    def run():
        out[perm] = wrapper.run(q_sorted, cache)
        return out

    return run, plan_ms


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    suffixes = list(range(200, 301))
    batch = bc.synthetic.make_batch(
        group_sizes=[16] * 64, prefix_lens=[2000], suffix_lens=suffixes[::7] + suffixes[3::11],
        num_q_heads=bc.HQ, num_kv_heads=bc.HKV, head_dim=bc.D, page_size=PAGE, dtype=bc.DTYPE,
        device="cuda", seed=0,
    )
    ref = bc.reference.full_attention_reference(
        batch.q, batch.k_buffer, batch.v_buffer, **batch.reference_kwargs(), sm_scale=bc.SM_SCALE
    )
    ours, _, _ = bc.cascade_runner(batch)
    bc.check("fused cascade (ours)", ours(), ref)
    t0 = time.perf_counter()
    try:
        fi, fi_plan_ms = flashinfer_runner(batch)
        fi()
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - report what stopped FlashInfer (JIT, API) and go on
        print(f"FlashInfer cascade unavailable: {type(exc).__name__}: {str(exc)[:500]}")
        return 1
    print(f"FlashInfer first call (plan + JIT build + run): {time.perf_counter() - t0:.1f} s")
    bc.check("FlashInfer MultiLevelCascade", fi(), ref)
    sgl, _ = bc.sglang_decode(batch)
    floor_ms = bc.unique_kv_bytes(batch) / bc.copy_bandwidth() * 1e3
    t_ours, t_fi, t_sgl = bc.bench(ours), bc.bench(fi), bc.bench(sgl)
    print("\nreproduce: PYTHONUNBUFFERED=1 python3 scripts/bench_flashinfer_cascade.py")
    print(f"{'kernel':<32}{'ms':>8}")
    print(f"{'fused cascade (ours)':<32}{t_ours:8.3f}")
    print(f"{'FlashInfer MultiLevelCascade':<32}{t_fi:8.3f}   (plan {fi_plan_ms:.1f} ms per step)")
    print(f"{'SGLang Triton decode':<32}{t_sgl:8.3f}")
    print(f"{'bandwidth floor':<32}{floor_ms:8.3f}")
    print(f"speedup over FlashInfer cascade: {t_fi / t_ours:.2f}x; over SGLang: {t_sgl / t_ours:.2f}x; "
          f"ours at {floor_ms / t_ours:.0%} and FlashInfer at {floor_ms / t_fi:.0%} of the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
