#!/usr/bin/env python3
"""Benchmark the fused cascade attention kernel against SGLang's Triton kernels.

Cases (seeded, bf16, 32 query / 8 KV heads, head_dim 128, page size 16 unless noted):
  decode  64 groups x 16 requests, prefix 2000, suffixes 200-300 (the issue's target)
  extend  E1: 8 groups x 4 requests, prefix 2000, 256 new tokens each (8192-token chunk)
          E2: 32 groups x 16 requests, prefix 2000, 16 new tokens each (packed GROUP tiles)
  sweeps  decode: group size x prefix length; extend: group size x new tokens per request
          (16 to 2048)
          (the measurements behind kernels/cost_model.py)

Every kernel's output is checked against the fp32 reference (or SGLang's output in the
sweeps) before it is timed. Times are triton.testing.do_bench medians. The bandwidth floor is
the unique KV bytes read once over the device-to-device copy bandwidth measured in this run.

SGLang's kernels are imported as `sglang.kernels.ops.attention.*`: the installed SGLang if
there is one, else an unmodified copy put on PYTHONPATH (see docs/kernel.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
_ARGS = " ".join(sys.argv[1:])


def _import_kernels():
    try:
        from sglang_batchllm import kernels

        return kernels
    except ImportError:  # a checkout that is not pip-installed
        pass
    if "sglang_batchllm" not in sys.modules:
        parent = types.ModuleType("sglang_batchllm")
        parent.__path__ = [str(REPO / "sglang_batchllm")]
        sys.modules["sglang_batchllm"] = parent
    spec = importlib.util.spec_from_file_location(
        "sglang_batchllm.kernels", REPO / "kernels" / "__init__.py",
        submodule_search_locations=[str(REPO / "kernels")],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_import_kernels()
from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

# Which SGLang kernels this run compares against, in the command that reproduces it: the
# installed SGLang, or the unmodified copies in .sglref/ (machines without SGLang's stack).
_SGLANG_FROM = Path(sys.modules["sglang"].__path__[0]).resolve()
_ENV = "PYTHONPATH=.sglref " if ".sglref" in _SGLANG_FROM.parts else ""
COMMAND = f"PYTHONUNBUFFERED=1 {_ENV}python3 scripts/bench_cascade.py {_ARGS}".rstrip()
from sglang_batchllm.kernels import cascade_attention as ca
from sglang_batchllm.kernels import reference, synthetic
from sglang_batchllm.kernels.cascade_plan import (
    CascadeLaunchConfig,
    build_decode_plan,
    build_extend_plan,
)

DEV = "cuda"  # the smoke test in docs/kernel.md sets "cpu" (Triton interpreter)
HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
SM_SCALE = D**-0.5
MAX_KV_SPLITS = 8  # SGLang's --triton-attention-num-kv-splits default
TOL = 1e-2  # relative error for bf16 operands (METHOD.md)


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3)


def unique_kv_bytes(batch) -> int:
    tokens = int(batch.prefix_kv_indptr[-1]) + int(batch.suffix_kv_indptr[-1])
    return tokens * HKV * D * 2 * batch.k_buffer.element_size()


def sglang_decode(batch, order=None):
    """SGLang's decode_attention_fwd over each request's full sequence (prefix ++ suffix)."""
    num_req = len(batch.request_group)
    order = list(range(num_req)) if order is None else order
    seqs = [batch.request_slots(b) for b in order]
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.int32, device=DEV)
    kv_indptr = torch.zeros(num_req + 1, dtype=torch.int32, device=DEV)
    kv_indptr[1:] = torch.cumsum(lens, 0)
    kv_indices = torch.cat(seqs).to(torch.int64)
    splits = torch.empty(num_req, dtype=torch.int32, device=DEV)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 132
    get_num_kv_splits_triton[(1,)](
        splits, lens, num_req, 1, HQ, HKV, MAX_KV_SPLITS, sms,
        MAX_NUM_SEQ=max(256, triton.next_power_of_2(num_req)),
    )
    logits = torch.empty(num_req, HQ, MAX_KV_SPLITS, D, dtype=torch.float32, device=DEV)
    lse = torch.empty(num_req, HQ, MAX_KV_SPLITS, dtype=torch.float32, device=DEV)
    q = batch.q[torch.tensor(order, device=DEV)]
    o = torch.empty_like(q)

    def run():
        decode_attention_fwd(
            q, batch.k_buffer, batch.v_buffer, o, kv_indptr, kv_indices, logits, lse, splits,
            MAX_KV_SPLITS, SM_SCALE, 1.0, 1.0,
        )
        return o

    inverse = torch.empty(num_req, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(num_req)
    return run, inverse.to(DEV)


def sglang_extend(batch):
    """SGLang's extend_attention_fwd: cached part from the pool, new tokens contiguous."""
    qo = batch.qo_indptr.tolist()
    cached, new = [], []
    for b in range(len(batch.request_group)):
        slots = batch.request_slots(b)
        q_len = qo[b + 1] - qo[b]
        cached.append(slots[: len(slots) - q_len])
        new.append(slots[len(slots) - q_len :])
    kv_indptr = torch.tensor([0] + [len(c) for c in cached], device=DEV).cumsum(0).int()
    kv_indices = torch.cat(cached).to(torch.int64)
    new_slots = torch.cat(new)
    k_ext = batch.k_buffer[new_slots].contiguous()
    v_ext = batch.v_buffer[new_slots].contiguous()
    qo_indptr = batch.qo_indptr.to(device=DEV, dtype=torch.int32)
    max_len = max(qo[b + 1] - qo[b] for b in range(len(qo) - 1))
    o = torch.empty_like(batch.q)

    def run():
        extend_attention_fwd(
            batch.q, k_ext, v_ext, o, batch.k_buffer, batch.v_buffer, qo_indptr, kv_indptr,
            kv_indices, None, True, None, max_len, 1.0, 1.0, SM_SCALE,
        )
        return o

    return run


def cascade_runner(batch, config=None, **plan_options):
    """config: a CascadeLaunchConfig, a tuple of its fields, or None (the plan's default)."""
    decode = batch.qo_indptr is None
    build = build_decode_plan if decode else build_extend_plan
    if isinstance(config, tuple):
        config = CascadeLaunchConfig(*config)
    t0 = time.perf_counter()
    plan = build(**batch.plan_kwargs(), config=config, **plan_options)
    if DEV == "cuda":
        torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 1e3
    out = torch.full_like(batch.q, float("nan"))
    fn = ca.cascade_decode if decode else ca.cascade_extend
    return (lambda: fn(batch.q, batch.k_buffer, batch.v_buffer, plan, SM_SCALE, out=out)), plan, plan_ms


def check(name, out, ref):
    err = rel_err(out, ref)
    bad = out.isnan().any().item()
    status = "ok" if err < TOL and not bad else "FAIL"
    print(f"  check {name:<34} rel_err={err:.2e} {status}", flush=True)
    if status != "ok":
        raise RuntimeError(f"{name} does not match the reference: not timing it")
    return err


def kernel_report():
    """Registers / spills / shared memory of the compiled fused kernels (for the notes)."""
    rows = []
    try:
        for fn in (ca._cascade_fwd_kernel, ca._merge_kernel):
            for cache in fn.device_caches.values():
                for k in cache[0].values():
                    k._init_handles()
                    rows.append(f"{fn.fn.__name__}: regs={k.n_regs} spills={k.n_spills} "
                                f"smem={k.metadata.shared} warps={k.metadata.num_warps} "
                                f"stages={k.metadata.num_stages}")
    except Exception as exc:  # noqa: BLE001 - the cache layout is Triton-internal
        rows.append(f"(no compiler report: {type(exc).__name__}: {exc})")
    return rows


# The compiler's sm_90
# report for each is in docs/kernel.md (registers and shared memory bound the occupancy)
DECODE_CONFIGS = [  # (block_m_group, block_n_group, block_m_request, block_n_request, warps, stages)
    None,  # the plan's default (default_launch_config)
    (64, 64, 16, 64, 4, 2), (64, 64, 16, 64, 4, 3), (64, 32, 16, 64, 4, 3), (64, 64, 16, 32, 4, 2),
    (32, 32, 16, 32, 4, 3),
]
EXTEND_CONFIGS = [
    None,
    (128, 64, 128, 64, 8, 2), (128, 64, 128, 64, 8, 1), (128, 32, 128, 32, 8, 2), (64, 32, 64, 32, 4, 3),
]


# --tune: the decode step the engine profile found slowest (docs/kernel.md, third measurement):
# decode-heavy mid-run, 59 groups x 16 members of prefix 2000, suffixes of 200 prompt tokens
# plus 0-500 generated, page size 1; a grid of tile shapes around the default
TUNE_SHAPE = dict(group_sizes=[16] * 59, suffixes=list(range(200, 701, 13)), page_size=1)
TUNE_CONFIGS = [None, (64, 128, 16, 64, 4, 3), (64, 32, 16, 64, 4, 3)] + [
    (64, 64, m_r, n_r, warps, stages)
    for m_r, n_r in ((16, 32), (16, 64), (16, 128), (32, 64))
    for warps in (2, 4, 8)
    for stages in (2, 3, 4)
]

# --tune, extend: the prefill rows of an authors' mixed step whose members share a cached
# prefix (3 groups x 12 members, prefix 2000, 200 new tokens each: 7,200 query tokens)
EXTEND_TUNE_SHAPE = dict(group_sizes=[12] * 3, q_len=200, suffix=200)
EXTEND_TUNE_CONFIGS = [None] + [
    (rows, n, rows, n, warps, stages)
    for rows in (64, 128)
    for n in (32, 64, 128)
    for warps in (4, 8)
    for stages in (2, 3)
]


def decode_case(args, results, page_size=16, configs=DECODE_CONFIGS, label="decode",
                group_sizes=(16,) * 64, suffixes=None):
    if suffixes is None:
        suffixes = list(range(200, 301))
        suffixes = suffixes[::7] + suffixes[3::11]
    batch = synthetic.make_batch(
        group_sizes=list(group_sizes), prefix_lens=[2000], suffix_lens=suffixes,
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=page_size, dtype=DTYPE,
        device=DEV, seed=args.seed,
    )
    print(f"[{label}] page_size={page_size} requests={len(batch.request_group)}", flush=True)
    ref = reference.full_attention_reference(
        batch.q, batch.k_buffer, batch.v_buffer, **batch.reference_kwargs(), sm_scale=SM_SCALE
    )
    row = {"case": label, "page_size": page_size, "unique_kv_bytes": unique_kv_bytes(batch)}
    best = None
    for cfg in configs:
        try:
            run, plan, plan_ms = cascade_runner(batch, config=cfg)
            check(f"cascade {cfg or 'default'}", run(), ref)
        except Exception as exc:  # noqa: BLE001 - e.g. a tile shape that does not fit: report, go on
            print(f"  cascade {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        ms = bench(run)
        print(f"  cascade {cfg or 'default'}: {ms:.3f} ms  items={plan.num_items} plan={plan_ms:.1f} ms", flush=True)
        if cfg is None:
            row["default_ms"], row["default_config"] = ms, plan.config
            cfg = tuple(vars(plan.config).values())
        row.setdefault("configs", {})[str(cfg)] = ms
        if best is None or ms < best[0]:
            best = (ms, cfg, plan_ms)
    row["cascade_ms"], row["best_config"], row["plan_ms"] = best
    # where the time goes: the same KV with only the prefix part, and with only the suffixes
    cfg = CascadeLaunchConfig(*best[1])
    num_req = len(batch.request_group)
    parts = {
        "prefix part only": {"suffix_kv_indptr": torch.zeros(num_req + 1, dtype=torch.int64),
                                 "suffix_kv_indices": batch.suffix_kv_indices[:0]},
        "suffix part only": {"request_group": torch.full((num_req,), -1)},
    }
    parts["prefix split in 1024-token pieces"] = {"max_kv_chunk": 1024}
    for name, change in parts.items():
        plan = build_decode_plan(**{**batch.plan_kwargs(), **change}, config=cfg)
        out = torch.full_like(batch.q, float("nan"))

        def run(plan=plan, out=out):
            return ca.cascade_decode(batch.q, batch.k_buffer, batch.v_buffer, plan, SM_SCALE, out=out)

        if "max_kv_chunk" in change:  # same function as the full case: check it
            check(f"cascade {name}", run(), ref)
        ms = bench(run)
        tokens = {"prefix part only": int(batch.prefix_kv_indptr[-1]),
                  "suffix part only": int(batch.suffix_kv_indptr[-1])}.get(
            name, int(batch.prefix_kv_indptr[-1]) + int(batch.suffix_kv_indptr[-1]))
        gbps = tokens * HKV * D * 4 / (ms * 1e-3) / 1e9
        row[name] = ms
        print(f"  {name}: {ms:.3f} ms = {gbps:.0f} GB/s of unique KV", flush=True)
    run_s, inv = sglang_decode(batch)
    check("sglang decode (batch order)", run_s()[inv], ref)
    row["sglang_ms"] = bench(run_s)
    order = sorted(range(len(batch.request_group)), key=lambda b: int(batch.request_group[b]))
    run_g, inv_g = sglang_decode(batch, order)
    check("sglang decode (group-sorted)", run_g()[inv_g], ref)
    row["sglang_sorted_ms"] = bench(run_g)
    results["cases"].append(row)
    print(f"  sglang {row['sglang_ms']:.3f} ms, group-sorted {row['sglang_sorted_ms']:.3f} ms", flush=True)
    torch.cuda.empty_cache()


def extend_case(args, results, label, group_sizes, q_len, suffix, configs=EXTEND_CONFIGS,
                packings=("auto", "always", "never")):
    batch = synthetic.make_batch(
        group_sizes=group_sizes, prefix_lens=[2000], suffix_lens=[suffix], q_lens=[q_len],
        num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=16, dtype=DTYPE, device=DEV,
        seed=args.seed + 1,
    )
    print(f"[{label}] tokens={batch.q.shape[0]} requests={len(batch.request_group)}", flush=True)
    ref = reference.full_attention_reference(
        batch.q, batch.k_buffer, batch.v_buffer, **batch.reference_kwargs(), sm_scale=SM_SCALE
    )
    row = {"case": label, "unique_kv_bytes": unique_kv_bytes(batch), "configs": {}}
    best = None
    for cfg in configs:
        for packing in packings if cfg is not None else ("auto",):
            try:
                run, plan, plan_ms = cascade_runner(batch, cfg, prefix_packing=packing)
                check(f"cascade {cfg or 'default'} {packing}", run(), ref)
            except Exception as exc:  # noqa: BLE001 - as above
                print(f"  cascade {cfg} {packing}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            ms = bench(run)
            print(f"  cascade {cfg or 'default'} {packing}: {ms:.3f} ms items={plan.num_items} "
                  f"packed={int(plan.packed_groups.sum())} merge={plan.needs_merge}", flush=True)
            if cfg is None:
                row["default_ms"], row["default_config"] = ms, plan.config
                continue
            row["configs"][f"{cfg} {packing}"] = ms
            if packing == "auto" and (best is None or ms < best[0]):
                best = (ms, cfg, plan_ms)
    row["cascade_ms"], row["best_config"], row["plan_ms"] = best
    run_s = sglang_extend(batch)
    check("sglang extend", run_s(), ref)
    row["sglang_ms"] = bench(run_s)
    print(f"  sglang extend {row['sglang_ms']:.3f} ms", flush=True)
    results["cases"].append(row)
    torch.cuda.empty_cache()


def decode_sweep(args, results, decode_cfg):
    print("[decode sweep] 512 requests, suffix 200-300: speedup = sglang / cascade", flush=True)
    for prefix in (32, 128, 512, 2048):
        for gs in (1, 2, 4, 8, 16, 32):
            batch = synthetic.make_batch(
                group_sizes=[gs] * (512 // gs), prefix_lens=[prefix], suffix_lens=range(200, 301, 9),
                num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=16, dtype=DTYPE,
                device=DEV, seed=args.seed + gs + prefix,
            )
            run, _, _ = cascade_runner(batch, config=decode_cfg)
            run_s, inv = sglang_decode(batch)
            err = rel_err(run(), run_s()[inv])
            t_c, t_s = bench(run), bench(run_s)
            results["decode_sweep"].append({"prefix": prefix, "group_size": gs, "cascade_ms": t_c, "sglang_ms": t_s, "err": err})
            print(f"  prefix={prefix:5d} group={gs:3d}: cascade {t_c:.3f} ms sglang {t_s:.3f} ms "
                  f"speedup {t_s / t_c:.2f} (agree {err:.1e})", flush=True)


def extend_sweep(args, results, extend_cfg):
    print("[extend sweep] ~8192 new tokens, prefix 1024: speedup = sglang / cascade", flush=True)
    # 1024 and 2048 new tokens per request: whole prompts in one chunk (a group leader's, a
    # long unshared prompt); kernels/cost_model.EXTEND_MAX_MEASURED_NEW_TOKENS keeps such steps
    # on SGLang's kernel until these rows say otherwise
    for q_len in (16, 64, 256, 1024, 2048):
        for gs in (1, 4, 16):
            n = 8192 // q_len
            if n < gs:
                continue
            batch = synthetic.make_batch(
                group_sizes=[gs] * (n // gs), prefix_lens=[1024], suffix_lens=[q_len + 64],
                q_lens=[q_len], num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, page_size=16,
                dtype=DTYPE, device=DEV, seed=args.seed + gs + q_len,
            )
            run, plan, _ = cascade_runner(batch, config=extend_cfg)
            run_p, _, _ = cascade_runner(batch, config=extend_cfg, prefix_packing="always")
            run_s = sglang_extend(batch)
            err = max(rel_err(run(), run_s()), rel_err(run_p(), run_s()))
            t_c, t_p, t_s = bench(run), bench(run_p), bench(run_s)
            results["extend_sweep"].append({"q_len": q_len, "group_size": gs, "cascade_ms": t_c, "packed_ms": t_p,
                                                "sglang_ms": t_s, "err": err, "packed": int(plan.packed_groups.sum())})
            print(f"  q_len={q_len:4d} group={gs:3d}: cascade {t_c:.3f} ms (always packed {t_p:.3f}) "
                  f"sglang {t_s:.3f} ms speedup {t_s / t_c:.2f} packed={int(plan.packed_groups.sum())} "
                  f"(agree {err:.1e})", flush=True)


def _print_configs(row, bw):
    """Every config of a tuned case, fastest first: decode against its HBM floor, extend
    (compute-bound) against SGLang's kernel on the same batch."""
    floor_ms = row["unique_kv_bytes"] / bw * 1e3
    decode = row["case"].startswith("decode")
    head = f"floor {floor_ms:.3f} ms" if decode else f"sglang {row['sglang_ms']:.3f} ms"
    print(f"[{row['case']}] {head}; default {row['default_config']} {row['default_ms']:.3f} ms")
    for cfg, ms in sorted(row["configs"].items(), key=lambda kv: kv[1]):
        rel = f"{100 * floor_ms / ms:5.1f}% of floor" if decode else f"{row['sglang_ms'] / ms:5.2f}x sglang"
        print(f"  {cfg:<40} {ms:.3f} ms  {rel}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sweep", action="store_true", help="skip the cost-model sweeps")
    parser.add_argument("--json", type=str, default=None, help="write all numbers here")
    parser.add_argument("--tune", action="store_true",
                        help="only the engine-shaped decode step and an authors-shaped prefill, "
                             "each over a grid of tile shapes")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    props = torch.cuda.get_device_properties(0)
    results = {"device": props.name, "sms": props.multi_processor_count, "command": COMMAND,
               "cases": [], "decode_sweep": [], "extend_sweep": []}
    print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    bw = copy_bandwidth()
    results["copy_bw"] = bw
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    if args.tune:
        decode_case(args, results, configs=TUNE_CONFIGS, label="decode tune", **TUNE_SHAPE)
        _print_configs(results["cases"][-1], bw)
        args.no_sweep = True
    else:
        decode_case(args, results)
        decode_case(args, results, page_size=1, configs=[None], label="decode page 1")
    if args.tune:
        extend_case(args, results, "extend tune", configs=EXTEND_TUNE_CONFIGS, packings=("auto",),
                    **EXTEND_TUNE_SHAPE)
        _print_configs(results["cases"][-1], bw)
    else:
        extend_case(args, results, "extend E1", [4] * 8, q_len=256, suffix=256)
        extend_case(args, results, "extend E2", [16] * 32, q_len=16, suffix=16)
    for line in kernel_report():
        print("  " + line)
    if not args.no_sweep:
        decode_sweep(args, results, None)
        extend_sweep(args, results, None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print("\nreproduce: " + COMMAND)
    print(f"floor = unique KV bytes / {bw / 1e12:.2f} TB/s copy bandwidth; speedup = sglang / cascade")
    print(f"{'case':<15}{'default ms':>11}{'best ms':>9}{'sglang ms':>10}{'speedup':>8}{'sorted':>7}"
          f"{'floor ms':>9}{'% floor':>8}  best config")
    for row in results["cases"]:
        floor_ms = row["unique_kv_bytes"] / bw * 1e3
        t = row.get("default_ms", row["cascade_ms"])
        sorted_x = f"{row['sglang_sorted_ms'] / t:.2f}" if "sglang_sorted_ms" in row else "-"
        print(f"{row['case']:<15}{t:>11.3f}{row['cascade_ms']:>9.3f}{row['sglang_ms']:>10.3f}"
              f"{row['sglang_ms'] / t:>8.2f}{sorted_x:>7}{floor_ms:>9.3f}{100 * floor_ms / t:>7.0f}%  "
              f"{row['best_config']}")


if __name__ == "__main__":
    main()
