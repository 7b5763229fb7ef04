import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# Without CUDA every Triton kernel runs under the interpreter. Triton reads the variable when a
# kernel is decorated, so it must be set before any test module imports one (SGLang's kernels
# come in with sglang itself); `import torch` above does not import triton.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
