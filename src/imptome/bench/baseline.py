"""The `tomesd` package, the published baseline, patched as both benchmarks compare it with imptome."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

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


def seed_tomesd(target: Any, seed: int) -> None:
    """Give the tomesd patch on `target` a generator seeded with `seed` for its random partitions.

    Left alone, tomesd forks torch's global RNG at its first call after `apply_patch` and draws every later
    partition from that fork, so its partitions depend on the process (torch seeds the global RNG anew in
    each one unless a program seeds it) and on everything drawn before: its images would differ from run to
    run, and a batch made again on resuming would differ from the batch an uninterrupted run made."""
    denoiser = find_denoiser(target)
    device = next(denoiser.parameters()).device  # tomesd makes a new fork when the devices differ
    tome_info: Any = denoiser._tome_info  # tomesd's dict, set by its apply_patch
    tome_info["args"]["generator"] = torch.Generator(device).manual_seed(seed)
