"""Planning, merge and unmerge compile with Inductor as one graph and agree with eager mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.utils import counters

from imptome.merge import build_plan, cell_partition, importance_partition, pool_size, pool_to_grid
from imptome.merge.noise import stream_id

GRID, ROWS, CHANNELS, RATIO = (12, 12), 4, 8, 0.7


def merge_round_trip(method: str, importance: torch.Tensor, tokens: torch.Tensor, key: torch.Tensor):
    """Partition, match, plan, merge and unmerge one layer's tokens [B, N, C] (CFG: units = B / 2)."""
    units, num_tokens = importance.shape[0], GRID[0] * GRID[1]
    num_remove = math.floor(num_tokens * RATIO)
    in_pool = None
    if method == "importance":
        pooled = pool_to_grid(importance, GRID)
        num_pool = pool_size(num_tokens, num_remove, 1.4)
        dst, in_pool = importance_partition(pooled, num_tokens // 4, num_pool, key)
    else:
        dst = cell_partition(units, GRID, 2, 2, key)
    plan = build_plan(dst, num_remove, GRID, tokens.shape[0], tokens[units:], in_pool)
    merged = plan.merge(tokens)
    return plan.kept_idx, plan.slot, merged, plan.unmerge(merged * 2)


@pytest.mark.parametrize("method", ["importance", "tome"])
def test_planning_compiles_to_one_graph_and_matches_eager(method):
    """fullgraph=True fails on any graph break (a generator draw, a host sync, an untraceable call)."""
    generator = torch.Generator().manual_seed(0)
    importance = torch.rand(ROWS // 2, *GRID, generator=generator)
    tokens = torch.randn(ROWS, GRID[0] * GRID[1], CHANNELS, generator=generator)
    compiled = torch.compile(merge_round_trip, fullgraph=True, dynamic=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        for call in range(2):  # a new key reuses the graph: it is a tensor, not a constant
            key = torch.tensor(stream_id(0, call))
            want = merge_round_trip(method, importance, tokens, key)
            got = compiled(method, importance, tokens, key)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "other plan than eager"
            torch.testing.assert_close(got[2], want[2])
            torch.testing.assert_close(got[3], want[3])
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
