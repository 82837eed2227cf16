"""The importance signal: how strongly classifier-free guidance pulls each latent position."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cfg_importance(noise_pred: torch.Tensor, noise_channels: int, cond_first: bool) -> torch.Tensor:
    """Channel mean of |eps_cond - eps_uncond| per latent position.

    Args:
        noise_pred: denoiser output for a CFG batch, [2S, C, H, W] (images) or [2S, C, F, H, W] (video).
        noise_channels: how many leading channels are noise; the rest (a learned variance) is ignored.
        cond_first: True when the batch is [cond, uncond] (DiT), False for [uncond, cond].

    Returns:
        float32 [S, H, W], or [S * F, H, W] for video with rows ordered sample-major (s * F + f), the order
        in which diffusers' motion UNet folds frames into the batch of its spatial layers.
    """
    if noise_pred.shape[0] % 2:
        raise ValueError(f"a CFG batch has an even size, got {noise_pred.shape[0]}")
    first, second = noise_pred[:, :noise_channels].float().chunk(2)
    cond, uncond = (first, second) if cond_first else (second, first)
    magnitude = (cond - uncond).abs().mean(dim=1)
    if magnitude.ndim == 4:  # [S, F, H, W] -> [S * F, H, W]
        magnitude = magnitude.flatten(0, 1)
    return magnitude


def pool_to_grid(importance: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-pool a [U, H, W] map to a layer's token grid (h, w); returns [U, h * w] in row-major order."""
    h, w = grid
    if importance.shape[-2:] != (h, w):
        importance = F.adaptive_avg_pool2d(importance.unsqueeze(1), (h, w)).squeeze(1)
    return importance.flatten(1)
