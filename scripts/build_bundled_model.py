"""Build the bundled model's files from the text the project ships.

    python scripts/build_bundled_model.py                    # rewrite the tokenizer and config files
    python scripts/build_bundled_model.py --check            # exit 1 if the committed files differ
    python scripts/build_bundled_model.py --weights          # also train model.safetensors (~8 min on 2 cores)
    python scripts/build_bundled_model.py --check-weights    # retrain and compare with the shipped weights

Trains a byte-level BPE tokenizer on `bundled_model/corpus.txt` (deterministic: one thread,
fixed corpus, fixed settings) and writes it with a chat template, plus a small Llama-architecture
`config.json`. `--weights` then trains the model on the same corpus (plain paragraphs, and chats
built from them) on the CPU and writes `model.safetensors` (bf16, under 16 MB), so the bundled
model answers with text that follows the prompt and nothing is downloaded.

Training is deterministic on one machine: fixed seeds, `torch.use_deterministic_algorithms`, a
fixed thread count (TRAIN_THREADS, whatever the machine has) and a fixed data order. Another CPU
(other vector instructions) or another torch version may round differently and so produce other
bytes; `--check-weights` says whether this machine reproduces the shipped file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[1] / "sglang_batchllm" / "bundled_model"
VOCAB_SIZE = 1024  # the model's embedding size; the trained vocabulary is at most this
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header|>", "<|end_header|>", "<|eot|>"]
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>"

# A Llama-3-style chat layout with our own special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header|>' + message['role'] + '<|end_header|>\n' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header|>assistant<|end_header|>\n' }}{% endif %}"
)

# 4 layers of hidden 512 (8 query heads, 2 KV heads, head_dim 64: the GQA shape the kernels
# serve) with a narrow MLP, so that the bf16 weights fit in 16 MB (6.8M parameters, 13.6 MB).
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,  # GQA, 4 query heads per KV head, head_dim 64
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": VOCAB_SIZE,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}


def build_files() -> dict[str, str]:
    os.environ["RAYON_NUM_THREADS"] = "1"  # tokenizers' trainer is deterministic single-threaded
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(MODEL_DIR / "corpus.txt")], trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = dict(MODEL_CONFIG, bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[EOT]])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": EOS,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]}

    def dump(obj) -> str:
        return json.dumps(obj, indent=2, sort_keys=True) + "\n"

    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": dump(tokenizer_config),
        "config.json": dump(config),
        "generation_config.json": dump(generation_config),
    }


# Training settings. 4096 tokens a step, about 1.8 s a step on one core of a Xeon: the default
# run takes about 6 minutes. One thread, not two: the bytes depend on the thread count (float
# sums split differently), and a single thread also neither needs a second core nor stalls when
# another process takes it (two threads on a busy 2-core machine ran 7 s a step). The corpus
# (~2,700 tokens, ~5,500 with the chats) is seen about 150 times: the model learns it nearly by
# heart, which is what makes its greedy continuations follow the prompt instead of falling into
# one repeated token cycle.
TRAIN_THREADS = 1
TRAIN_STEPS = 200
BATCH, SEQ = 16, 256
LR, WARMUP = 2e-3, 30
SEED = 0
MAX_WEIGHT_BYTES = 16 * 2**20


def corpus_paragraphs() -> list[str]:
    text = (MODEL_DIR / "corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def chat_text(user: str, assistant: str) -> str:
    """One chat as CHAT_TEMPLATE renders it, with the assistant's answer and end-of-turn token."""
    return (f"{BOS}<|start_header|>user<|end_header|>\n{user}{EOT}"
            f"<|start_header|>assistant<|end_header|>\n{assistant}{EOT}")


def training_documents() -> list[str]:
    """The corpus paragraphs, and each as a chat: a `Question: .. Answer: ..` line becomes the
    question and its answer; another paragraph becomes its first sentence and the next ones.
    The chats teach the model to answer after the assistant header and then end its turn."""
    import re

    docs: list[str] = []
    for para in corpus_paragraphs():
        docs.append(para + "\n")
        qa = re.fullmatch(r"Question: (.+?) Answer: (.+)", para)
        if qa:
            docs.append(chat_text(qa.group(1), qa.group(2)))
            continue
        sentences = re.split(r"(?<=[.!?]) (?=[A-Z])", para)
        if len(sentences) >= 2:
            docs.append(chat_text(sentences[0], " ".join(sentences[1:3])))
    return docs


def train_weights(config: dict, tokenizer_json: str, steps: int = TRAIN_STEPS, log=print) -> dict:
    """Train the model described by `config` on the corpus; return its bf16 state dict."""
    import random
    import time

    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    tok = Tokenizer.from_str(tokenizer_json)
    docs = [tok.encode(d).ids for d in training_documents()]
    rng = random.Random(SEED)

    def stream():  # the documents over and over, each pass in a new seeded order
        while True:
            order = list(range(len(docs)))
            rng.shuffle(order)
            for i in order:
                yield from docs[i]

    tokens = stream()
    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.1, 1.0 - s / max(1, steps)))
    t0 = time.perf_counter()
    for step in range(steps):
        batch = torch.tensor([[next(tokens) for _ in range(SEQ)] for _ in range(BATCH)])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def weights_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save(state, metadata={"format": "pt"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files")
    parser.add_argument("--weights", action="store_true", help="also train and write model.safetensors")
    parser.add_argument("--check-weights", action="store_true",
                        help="retrain and compare with the shipped model.safetensors (as long as --weights)")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help=argparse.SUPPRESS)  # tests: a short run
    parser.add_argument("--weights-out", help=argparse.SUPPRESS)  # tests: write the weights elsewhere
    args = parser.parse_args()
    files = build_files()
    if args.weights or args.check_weights:
        import hashlib

        blob = weights_bytes(train_weights(json.loads(files["config.json"]), files["tokenizer.json"], args.steps))
        if len(blob) > MAX_WEIGHT_BYTES:
            print(f"the weights take {len(blob)} bytes, over the {MAX_WEIGHT_BYTES} allowed")
            return 1
        digest = hashlib.sha256(blob).hexdigest()
        if args.check_weights:
            shipped = hashlib.sha256((MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
            print(f"trained {digest}\nshipped {shipped}")
            return 0 if digest == shipped else 1
        out = Path(args.weights_out) if args.weights_out else MODEL_DIR / "model.safetensors"
        out.write_bytes(blob)
        print(f"wrote {out}: {len(blob)} bytes, sha256 {digest}")
        if args.weights_out:
            return 0
    if args.check:
        stale = [n for n, text in files.items() if (MODEL_DIR / n).read_text() != text]
        if stale:
            print("out of date: " + ", ".join(stale) + "; run scripts/build_bundled_model.py")
            return 1
        print("bundled model files are up to date")
        return 0
    for name, text in files.items():
        (MODEL_DIR / name).write_text(text)
        print(f"wrote {MODEL_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
