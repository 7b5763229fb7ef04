"""The compute floor: the time the GPU needs for a workload's unavoidable prefill math.

    prefill_flops = 2 * P_layers * U                 (decoder matmuls, each unique token once)
                  + 2 * P_lm_head * R                (logits of each request's last prompt token)
                  + 4 * L * H * d * A                (attention: QK^T and PV, 2*d FLOPs each per
                                                      head, over the unique tokens' causal pairs)
    prefill_floor_s = prefill_flops / (bf16 matmul FLOP/s measured in the same command)

U = unique prompt tokens (nodes of the prompts' token trie: a perfect prefix cache), A = sum of
(position + 1) over those tokens, R = requests, P_layers = q/k/v/o + gate/up/down weights of all
L layers, H query heads of size d. Decode is not in this floor (the issue defines it over
prefill); `decode_matmul_flops` gives the decode matmuls for reference:
2 * (P_layers + P_lm_head) per generated token after the first. Attention reads of the KV
cache in decode are memory-bound and not counted anywhere here.

`python -m sglang_batchllm.bench.floor OUT.json` measures the matmul rate (torch bf16 GEMM,
8192^3, best of several timed batches) in a process of its own, so the benchmark's parent never
holds a CUDA context while the engines run.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from .model import ModelShape
from .workloads import Sharing

FORMULA = (
    "prefill_flops = 2*P_layers*U + 2*P_lm_head*R + 4*L*H*d*A; floor = prefill_flops / measured bf16 matmul FLOP/s "
    "(U unique prompt tokens, A their causal attention pairs, R requests)"
)


@dataclass(frozen=True)
class Floor:
    prefill_flops: float
    decode_matmul_flops: float
    matmul_flops_per_s: float

    @property
    def prefill_s(self) -> float:
        return self.prefill_flops / self.matmul_flops_per_s

    @property
    def decode_matmul_s(self) -> float:
        return self.decode_matmul_flops / self.matmul_flops_per_s

    def to_dict(self) -> dict:
        return {
            "prefill_flops": self.prefill_flops,
            "decode_matmul_flops": self.decode_matmul_flops,
            "matmul_tflops": self.matmul_flops_per_s / 1e12,
            "prefill_floor_s": self.prefill_s,
            "decode_matmul_floor_s": self.decode_matmul_s,
            "formula": FORMULA,
        }


def prefill_flops(model: ModelShape, share: Sharing, num_requests: int) -> float:
    matmul = 2 * model.layer_matmul_params * share.unique_tokens + 2 * model.lm_head_params * num_requests
    attention = 4 * model.layers * model.heads * model.head_dim * share.unique_attention_pairs
    return float(matmul + attention)


def decode_matmul_flops(model: ModelShape, decode_tokens: int) -> float:
    return float(2 * (model.layer_matmul_params + model.lm_head_params) * decode_tokens)


def workload_floor(model: ModelShape, share: Sharing, num_requests: int, output_tokens: int, matmul_tflops: float) -> Floor:
    if not matmul_tflops > 0:
        raise ValueError(f"matmul rate must be > 0 TFLOP/s, got {matmul_tflops}")
    return Floor(
        prefill_flops(model, share, num_requests),
        decode_matmul_flops(model, max(0, output_tokens - num_requests)),
        matmul_tflops * 1e12,
    )


def measure_matmul_tflops(n: int = 8192, batches: int = 5, iters: int = 20) -> dict:
    """bf16 GEMM rate on the current CUDA device; the best batch counts (the floor is a bound)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("measuring the matmul rate needs a CUDA GPU; on a CPU pass --matmul-tflops")
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        best = max(best, 2 * n**3 * iters / seconds / 1e12)
    props = torch.cuda.get_device_properties(0)
    return {
        "matmul_tflops": best,
        "gemm": f"bf16 {n}x{n}x{n}, best of {batches} x {iters}",
        "gpu": props.name,
        "gpu_memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sglang_batchllm.bench.floor OUT.json", file=sys.stderr)
        return 2
    result = measure_matmul_tflops()
    with open(argv[0], "w") as f:
        json.dump(result, f, indent=2)
    print(f"bf16 matmul: {result['matmul_tflops']:.0f} TFLOP/s on {result['gpu']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
