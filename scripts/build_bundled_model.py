"""Build the bundled model's files from the text the project ships.

    python scripts/build_bundled_model.py            # rewrite sglang_batchllm/bundled_model/
    python scripts/build_bundled_model.py --check    # exit 1 if the committed files differ

Trains a byte-level BPE tokenizer on `bundled_model/corpus.txt` (deterministic: one thread,
fixed corpus, fixed settings) and writes it with a chat template, plus a small Llama-architecture
`config.json`. SGLang loads the model with `load_format="dummy"` (seeded random weights), so no
weights are shipped and nothing is downloaded.
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

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files")
    args = parser.parse_args()
    files = build_files()
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
