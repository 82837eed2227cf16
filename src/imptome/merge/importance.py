"""The importance signal: how strongly classifier-free guidance pulls each latent position."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def guidance_importance(cond: torch.Tensor, uncond: torch.Tensor, noise_channels: int) -> torch.Tensor:
    """Channel mean of |eps_cond - eps_uncond| per latent position.

    Args:
        cond, uncond: the conditional and unconditional denoiser outputs, [S, C, H, W] (images) or
            [S, C, F, H, W] (video).
        noise_channels: how many leading channels are noise; the rest (a learned variance) is ignored.

    Returns:
        float32 [S, H, W], or [S * F, H, W] for video with rows ordered sample-major (s * F + f), the order
        in which diffusers' motion UNet folds frames into the batch of its spatial layers.
    """
    difference = cond[:, :noise_channels].float() - uncond[:, :noise_channels].float()
    magnitude = difference.abs().mean(dim=1)
    if magnitude.ndim == 4:  # [S, F, H, W] -> [S * F, H, W]
        magnitude = magnitude.flatten(0, 1)
    return magnitude


def cfg_importance(noise_pred: torch.Tensor, noise_channels: int) -> torch.Tensor:
    """`guidance_importance` of a CFG batch [2S, ...], halves in either order ([uncond, cond] in diffusers'
    UNet pipelines, [cond, uncond] in DiT's): the magnitude of their difference does not depend on it."""
    if noise_pred.shape[0] % 2:
        raise ValueError(f"a CFG batch has an even size, got {noise_pred.shape[0]}")
    first, second = noise_pred.chunk(2)
    return guidance_importance(second, first, noise_channels)


def pool_to_grid(importance: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Area-pool a [U, H, W] map to a layer's token grid (h, w); returns [U, h * w] in row-major order."""
    h, w = grid
    if importance.shape[-2:] != (h, w):
        importance = F.adaptive_avg_pool2d(importance.unsqueeze(1), (h, w)).squeeze(1)
    return importance.flatten(1)
