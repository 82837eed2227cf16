"""Quality metrics on inputs with known answers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.signal import convolve2d

from imptome.bench.metrics import bootstrap_ci, frechet_distance, psnr, ssim, to_grid


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


def test_bootstrap_ci_of_independent_units_is_the_plain_percentile_bootstrap():
    """[n], one unit per cluster: the draws and the interval of the bootstrap before clusters were added."""
    rng = np.random.default_rng(3)
    hits, counts = rng.integers(0, 3, 50).astype(float), rng.integers(1, 4, 50).astype(float)
    idx = np.random.default_rng(0).integers(0, 50, (2000, 50))
    expected = np.percentile(hits[idx].sum(1) / counts[idx].sum(1), [2.5, 97.5])
    np.testing.assert_allclose(bootstrap_ci(hits, counts), expected, rtol=1e-12)


def _prompt_values(prompts: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt values and object counts: what all seeds of a prompt share."""
    rng = np.random.default_rng(1)
    return rng.normal(25, 3, prompts), rng.integers(1, 4, prompts).astype(float)


def test_a_prompt_with_identical_seeds_counts_once():
    """All seeds of a prompt make the same value: resampling prompts gives the interval of the per-prompt
    values, whatever the number of seeds, while resampling the images as independent units narrows it by
    about sqrt(seeds), as if every copy were news."""
    per_prompt, _ = _prompt_values()
    seeds = 8
    grid = np.repeat(per_prompt[:, None], seeds, axis=1)  # [prompts, seeds]
    clustered = bootstrap_ci(grid)
    np.testing.assert_allclose(clustered, bootstrap_ci(per_prompt), rtol=1e-12)
    low, high = clustered
    assert low < per_prompt.mean() < high
    images_low, images_high = bootstrap_ci(grid.ravel())  # the interval before this change
    assert math.isclose((high - low) / (images_high - images_low), math.sqrt(seeds), rel_tol=0.15)


def test_clusters_weigh_their_units_by_the_weights():
    """A ratio of sums: resampling prompts is resampling the per-prompt sums of values and of weights (hits
    and objects), missing units (NaN) counting in neither."""
    per_prompt, objects = _prompt_values()
    rng = np.random.default_rng(2)
    weights = np.repeat(objects[:, None], 4, axis=1)
    hits = np.minimum(rng.integers(0, 4, weights.shape), weights).astype(float)
    hits[3, 1] = weights[3, 1] = np.nan  # an image not scored
    expected = bootstrap_ci(np.nansum(hits, 1), np.nansum(weights, 1))
    np.testing.assert_allclose(bootstrap_ci(hits, weights), expected, rtol=1e-12)
    low, high = bootstrap_ci(hits, weights)
    assert low <= np.nansum(hits) / np.nansum(weights) <= high
    # weights matter: the same hits over twice the objects halve the accuracy and its interval
    np.testing.assert_allclose(bootstrap_ci(hits, 2 * weights), np.array(expected) / 2, rtol=1e-12)


def test_bootstrap_ci_is_deterministic():
    values = np.random.default_rng(4).normal(size=(12, 5))
    for resample in ((0,), (0, 1)):
        assert bootstrap_ci(values, resample=resample) == bootstrap_ci(values, resample=resample)
        assert bootstrap_ci(values, resample=resample) != bootstrap_ci(values, resample=resample, seed=1)


def test_the_crossed_bootstrap_counts_what_a_seed_shares():
    """Every prompt at one seed starts from the same noise: a shift shared by a column (a seed) is invisible
    to resampling prompts alone, and widens the interval when seeds are resampled too."""
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 0.1, (30, 8))
    shared = noise + rng.normal(0, 2.0, 8)[None, :]  # each seed moves every prompt alike
    width = {
        (name, resample): np.diff(bootstrap_ci(grid, resample=resample)).item()
        for name, grid in (("noise", noise), ("shared", shared))
        for resample in ((0,), (0, 1))
    }
    assert width["shared", (0,)] == pytest.approx(width["noise", (0,)], rel=0.2)  # prompts see no shift
    assert width["shared", (0, 1)] > 5 * width["shared", (0,)]
    # without a shared shift the crossed interval stays of the clustered one's size (mildly conservative)
    assert width["noise", (0,)] <= width["noise", (0, 1)] < 2 * width["noise", (0,)]


def test_too_few_clusters_give_no_interval():
    """One prompt (or one seed, when seeds are resampled) leaves no spread to estimate: None, not a crash
    nor an interval of width zero."""
    one_prompt = np.array([[20.0, 22.0, 25.0]])
    assert bootstrap_ci(one_prompt) is None and bootstrap_ci(one_prompt[0, :1]) is None
    one_seed = np.array([[20.0], [22.0], [25.0]])
    low, high = bootstrap_ci(one_seed)
    assert 20.0 <= low < high <= 25.0
    assert bootstrap_ci(one_seed, resample=(0, 1)) is None
    # prompts without any value (no finite PSNR, not scored) are left out, not drawn as empty clusters
    missing = np.array([[20.0, np.nan], [np.nan, np.nan]])
    assert bootstrap_ci(missing) is None
    assert bootstrap_ci(np.array([[np.nan, np.nan]] * 3)) is None
    with pytest.raises(ValueError, match="infinite"):
        bootstrap_ci(np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="one shape"):
        bootstrap_ci(np.ones((3, 2)), np.ones(6))


def test_to_grid_places_each_unit_at_its_prompt_and_seed():
    grid = to_grid([1.0, 2.0, 3.0], rows=["b", "a", "b"], cols=[0, 0, 7])
    np.testing.assert_array_equal(grid, [[1.0, 3.0], [2.0, np.nan]])  # labels in order of first appearance
    grid = to_grid([1.0, 2.0], rows=["b", "a"], cols=[7, 0], row_labels=["a", "b", "c"], col_labels=[0, 7])
    np.testing.assert_array_equal(grid, [[2.0, np.nan], [np.nan, 1.0], [np.nan, np.nan]])
    with pytest.raises(ValueError, match="two values for row 'a', column 0"):
        to_grid([1.0, 2.0], rows=["a", "a"], cols=[0, 0])
