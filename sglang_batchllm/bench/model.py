"""The benchmark's model: a config directory served with dummy weights, and the shape numbers
(parameters, KV bytes, usable token ids) the workloads and the compute floor need.

The default is a Llama-3.1-8B-architecture `config.json` written by `write_llama31_8b_dir`:
with `load_format="dummy"` and `skip_tokenizer_init=True` SGLang needs nothing else (no
weights, no tokenizer), which is how docs/baseline.md measured vanilla SGLang.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

LLAMA31_8B_CONFIG: dict = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}


def write_llama31_8b_dir(path: str | Path) -> str:
    """Write (or leave unchanged) a config-only Llama-3.1-8B model directory; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(LLAMA31_8B_CONFIG, indent=2) + "\n"
    config = path / "config.json"
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    return str(path)


@dataclass(frozen=True)
class TokenRange:
    """Random prompt tokens are drawn from `[lo, hi)`: the vocabulary minus the special ids
    at either end (Llama-3 keeps them above 128000, small tokenizers at 0..k)."""

    lo: int
    hi: int

    @property
    def size(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool
    dtype_bytes: int
    special_ids: tuple[int, ...]

    @classmethod
    def from_config_dir(cls, path: str | Path) -> "ModelShape":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} does not exist; --model-config needs a Hugging Face model directory "
                "with a config.json (weights are not needed: they are random)"
            )
        c = json.loads(config_file.read_text())
        c = c.get("text_config", c)
        missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in c]
        if missing:
            raise ValueError(f"{config_file}: missing {missing}; the benchmark needs a decoder-only LM config")
        heads = c["num_attention_heads"]
        dtype = c.get("torch_dtype") or c.get("dtype") or "bfloat16"
        return cls(
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c.get("intermediate_size", 4 * c["hidden_size"]),
            vocab=c["vocab_size"],
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            dtype_bytes=4 if dtype in ("float32", "fp32") else 2,
            special_ids=tuple(sorted(_special_ids(c, path))),
        )

    @property
    def layer_matmul_params(self) -> int:
        """Weights every token multiplies through in the decoder layers (q, k, v, o, gate, up, down)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp)

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def token_range(self) -> TokenRange:
        """Special ids in the lower half of the vocabulary raise `lo`, those in the upper half
        lower `hi`; everything in between is an ordinary token."""
        lo, hi = 0, self.vocab
        for i in self.special_ids:
            if i < self.vocab // 2:
                lo = max(lo, i + 1)
            elif i < self.vocab:
                hi = min(hi, i)
        if hi - lo < 2:
            raise ValueError(f"no ordinary token ids left in vocab of {self.vocab} after special ids {self.special_ids}")
        return TokenRange(lo, hi)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["special_ids"] = list(self.special_ids)
        return d


def _special_ids(config: dict, path: Path) -> set[int]:
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int):
                ids.add(v)
    tokenizer = path / "tokenizer.json"
    if tokenizer.is_file():
        for tok in json.loads(tokenizer.read_text()).get("added_tokens", []):
            if tok.get("special"):
                ids.add(int(tok["id"]))
    return ids
