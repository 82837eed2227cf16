"""Quality metrics on inputs with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.signal import convolve2d

from imptome.bench.metrics import bootstrap_ci, frechet_distance, psnr, ssim


def _images(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_psnr_identical_is_infinite_and_known_offset():
    a = _images(0)
    assert np.isinf(psnr(a, a)).all()
    flat = np.full((1, 16, 16, 3), 100, np.uint8)
    shifted = flat + 10  # MSE = (10/255)^2
    assert math.isclose(psnr(shifted, flat)[0], 20 * math.log10(255 / 10), rel_tol=1e-4)


def _reference_ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM written out (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, range 1), the
    map averaged over the whole image with reflect-padded borders; one uint8 [H, W, 3] image."""
    side = np.arange(11) - 5
    window = np.exp(-(side**2) / (2 * 1.5**2))
    window = np.outer(window, window) / window.sum() ** 2
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for channel in range(3):
        x, y = (np.pad(z[..., channel] / 255.0, 5, mode="reflect") for z in (image, reference))

        def local_mean(z: np.ndarray) -> np.ndarray:
            return convolve2d(z, window, mode="valid")

        mx, my = local_mean(x), local_mean(y)
        vx, vy, cxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
        maps.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(maps))


def test_ssim_matches_the_formula_written_out():
    a = _images(0)
    np.testing.assert_allclose(ssim(a, a), 1.0, atol=1e-5)
    noise = np.random.default_rng(1).normal(size=a.shape)
    for scale in (5, 30, 80):
        noisy = np.clip(a + scale * noise, 0, 255).astype(np.uint8)
        expected = [_reference_ssim(x, y) for x, y in zip(noisy, a, strict=True)]
        np.testing.assert_allclose(ssim(noisy, a), expected, atol=1e-5)


def test_frechet_distance_of_identical_and_shifted_sets():
    feats = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(feats, feats) < 1e-6
    shift = np.zeros(8)
    shift[0] = 3.0
    # equal covariances: the distance is the squared mean shift
    assert math.isclose(frechet_distance(feats + shift, feats), 9.0, rel_tol=1e-6)


def test_frechet_distance_needs_two_finite_rows_per_set():
    feats = np.random.default_rng(0).normal(size=(5, 8))
    # one image has no covariance: None at once, not a NaN matrix handed to sqrtm (which can hang)
    assert frechet_distance(feats[:1], feats) is None and frechet_distance(feats, feats[:1]) is None
    nan = feats.copy()
    nan[0, 0] = np.nan
    assert frechet_distance(nan, feats) is None


def test_frechet_distance_of_singular_covariances_warns_nothing():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 8)), rng.normal(size=(20, 8)) + 0.5

    def padded(x: np.ndarray) -> np.ndarray:  # constant features: singular covariances, the same distance
        return np.concatenate([x, np.zeros((len(x), 3))], axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's LinAlgWarning included
        assert math.isclose(frechet_distance(padded(a), padded(b)), frechet_distance(a, b), rel_tol=1e-6)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_samples():
    rng = np.random.default_rng(0)
    small, large = rng.random(30) < 0.7, rng.random(3000) < 0.7
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
    # 95%: for many samples the normal approximation's width, 2 * 1.96 * standard error
    p = large.mean()
    assert math.isclose(hi_l - lo_l, 2 * 1.96 * math.sqrt(p * (1 - p) / large.size), rel_tol=0.1)
