"""The `tomesd` package, the published baseline, patched as both benchmarks compare it with imptome."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from imptome.patch.api import find_denoiser
from imptome.patch.families import finest_attention_downsample


@contextmanager
def tomesd_patched(target: Any, ratio: float) -> Iterator[None]:
    """tomesd at `ratio` on `target` (a pipeline or its UNet) for the duration, at imptome's level: the finest
    with attention (tomesd's default, the full-resolution level, has no attention on SDXL, where it would
    merge nothing)."""
    import tomesd

    tomesd.apply_patch(target, ratio=ratio, max_downsample=finest_attention_downsample(find_denoiser(target)))
    try:
        yield
    finally:
        tomesd.remove_patch(target)
