"""Every change sglang_batchllm makes to SGLang's behaviour, one module per patch.

A patch is a `Patch` record: its SGLang target(s), the release it was written for, why no
official seam (plugin entry point, radix-cache or attention-backend registry) serves, and an
`install(config)` that registers hooks with SGLang's `HookRegistry`. `install_all` runs only
when BatchLLM is enabled (see `sglang_batchllm.plugin`), once per process.

Add a patch: write `patches/<name>.py` defining `PATCH = Patch(...)`, list it in `_MODULES`,
and give it a test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from sglang_batchllm.config import BatchLLMConfig

_MODULES = ("cli_flags", "batch_intake", "scheduler", "forward_groups")


@dataclass(frozen=True)
class Patch:
    name: str
    targets: tuple[str, ...]
    sglang_version: str
    why_no_seam: str
    install: Callable[["BatchLLMConfig"], None]


def all_patches() -> dict[str, Patch]:
    patches = {}
    for module_name in _MODULES:
        patch = importlib.import_module(f"{__name__}.{module_name}").PATCH
        if patch.name in patches:
            raise RuntimeError(f"two patches are named {patch.name!r}")
        patches[patch.name] = patch
    return patches


_installed: set[str] = set()


def install_all(config: "BatchLLMConfig") -> list[str]:
    """Register every patch's hooks once per process; returns the names installed now."""
    done = []
    for name, patch in all_patches().items():
        if name in _installed:
            continue
        patch.install(config)
        _installed.add(name)
        done.append(name)
    return done
