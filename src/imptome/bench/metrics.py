"""Image-quality metrics for the quality benchmark: fidelity to full compute, Frechet distance, intervals."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def to_float_images(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float [n, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 [n, H, W, 3] against `reference`; inf where identical."""
    a, b = to_float_images(images), to_float_images(reference)
    per_image = peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return per_image.double().numpy()


def ssim(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of uint8 [n, H, W, 3] against `reference`: the mean of
    the SSIM map over the whole image, borders reflect-padded. The map is torchmetrics'; the mean is taken
    here because torchmetrics changed it (1.3 left out a 5-pixel border, later versions do not)."""
    a, b = to_float_images(images), to_float_images(reference)
    _, maps = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    return maps.flatten(1).mean(1).double().numpy()


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float | None:
    """Frechet distance between Gaussians fitted to two feature sets [n, d] (the FID formula); None when a
    set has fewer than 2 rows (no covariance) or its statistics are not finite."""
    if len(features_a) < 2 or len(features_b) < 2:
        return None
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a = np.cov(features_a, rowvar=False)
    cov_b = np.cov(features_b, rowvar=False)
    if not all(np.isfinite(x).all() for x in (mu_a, mu_b, cov_a, cov_b)):
        return None  # sqrtm of a non-finite matrix can run for many minutes
    covmean = _sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # a singular product: retry with a tiny ridge, as pytorch-fid does
        ridge = np.eye(len(cov_a)) * 1e-6
        covmean = _sqrtm((cov_a + ridge) @ (cov_b + ridge))
        if not np.isfinite(covmean).all():
            return None
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(value, 0.0)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """scipy's matrix square root without its warning on singular or ill-conditioned input: covariances
    of fewer images than feature dimensions are always singular, and FID takes their square root as is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


def bootstrap_ci(
    values: np.ndarray, weights: np.ndarray | None = None, rounds: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of sum(values) / sum(weights), resampling the n units.

    values [n]; weights [n] (default ones, giving the plain mean). With per-image hit counts as values and
    object counts as weights this is the interval of a per-object accuracy that respects the grouping
    of objects in images.
    """
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (rounds, len(values)))
    low, high = np.percentile(values[idx].sum(1) / weights[idx].sum(1), [2.5, 97.5])
    return float(low), float(high)
