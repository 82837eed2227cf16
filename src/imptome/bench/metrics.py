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


def to_grid(
    values: np.ndarray, rows: list, cols: list, row_labels: list | None = None, col_labels: list | None = None
) -> np.ndarray:
    """Per-unit values [n] with each unit's row and column label (such as its prompt and seed) -> a grid
    [n_rows, n_cols] for bootstrap_ci, NaN where no unit is. The grid's rows follow `row_labels` (default:
    the labels in `rows` in order of first appearance), its columns `col_labels` likewise."""
    values = np.asarray(values, dtype=float)
    if not len(values) == len(rows) == len(cols):
        raise ValueError(f"{len(values)} values, {len(rows)} row labels, {len(cols)} column labels")
    row_of = {label: i for i, label in enumerate(dict.fromkeys(rows if row_labels is None else row_labels))}
    col_of = {label: j for j, label in enumerate(dict.fromkeys(cols if col_labels is None else col_labels))}
    grid = np.full((len(row_of), len(col_of)), np.nan)
    filled = np.zeros(grid.shape, dtype=bool)
    for value, row, col in zip(values, rows, cols, strict=True):
        cell = row_of[row], col_of[col]
        if filled[cell]:
            raise ValueError(f"two values for row {row!r}, column {col!r}")
        grid[cell], filled[cell] = value, True
    return grid


def bootstrap_ci(
    values: np.ndarray,
    weights: np.ndarray | None = None,
    rounds: int = 2000,
    seed: int = 0,
    resample: tuple[int, ...] = (0,),
) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of sum(values) / sum(weights), resampling clusters of units.

    values [n] (independent units) or [n_a, n_b] (a grid of units, such as prompts x seeds); weights of the
    same shape (default ones, giving the plain mean). With per-image hit counts as values and object counts
    as weights this is the interval of a per-object accuracy that respects the grouping of objects in
    images. NaN in `values` or `weights` marks a missing unit: it counts in neither sum.

    `resample` names the axes whose levels are drawn with replacement, each drawn level bringing all its
    units: (0,) draws rows (clusters: a drawn prompt brings the images of all its seeds; for [n], each unit
    alone); (0, 1) draws rows and columns independently and sums the cells where they cross (the two-way
    "pigeonhole" bootstrap of crossed designs, Owen 2007, which also counts what a column shares, such as
    one seed's initial noise; conservative where each unit's own noise dominates: with nothing shared it is
    about 1.7x wider than needed for 36 x 8 units). Levels without any unit are left out. Every draw uses
    the same generator, so the interval is a function of the inputs, `rounds` and `seed`.

    Returns None when a resampled axis has fewer than 2 levels (one prompt, or one seed with (0, 1)): their
    spread cannot be estimated, and an interval of width zero would claim certainty.
    """
    values = np.asarray(values, dtype=float)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=float)
    if values.shape != weights.shape or values.ndim not in (1, 2):
        raise ValueError(
            f"values {values.shape} and weights {weights.shape}: need one shape, [n] or [n_a, n_b]"
        )
    if not resample or any(axis not in range(values.ndim) for axis in resample):
        raise ValueError(f"resample {resample}: axes of a {values.ndim}-d array, at least one")
    if np.isinf(values).any() or np.isinf(weights).any():
        raise ValueError("values and weights must not be infinite; mark a missing unit with NaN")
    missing = np.isnan(values) | np.isnan(weights)
    values, weights = np.where(missing, 0.0, values), np.where(missing, 0.0, weights)
    if values.ndim == 1:
        values, weights, present = values[:, None], weights[:, None], ~missing[:, None]
    else:
        present = ~missing
    # levels without any unit draw nothing; with them the number of informative levels drawn would vary
    rows, cols = present.any(1), present.any(0)
    values, weights = values[rows][:, cols], weights[rows][:, cols]
    if any(values.shape[axis] < 2 for axis in resample):
        return None
    rng = np.random.default_rng(seed)
    # how often each level is drawn, per round: [rounds, n_a] and [rounds, n_b] (ones for an axis kept whole)
    times = [
        _draw_counts(rng, n, rounds) if axis in resample else np.ones((rounds, n))
        for axis, n in enumerate(values.shape)
    ]
    numerator = np.einsum("ra,ab,rb->r", times[0], values, times[1])
    denominator = np.einsum("ra,ab,rb->r", times[0], weights, times[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = numerator / denominator
    ratios = ratios[np.isfinite(ratios)]  # a draw of only missing crossings has no ratio
    if not len(ratios):
        return None
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def _draw_counts(rng: np.random.Generator, n: int, rounds: int) -> np.ndarray:
    """[rounds, n]: how many times each of n levels is drawn in n draws with replacement, per round."""
    idx = rng.integers(0, n, (rounds, n))
    return np.bincount((idx + n * np.arange(rounds)[:, None]).ravel(), minlength=rounds * n).reshape(
        rounds, n
    )
