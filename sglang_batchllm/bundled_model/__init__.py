"""The bundled model: a small Llama-architecture model the project builds itself
(`scripts/build_bundled_model.py`): a tokenizer with a chat template and weights trained on
`corpus.txt` (`model.safetensors`, bf16). It lets anyone start the server and send text
requests with no download; its greedy answers follow the prompt (mostly the corpus' own words)
and every part of the serving path runs."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent


def model_dir() -> str:
    """Directory to pass as SGLang's `model_path`; SGLang's default `load_format` loads its weights."""
    return str(_DIR)
