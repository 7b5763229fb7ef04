"""The bundled model: a small Llama-architecture config and a tokenizer the project builds
itself (`scripts/build_bundled_model.py`), served with dummy weights. It lets anyone start the
server and send text requests with no download; outputs are meaningless but every part of the
serving path runs."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent


def model_dir() -> str:
    """Directory to pass as SGLang's `model_path` (with `load_format="dummy"`)."""
    return str(_DIR)
