"""Partitions: which tokens become destinations, and which are protected as important.

Random choices come from `random_bits` under the caller's key (see `imptome.merge.noise`): traceable by
torch.compile, identical on every device, and without host synchronisation.
"""

from __future__ import annotations

import math

import torch

from imptome.merge import constants
from imptome.merge.noise import random_bits


def pool_size(num_tokens: int, num_remove: int, pool_factor: float) -> int:
    """M = min(N, floor((N - R) * pool_factor)): how many of the most important tokens form the pool."""
    pool = (num_tokens - num_remove) * pool_factor  # may overflow to inf: floor would raise
    return num_tokens if pool >= num_tokens else math.floor(pool)


def importance_partition(
    importance: torch.Tensor,
    num_dst: int,
    num_pool: int,
    key: torch.Tensor | None,
    topk_dst: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Destinations drawn from the pool of the most important tokens.

    Args:
        importance: [U, N] per-token importance.
        num_dst: D, destinations per row.
        num_pool: M >= D, the size of the pool of most important tokens.
        key: 0-d int64 tensor on the map's device keying the uniform draw (unused with topk_dst).
        topk_dst: take the D most important tokens instead of a random draw (ablation).

    Returns:
        dst_idx [U, D] token indices and in_pool [U, N] bool.
    """
    units, num_tokens = importance.shape
    if not num_dst <= num_pool <= num_tokens:
        raise ValueError(f"num_pool={num_pool} must be in [num_dst={num_dst}, N={num_tokens}]")
    pool = importance.topk(num_pool, dim=-1).indices  # [U, M], most important first
    if topk_dst:
        dst_idx = pool[:, :num_dst]
    else:
        if key is None:
            raise ValueError("a random destination draw needs a key")
        draw = random_bits(key, (units, num_pool))  # distinct values: D of M uniformly, no ties
        dst_idx = pool.gather(1, draw.topk(num_dst, dim=-1).indices)
    return dst_idx, _pool_mask(pool, num_tokens)


def importance_pool(importance: torch.Tensor, num_pool: int) -> torch.Tensor:
    """[U, N] bool: the M = num_pool most important tokens of each row of importance [U, N]."""
    # a set: unsorted, top-k skips sorting its M indices (on a GPU, one sort kernel less per plan)
    return _pool_mask(importance.topk(num_pool, dim=-1, sorted=False).indices, importance.shape[1])


def _pool_mask(pool: torch.Tensor, num_tokens: int) -> torch.Tensor:
    in_pool = torch.zeros(pool.shape[0], num_tokens, dtype=torch.bool, device=pool.device)
    return in_pool.scatter_(1, pool, True)


def cell_partition(
    units: int,
    grid: tuple[int, int],
    sy: int,
    sx: int,
    key: torch.Tensor,
) -> torch.Tensor:
    """ToMeSD's partition: one destination at a random position in every full sy x sx cell.

    Tokens in incomplete cells at the bottom and right edges are always sources. `key` is a 0-d int64
    tensor on the device the indices are made on.

    Returns:
        dst_idx [U, (h // sy) * (w // sx)] token indices (row-major on the h x w grid).
    """
    if grid[0] < sy or grid[1] < sx:  # no full cell; and no sy * sx positions in one to make (sx=2**40)
        return torch.empty(units, 0, dtype=torch.long, device=key.device)
    positions = constants.cell_positions(grid, sy, sx, key.device)  # [cells, sy * sx]
    # row-major position inside each cell, [U, cells, 1]
    offset = random_bits(key, (units, positions.shape[0], 1)) % (sy * sx)
    return positions.expand(units, -1, -1).gather(2, offset).squeeze(2)
