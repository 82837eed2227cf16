"""Properties of the pure merge algorithm on random tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from imptome.bench.operators import OperatorCounter
from imptome.merge import (
    DESTINATION,
    INDEPENDENT,
    MERGED,
    build_plan,
    cell_partition,
    importance_partition,
    importance_pool,
    pool_size,
    pool_to_grid,
)
from imptome.merge.noise import stream_id

from .reference import reference_plan


@st.composite
def layer_cases(draw):
    h = draw(st.integers(2, 9))
    w = draw(st.integers(2, 9))
    units = draw(st.integers(1, 3))
    cfg = draw(st.booleans())
    ratio = draw(st.floats(0.0, 0.75))
    pool_factor = draw(st.floats(1.0, 2.0))
    seed = draw(st.integers(0, 2**16))
    return h, w, units, cfg, ratio, pool_factor, seed


def _importance_plan(h, w, units, cfg, ratio, pool_factor, seed, chunk=1 << 24, **options):
    gen = torch.Generator().manual_seed(seed)
    n = h * w
    num_remove = math.floor(n * ratio)
    num_dst = math.floor(n * 0.25)
    num_pool = pool_size(n, num_remove, pool_factor)
    importance = torch.rand(units, n, generator=gen)
    features = torch.randn(units, n, 6, generator=gen)
    dst_idx, in_pool = importance_partition(importance, num_dst, num_pool, torch.tensor(stream_id(seed)))
    rows = 2 * units if cfg else units
    plan = build_plan(dst_idx, num_remove, (h, w), rows, features, in_pool, chunk_entries=chunk, **options)
    return plan, importance, features, dst_idx, in_pool, num_remove, num_pool


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_importance_plan_counts_and_groups(case):
    h, w, units, cfg, ratio, pool_factor, seed = case
    n = h * w
    plan, importance, _, dst_idx, in_pool, num_remove, num_pool = _importance_plan(*case)
    num_dst = math.floor(n * 0.25)
    assert num_pool == min(n, math.floor((n - num_remove) * pool_factor))
    assert num_pool >= n - num_remove
    assert in_pool.sum(1).tolist() == [num_pool] * units
    # the pool is the num_pool most important tokens
    threshold = importance.topk(num_pool, dim=1).values[:, -1:]
    assert bool((importance[in_pool.logical_not()] <= threshold.expand_as(importance)[~in_pool]).all())
    roles = plan.roles
    assert (roles == DESTINATION).sum(1).tolist() == [num_dst] * units
    assert (roles == MERGED).sum(1).tolist() == [num_remove] * units
    assert (roles == INDEPENDENT).sum(1).tolist() == [n - num_remove - num_dst] * units
    # destinations come from the pool; every unimportant token is merged
    assert bool(in_pool.gather(1, dst_idx).all())
    assert bool((roles[~in_pool] == MERGED).all())
    # every token belongs to exactly one kept slot, and each kept token to its own slot
    assert plan.num_kept == n - num_remove
    slot = plan.slot[:units]
    assert bool(((slot >= 0) & (slot < plan.num_kept)).all())
    assert bool((slot.gather(1, plan.kept_idx) == torch.arange(plan.num_kept)).all())
    # merged tokens point at destinations only
    receiver_roles = roles.gather(1, plan.source()[:units])
    assert bool((receiver_roles[roles == MERGED] == DESTINATION).all())


@settings(max_examples=40, deadline=None)
@given(layer_cases())
def test_fast_plan_matches_reference(case):
    h, w, units, cfg, ratio, pool_factor, seed = case
    plan, _, features, dst_idx, in_pool, num_remove, _ = _importance_plan(*case)
    source = plan.source()
    for u in range(units):
        receiver, roles = reference_plan(features[u], dst_idx[u].tolist(), num_remove, in_pool[u].tolist())
        assert source[u].tolist() == receiver
        assert plan.roles[u].tolist() == roles


@settings(max_examples=30, deadline=None)
@given(layer_cases())
def test_merge_unmerge(case):
    h, w, units, cfg, ratio, pool_factor, seed = case
    plan, *_ = _importance_plan(*case)
    rows = plan.rows
    x = torch.randn(rows, h * w, 5, generator=torch.Generator().manual_seed(seed + 1))
    merged = plan.merge(x)
    assert merged.shape == (rows, plan.num_kept, 5)
    # each kept slot is the mean of the tokens that map to it
    for b in range(rows):
        for k in range(plan.num_kept):
            members = (plan.slot[b] == k).nonzero().flatten()
            torch.testing.assert_close(merged[b, k], x[b, members].mean(0))
    restored = plan.unmerge(merged)
    counts = torch.zeros(rows, plan.num_kept).scatter_add_(1, plan.slot, torch.ones(rows, h * w))
    singles = counts.gather(1, plan.slot) == 1  # tokens alone in their slot
    assert bool((plan.roles.repeat(rows // units, 1)[singles] != MERGED).all())
    torch.testing.assert_close(restored[singles], x[singles], rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(layer_cases(), st.booleans())
def test_proportional_attention_equals_attention_over_all_tokens(case, average):
    """With log(group size) added to each kept key, attention over the K kept tokens equals attention over
    all N tokens with every token replaced by its slot's token (the unmerged sequence)."""
    h, w, units, cfg, ratio, pool_factor, seed = case
    plan, *_ = _importance_plan(*case, proportional=True, average=average)
    rows, num_tokens = plan.slot.shape
    sizes = torch.zeros(rows, plan.num_kept).scatter_add_(1, plan.slot, torch.ones(rows, num_tokens))
    torch.testing.assert_close(plan.key_bias.view(rows, -1), sizes.log(), rtol=0, atol=0)
    x = torch.randn(rows, num_tokens, 8, generator=torch.Generator().manual_seed(seed + 1))
    merged = plan.merge(x)
    expanded = plan.unmerge(merged)  # [B, N, C]: slot k repeated sizes[k] times
    proportional = F.scaled_dot_product_attention(merged, merged, merged, attn_mask=plan.key_bias)
    full = F.scaled_dot_product_attention(merged, expanded, expanded)
    torch.testing.assert_close(proportional, full, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(layer_cases())
def test_chunked_similarity_is_identical(case):
    full, *_ = _importance_plan(*case)
    chunked, *_ = _importance_plan(*case, chunk=7)
    assert torch.equal(full.slot, chunked.slot)
    assert torch.equal(full.kept_idx, chunked.kept_idx)


def test_pruning_copies_destination_without_averaging():
    plan, *_ = _importance_plan(6, 5, 2, True, 0.6, 1.4, 3)
    pruned = build_plan(plan.kept_idx[:, :7], 18, (6, 5), 4, torch.randn(2, 30, 4), average=False)
    x = torch.randn(4, 30, 3)
    kept = pruned.kept_idx.repeat(2, 1)
    assert torch.equal(pruned.merge(x), x.gather(1, kept.unsqueeze(-1).expand(-1, -1, 3)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_dtype(dtype):
    plan, *_ = _importance_plan(8, 6, 2, True, 0.7, 1.4, 0)
    x = torch.randn(4, 48, 8, dtype=dtype)
    merged = plan.merge(x)
    assert merged.dtype == dtype
    assert plan.unmerge(merged).dtype == dtype
    torch.testing.assert_close(merged.float(), plan.merge(x.float()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", ["zero destination", "norm past 65504"])
def test_float16_features_match_as_float32_ones_do(case):
    """Cosine matching of float16 features: normalized in float16, a zero token's similarities were NaN (eps
    1e-12 is 0 in float16), which max() takes, so every source matched a zero destination; and a norm past
    float16's 65504 was inf, which made every similarity 0. Both match as the same values in float32 do."""
    grid, generator = (4, 4), torch.Generator().manual_seed(0)
    dst = cell_partition(1, grid, 2, 2, torch.tensor(stream_id(1)))
    features = torch.randn(1, 16, 320, generator=generator)
    if case == "zero destination":
        features[0, dst[0, 0]] = 0
    else:
        features *= 5000  # norms 8e4 to 1e5, entries within float16's range
    features = features.half().float()  # the same values in both
    want = build_plan(dst, 8, grid, 2, features)
    got = build_plan(dst, 8, grid, 2, features.half())
    assert torch.equal(got.flat_slot, want.flat_slot) and torch.equal(got.kept_idx, want.kept_idx)


def test_float16_merge_on_the_cpu_does_not_overflow_in_its_sums():
    """ATen's CPU embedding_bag keeps a bag's sum in float16 before dividing: a group whose sum passes 65504
    averaged to inf (CUDA's and the Triton kernel sum in float32). Now the float32 mean, rounded once."""
    plan, *_ = _importance_plan(8, 6, 1, True, 0.7, 1.4, 0)
    assert int(torch.bincount(plan.unit_slot[0]).max()) >= 3  # 3 * 30000 > 65504
    x = torch.full((2, 48, 8), 30000.0).half()
    assert torch.equal(plan.merge(x), torch.full((2, plan.num_kept, 8), 30000.0).half())
    x = torch.randn(2, 48, 8, generator=torch.Generator().manual_seed(1)).half()
    assert torch.equal(plan.merge(x), plan.merge(x.float()).half())


def test_topk_destinations_are_the_most_important():
    importance = torch.rand(3, 40)
    dst_idx, _ = importance_partition(importance, 10, 20, None, topk_dst=True)
    expected = importance.topk(10, dim=1).indices
    assert torch.equal(dst_idx.sort(1).values, expected.sort(1).values)


@pytest.mark.parametrize("num_pool", [9, 41])
def test_a_pool_that_cannot_hold_the_destinations_is_a_clear_error(num_pool):
    with pytest.raises(ValueError, match=rf"num_pool={num_pool} must be in \[num_dst=10, N=40\]"):
        importance_partition(torch.rand(3, 40), 10, num_pool, torch.tensor(0))


@pytest.mark.parametrize("pool_factor", [1e308, math.inf])
def test_a_pool_factor_too_large_for_a_float_product_pools_every_token(pool_factor):
    """MergeConfig takes any finite pool_factor >= 1; (N - R) * 1e308 overflows to inf, whose floor raised an
    OverflowError at the first plan."""
    assert pool_size(100, 50, pool_factor) == 100
    assert pool_size(100, 50, 1.4) == 70 and pool_size(100, 50, 2.0) == 100 and pool_size(100, 90, 1.0) == 10


def test_importance_pool_marks_the_most_important_tokens():
    importance = torch.rand(3, 40)
    in_pool = importance_pool(importance, 12)
    assert in_pool.shape == (3, 40) and torch.equal(in_pool.sum(1), torch.full((3,), 12))
    pooled, others = importance[in_pool].view(3, 12), importance[~in_pool].view(3, 28)
    assert bool((pooled.min(1).values > others.max(1).values).all())


@pytest.mark.parametrize("num_tokens, num_pool", [(40, 12), (4096, 1229), (16384, 4916)])
def test_importance_pool_among_ties_is_the_sorted_top_k_set(num_tokens, num_pool):
    """The pool (an unsorted top-k since 0.8.0) holds the same tokens as 0.7's sorted top-k, also where
    tied values straddle the pool's edge (the SD2 and PixArt-alpha 1024 px sizes at ratio 0.7)."""
    generator = torch.Generator().manual_seed(num_tokens)
    for importance in (
        torch.randint(0, 4, (2, num_tokens), generator=generator).float(),
        torch.randint(0, 9, (2, num_tokens), generator=generator),  # int64 ranking keys
    ):
        sorted_top_k = importance.topk(num_pool, dim=-1).indices
        want = torch.zeros(2, num_tokens, dtype=torch.bool).scatter_(1, sorted_top_k, True)
        assert torch.equal(importance_pool(importance, num_pool), want)


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (9, 2), (3, 3)])
def test_cell_partition_one_destination_per_full_cell(grid):
    h, w = grid
    dst = cell_partition(2, grid, 2, 2, torch.tensor(stream_id(0)))
    assert dst.shape == (2, (h // 2) * (w // 2))  # one per whole 2x2 cell
    cells = sorted((int(i) // w // 2, int(i) % w // 2) for i in dst[0])
    assert cells == [(cy, cx) for cy in range(h // 2) for cx in range(w // 2)]


@pytest.mark.parametrize("sx", [2**62, 10**30])
def test_cells_larger_than_the_grid_give_no_destination(sx):
    """MergeConfig takes any cell size; one wider than the grid has no full cell, so no destination (no merge
    on that grid). It made the sy * sx positions of one cell first: out of memory, or an overflow error."""
    assert cell_partition(2, (8, 8), 2, sx, torch.tensor(stream_id(0))).shape == (2, 0)
    assert cell_partition(2, (8, 8), sx, 2, torch.tensor(stream_id(0))).shape == (2, 0)


def test_grid_matching_picks_nearest_destination():
    dst = torch.tensor([[0, 15]])  # corners of a 4x4 grid
    plan = build_plan(dst, 14, (4, 4), 1, metric=None)
    source = plan.source()[0]
    assert source[1].item() == 0 and source[14].item() == 15  # neighbours go to their own corner


@pytest.mark.parametrize("matching", ["feature", "grid"])
def test_a_plan_with_every_token_a_destination_is_the_identity(matching):
    """D = N leaves no source (so R = 0): a valid plan, whose matching of no source failed in torch.cat."""
    metric = torch.randn(1, 6, 4) if matching == "feature" else None
    plan = build_plan(torch.tensor([[4, 1, 0, 5, 2, 3]]), 0, (2, 3), 2, metric, proportional=True)
    x = torch.randn(2, 6, 3)
    assert plan.num_kept == 6 and torch.equal(plan.unmerge(plan.merge(x)), x)
    assert torch.equal(plan.key_bias, torch.zeros(2, 1, 6))


def test_plan_rejects_too_many_removals():
    with pytest.raises(ValueError, match="num_remove"):
        build_plan(torch.tensor([[0, 1]]), 3, (2, 2), 1, torch.randn(1, 4, 2))


@pytest.mark.parametrize("average", [True, False])
def test_merge_and_unmerge_are_one_operator_each(average):
    """On a GPU every operator is a kernel launch issued by the host, often the bottleneck of a large step:
    merge (averaging or pruning) and unmerge must stay a single operator each."""
    gen = torch.Generator().manual_seed(0)
    grid, rows = (8, 8), 2
    dst = cell_partition(1, grid, 2, 2, torch.tensor(stream_id(0)))
    plan = build_plan(dst, 30, grid, rows, metric=torch.randn(1, 64, 16, generator=gen), average=average)
    x = torch.randn(rows, 64, 16, generator=gen)
    with OperatorCounter() as merge_ops:
        merged = plan.merge(x)
    with OperatorCounter() as unmerge_ops:
        plan.unmerge(merged)
    (merge_op,) = merge_ops.names.elements()
    assert merge_op.startswith("_embedding_bag") if average else merge_op == "index_select"
    assert list(unmerge_ops.names.elements()) == ["index_select"]


@pytest.mark.parametrize(("dst_selection", "budget"), [("cells", 40), ("random", 40)])
def test_one_importance_plan_stays_within_its_operator_budget(dst_selection, budget):
    """Planning runs once per step and grid; on a GPU its operators are launches on a host-bound step.
    Partition + matching + plan with one similarity chunk, views not counted, in a steady step (the index
    tensors that depend on sizes only are made once): 40 tensor operators with destinations drawn from the
    pool (the paper's) or in ToMeSD's cells (the default), 11 of them the counter-based draw (which
    torch.compile can trace and fuse, unlike a generator's). 0.8.2 needed 45 and 51: it made those index
    tensors at every plan. A change that needs more should say why."""
    gen = torch.Generator().manual_seed(0)
    key = torch.tensor(stream_id(0))
    grid, rows, num_tokens = (32, 32), 2, 1024
    num_remove = math.floor(num_tokens * 0.7)
    importance = pool_to_grid(torch.rand(1, *grid, generator=gen), grid)
    features = torch.randn(1, num_tokens, 16, generator=gen)

    def plan() -> None:
        if dst_selection == "cells":
            dst = cell_partition(1, grid, 2, 2, key)
            pool = importance_pool(importance, pool_size(num_tokens, num_remove, 1.0))
        else:
            dst, pool = importance_partition(
                importance, num_tokens // 4, pool_size(num_tokens, num_remove, 1.4), key
            )
        build_plan(dst, num_remove, grid, rows, metric=features, in_pool=pool, chunk_entries=1 << 26)

    plan()
    with OperatorCounter() as ops:
        plan()
    assert ops.total <= budget, f"{ops.total}: {ops.names}"
