"""Greedy-equality check: BatchLLM's scheduler must not change what the model outputs.

`python -m sglang_batchllm.bench.greedy --out DIR` (GPU) builds a shuffled shared-prefix batch
and runs it on the bundled model with its trained weights (`--weights random`: a random-weight
checkpoint of the same shape instead, at realistic weight scales; either way greedy outputs
depend on the prompt, where SGLang's dummy loader fills weights with tiny uniform values that
make most outputs one repeated token pair). With the trained weights the prompts are windows of
the tokenized corpus, text the model knows; with random weights, random token ids. It runs the
batch through vanilla `sglang.Engine` and through
`sglang_batchllm.Engine`, each in a child process, and reports: how many outputs are identical,
how many distinct outputs there are, and for each output that differs, the top-2 logprob
margin of vanilla's model at the first differing position (a near-tie shows up as a small
margin: batch-shape numerics, not a scheduling bug). Exit 0 when every difference is a
near-tie (margin < NEAR_TIE) and at least MIN_EQUAL of the outputs are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

NEAR_TIE = 0.05  # nats between the top two tokens
MIN_EQUAL = 0.97


def build_batch(groups: int, size: int, prefix: int, distinct: int, output: int, seed: int = 0,
                text_ids: list[int] | None = None):
    """`groups` x `size` requests, each group sharing a `prefix`-token head, then `distinct` tokens
    of each request's own. Tokens are random ordinary ids, or with `text_ids` contiguous windows
    of that token stream (so a trained model reads text it knows)."""
    rng = random.Random(seed)
    vocab = range(8, 1000)  # the bundled tokenizer's ordinary ids

    def tokens(n: int) -> list[int]:
        if text_ids is None:
            return [rng.choice(vocab) for _ in range(n)]
        out: list[int] = []
        while len(out) < n:  # a window, wrapping to another window when the stream is short
            start = rng.randrange(max(1, len(text_ids) - (n - len(out))))
            out += text_ids[start:start + n - len(out)]
        return out

    reqs = []
    for g in range(groups):
        head = tokens(prefix)
        for m in range(size):
            reqs.append({"rid": f"g{g}-{m}", "input_ids": head + tokens(distinct), "max_new_tokens": output})
    rng.shuffle(reqs)
    return reqs


def corpus_ids() -> list[int]:
    """The bundled corpus, tokenized by the bundled tokenizer."""
    from tokenizers import Tokenizer

    from sglang_batchllm.bundled_model import model_dir

    tok = Tokenizer.from_file(str(Path(model_dir()) / "tokenizer.json"))
    return tok.encode((Path(model_dir()) / "corpus.txt").read_text(encoding="utf-8")).ids


def write_random_checkpoint(out: Path, seed: int = 0) -> Path:
    """The bundled model's config and tokenizer with random weights at realistic scales."""
    import torch
    from safetensors.torch import save_file

    from sglang_batchllm.bundled_model import model_dir

    src = Path(model_dir())
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    g = torch.Generator().manual_seed(seed)

    def w(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": w(vocab, h, std=1.0), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
               "lm_head.weight": w(vocab, h, std=0.05)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(heads * hd, h, std=0.15),  # sharp enough attention to depend on the prompt
            p + "self_attn.k_proj.weight": w(kv * hd, h, std=0.15),
            p + "self_attn.v_proj.weight": w(kv * hd, h, std=0.05),
            p + "self_attn.o_proj.weight": w(h, heads * hd, std=0.05),
            p + "mlp.gate_proj.weight": w(inter, h, std=0.05),
            p + "mlp.up_proj.weight": w(inter, h, std=0.05),
            p + "mlp.down_proj.weight": w(h, inter, std=0.05),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })
    save_file(tensors, str(out / "model.safetensors"))
    return out


def engine_kwargs(model: str, attention_backend: str | None) -> dict:
    kw = dict(model_path=model, skip_tokenizer_init=True, sampling_backend="pytorch", grammar_backend="none",
              mem_fraction_static=0.5, random_seed=0, log_level="warning")
    if attention_backend:
        kw["attention_backend"] = attention_backend
    return kw


def run_child(engine: str, model: str, batch_path: Path, out_path: Path, backend: str | None) -> None:
    reqs = json.loads(batch_path.read_text())
    if engine == "vanilla":
        from sglang.srt.entrypoints.engine import Engine
    else:
        from sglang_batchllm import Engine
    # vanilla's own default on Hopper is fa3, absent on hosts without its binary: triton, the
    # kernels BatchLLM's backend also runs
    e = Engine(**engine_kwargs(model, backend or ("triton" if engine == "vanilla" else None)))
    # Vanilla also returns the top-2 logprobs at every output position: where BatchLLM's
    # output first differs, vanilla's path up to there is the same, so its margin there says
    # whether the difference is a near-tie. BatchLLM runs without logprobs (SGLang does not
    # mix decode rows into prefill steps when logprobs are asked for).
    with_logprobs = engine == "vanilla"
    try:
        outs = e.generate(input_ids=[r["input_ids"] for r in reqs], rid=[r["rid"] for r in reqs],
                          sampling_params=[{"temperature": 0.0, "ignore_eos": True, "max_new_tokens": r["max_new_tokens"]}
                                           for r in reqs],
                          return_logprob=with_logprobs, top_logprobs_num=2 if with_logprobs else None)
        result = {r["rid"]: o["output_ids"] for r, o in zip(reqs, outs)}
        margins = {}
        if with_logprobs:
            for r, o in zip(reqs, outs):
                margins[r["rid"]] = [top[0][0] - top[1][0] for top in o["meta_info"]["output_top_logprobs"]]
        out_path.write_text(json.dumps({"outputs": result, "margins": margins}))
    finally:
        e.shutdown()


def _spawn(engine: str, model: Path, batch: Path, out: Path, backend: str | None, env_extra: dict | None = None) -> dict:
    """One engine run in a child process of its own (SGLang loads plugins once per process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLANG_BATCHLLM_")}
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "sglang_batchllm.bench.greedy", "--child", engine, "--model", str(model),
           "--batch", str(batch), "--result", str(out)] + (["--backend", backend] if backend else [])
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def compare(vanilla: dict, ours: dict) -> dict:
    same = [rid for rid in vanilla if vanilla[rid] == ours[rid]]
    differ = {}
    for rid in vanilla:
        a, b = vanilla[rid], ours[rid]
        if a != b:
            differ[rid] = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
    return {"requests": len(vanilla), "identical": len(same), "distinct_outputs": len({tuple(v) for v in vanilla.values()}),
            "first_divergence": differ}


MARGIN_EDGES = (0.05, 0.25, 1.0, 4.0)  # nats: near-tie, bf16-logit scale, clear, decisive


def difference_profile(report: dict) -> dict:
    """Where and how firmly the outputs part, for a log line that outlives the run directory:
    vanilla's top-2 margins at the first differences, bucketed (a scheduling or kernel bug
    shows up as many large margins; numerics as small ones), and the output positions of the
    first differences (a step type that goes wrong shows up as one position)."""
    margins = sorted(report.get("margins", {}).values())
    buckets = {}
    lo = 0.0
    for hi in MARGIN_EDGES + (float("inf"),):
        name = f"<{hi:g}" if hi != float("inf") else f">={lo:g}"
        buckets[name] = sum(1 for m in margins if lo <= m < hi)
        lo = hi
    positions = sorted(report.get("first_divergence", {}).values())
    median = margins[len(margins) // 2] if margins else None
    return {
        "margin_buckets": buckets,
        "median_margin_of_a_difference": median,
        "first_divergence_positions": dict(sorted(
            (pos, positions.count(pos)) for pos in set(positions))),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="greedy-out")
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--prefix", type=int, default=400)
    p.add_argument("--distinct", type=int, default=40)
    p.add_argument("--output", type=int, default=32)
    p.add_argument("--weights", choices=("trained", "random"), default="trained",
                   help="the bundled model's trained weights (default), or random ones of its shape")
    p.add_argument("--backend", default=None, help="attention backend for both engines (default: each engine's own)")
    p.add_argument("--child"), p.add_argument("--model"), p.add_argument("--batch"), p.add_argument("--result")
    a = p.parse_args(argv)
    if a.child:
        run_child(a.child, a.model, Path(a.batch), Path(a.result), a.backend)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.weights == "random":
        model = write_random_checkpoint(out / "model")
        reqs = build_batch(a.groups, a.size, a.prefix, a.distinct, a.output)
    else:
        from sglang_batchllm.bundled_model import model_dir

        model = Path(model_dir())
        reqs = build_batch(a.groups, a.size, a.prefix, a.distinct, a.output, text_ids=corpus_ids())
    batch = out / "batch.json"
    batch.write_text(json.dumps(reqs))
    ours = _spawn("batchllm", model, batch, out / "batchllm.json", a.backend, {"SGLANG_BATCHLLM_ENABLE": "1"})["outputs"]
    plain = _spawn("vanilla", model, batch, out / "vanilla.json", a.backend)
    vanilla = plain["outputs"]
    report = compare(vanilla, ours)
    report["margins"] = {rid: plain["margins"][rid][i] for rid, i in report["first_divergence"].items()}
    near_ties = sum(1 for m in report.get("margins", {}).values() if m < NEAR_TIE)
    report["near_ties"] = near_ties
    ok = report["identical"] >= MIN_EQUAL * report["requests"] and near_ties == len(report["first_divergence"])
    report["ok"] = ok
    (out / "report.json").write_text(json.dumps(report, indent=1))
    summary = {k: v for k, v in report.items() if k not in ("first_divergence", "margins")}
    summary["max_margin_of_a_difference"] = max(report.get("margins", {}).values(), default=None)
    summary.update(difference_profile(report))
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
