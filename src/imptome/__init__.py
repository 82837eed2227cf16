"""imptome: importance-based token merging for diffusers pipelines.

import imptome
imptome.apply_patch(pipe, ratio=0.7)     # merge what classifier-free guidance says matters least
image = pipe(prompt).images[0]
imptome.importance_map(pipe)             # [images, H, W] map of the last step
imptome.remove_patch(pipe)               # back to the original model, bit for bit
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from imptome.config import PRESETS, MergeConfig

if TYPE_CHECKING:  # loaded on first use (see __getattr__)
    from imptome import visualize as visualize
    from imptome.patch.api import apply_patch, importance_map, is_patched, merge_plan, remove_patch
    from imptome.patch.state import PlanRecord

# What each release changed, and whether its images differ: CHANGELOG.md.
__version__ = "0.8.5"


# Loaded on first use: importing diffusers (for the patch) or matplotlib (for pictures) takes seconds, which
# `import imptome`, `imptome --version` and `imptome --help` need not wait for.
_LAZY = {
    "apply_patch": "imptome.patch.api",
    "importance_map": "imptome.patch.api",
    "is_patched": "imptome.patch.api",
    "merge_plan": "imptome.patch.api",
    "remove_patch": "imptome.patch.api",
    "PlanRecord": "imptome.patch.state",
}


_SUBPACKAGES = ("visualize", "patch", "merge", "bench", "miniature")


def __getattr__(name: str) -> object:
    if name in _SUBPACKAGES:
        if name == "patch":  # as when the package imported its functions: imptome.patch.api etc. loaded
            importlib.import_module("imptome.patch.api")
        return importlib.import_module(f"imptome.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imptome' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})


__all__ = [
    "PRESETS",
    "MergeConfig",
    "PlanRecord",
    "__version__",
    "apply_patch",
    "importance_map",
    "is_patched",
    "merge_plan",
    "remove_patch",
]
