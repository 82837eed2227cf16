"""The importance signal and its pooling to a layer's token grid, and the merge code's guards on bad input."""

from __future__ import annotations

import pytest
import torch

from imptome.merge import (
    build_plan,
    cell_partition,
    cfg_importance,
    guidance_importance,
    importance_partition,
    pool_to_grid,
)


def test_pool_to_grid_is_the_block_mean_in_row_major_order():
    """A non-square map pooled 2x and 4x: every token gets the mean of its own block of the map, so a map that
    is high in one corner stays high in that corner (a flip or a transpose would fail)."""
    importance = torch.rand(3, 8, 12, generator=torch.Generator().manual_seed(0))
    for grid in ((4, 6), (2, 3)):
        h, w = grid
        blocks = importance.view(3, h, 8 // h, w, 12 // w).mean(dim=(2, 4))
        torch.testing.assert_close(pool_to_grid(importance, grid), blocks.flatten(1))
    assert torch.equal(pool_to_grid(importance, (8, 12)), importance.flatten(1))


def test_guidance_importance_is_the_channel_mean_of_the_noise_difference_only():
    cond, uncond = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    expected = (cond[:, :4] - uncond[:, :4]).abs().mean(dim=1)
    torch.testing.assert_close(guidance_importance(cond, uncond, noise_channels=4), expected)
    cond[:, 4:] += 100.0  # a learned variance is not importance
    torch.testing.assert_close(guidance_importance(cond, uncond, noise_channels=4), expected)


def test_video_importance_is_sample_major():
    """[S, C, F, H, W] -> [S * F, H, W], row s * F + f, the order in which the motion UNet folds frames."""
    cond, uncond = torch.randn(2, 4, 3, 4, 4), torch.zeros(2, 4, 3, 4, 4)
    importance = guidance_importance(cond, uncond, noise_channels=4)
    assert importance.shape == (6, 4, 4)
    torch.testing.assert_close(importance[1 * 3 + 2], cond[1, :, 2].abs().mean(dim=0))


def test_cfg_importance_pairs_image_s_of_each_half():
    """Image s of the first half against image s of the second, over the noise channels only."""
    uncond = torch.zeros(2, 6, 2, 2)
    cond = torch.stack([torch.ones(6, 2, 2), torch.full((6, 2, 2), 3.0)])
    cond[:, 4:] = 100  # a learned variance: not noise
    importance = cfg_importance(torch.cat([uncond, cond]), 4)
    assert torch.equal(importance, torch.stack([torch.ones(2, 2), torch.full((2, 2), 3.0)]))


def _plan(units: int = 1, rows: int = 2):
    grid = (4, 4)
    dst = cell_partition(units, grid, 2, 2, torch.tensor(7))
    return build_plan(dst, num_remove=8, grid=grid, rows=rows, metric=torch.randn(units, 16, 8))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cfg_importance(torch.zeros(3, 4, 2, 2), 4), "even size, got 3"),
        (lambda: _plan().merge(torch.zeros(3, 16, 8)), r"plan is for \(2, 16\) tokens, got \(3, 16\)"),
        (lambda: _plan().merge(torch.zeros(2, 9, 8)), r"got \(2, 9\)"),
        # as many tokens in all as the plan's rows hold: a shape error inside torch (0.8.3)
        (lambda: _plan().merge(torch.zeros(4, 8, 8)), r"plan is for \(2, 16\) tokens, got \(4, 8\)"),
        # an output of another shape than the merged tokens' [B, K, C] came back silently of a wrong shape or
        # from other slots ([4, K]: [4, N / 2]; [2, K + 1]: [2, N]; [1, 2K]: [1, 2N]), or failed in the gather
        (lambda: _plan().unmerge(torch.zeros(4, 8, 8)), r"plan is for \(2, 8\) kept tokens, got \(4, 8\)"),
        (lambda: _plan().unmerge(torch.zeros(2, 9, 8)), r"got \(2, 9\)"),
        (lambda: _plan().unmerge(torch.zeros(1, 16, 8)), r"got \(1, 16\)"),
        (lambda: _plan().unmerge(torch.zeros(2, 7, 8)), r"got \(2, 7\)"),
        (lambda: _plan(units=2, rows=3), "rows=3 is not a multiple of the plan's units=2"),
        # no destination (an IndexError from max() inside the matching) or no unit (a ZeroDivisionError)
        (
            lambda: build_plan(torch.zeros(1, 0, dtype=torch.long), 0, (2, 2), 1, torch.randn(1, 4, 3)),
            r"dst_idx \[1, 0\] must hold at least one unit and one destination",
        ),
        (lambda: build_plan(torch.zeros(0, 1, dtype=torch.long), 0, (2, 2), 0), r"dst_idx \[0, 1\]"),
        # features or a pool of more tokens or units than the plan's were read in part, silently
        (
            lambda: build_plan(torch.tensor([[0]]), 2, (2, 2), 1, torch.randn(1, 6, 3)),
            r"metric \[1, 6, 3\] must start with \[U, N\] = \[1, 4\]",
        ),
        (lambda: build_plan(torch.tensor([[0]]), 2, (2, 2), 1, torch.randn(2, 4, 3)), r"metric \[2, 4, 3\]"),
        (
            lambda: build_plan(torch.tensor([[0]]), 2, (2, 2), 1, in_pool=torch.ones(1, 5, dtype=torch.bool)),
            r"in_pool \[1, 5\] must start with \[U, N\] = \[1, 4\]",
        ),
        (
            lambda: importance_partition(torch.rand(1, 16), 4, 8, key=None),
            "random destination draw needs a key",
        ),
    ],
)
def test_bad_input_to_the_merge_code_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
