"""imptome's Triton merge kernel (merge_kernel="triton"), run in Triton's interpreter on the CPU.

On CUDA under torch.compile, tests/patch/test_cuda.py checks it inside compiled steps.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from imptome.merge.noise import stream_id
from imptome.merge.partition import importance_partition, pool_size
from imptome.merge.plan import build_plan

pytest.importorskip("triton")
from imptome.merge import kernels  # noqa: E402 (needs triton)


@pytest.fixture
def interpreted(monkeypatch):
    """Triton kernels made while this runs execute on the CPU (TRITON_INTERPRET is read by triton.jit)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels._segment_mean_kernel.cache_clear()
    yield
    kernels._segment_mean_kernel.cache_clear()


def _plan(grid, units, ratio, seed):
    """An importance plan for a CFG batch (2 * units rows) with random importance and features."""
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    num_remove = math.floor(n * ratio)
    importance = torch.rand(units, n, generator=gen)
    features = torch.randn(units, n, 6, generator=gen)
    dst_idx, in_pool = importance_partition(
        importance, n // 4, pool_size(n, num_remove, 1.0), torch.tensor(stream_id(seed))
    )
    return build_plan(dst_idx, num_remove, grid, 2 * units, features, in_pool)


# 600 channels take two blocks of 512, the second one partly masked; 40 take one block of 64
@pytest.mark.parametrize("channels", [40, 600])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_segment_mean_equals_embedding_bag(interpreted, channels, ratio):
    plan = _plan((8, 12), units=2, ratio=ratio, seed=3)
    tokens = torch.randn(plan.flat_slot.numel(), channels, generator=torch.Generator().manual_seed(4))
    got = kernels.segment_mean(tokens, plan.bag_order, plan.bag_offsets)
    want = F.embedding_bag(plan.bag_order, tokens, plan.bag_offsets, mode="mean")
    assert got.shape == (plan.slot.shape[0] * plan.num_kept, channels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_segment_mean_sums_half_precision_in_float32(interpreted):
    """fp16 tokens: the kernel sums in float32 and rounds once, so it is as close to a float64 mean as
    fp16 allows, and keeps the tokens' dtype."""
    plan = _plan((8, 8), units=1, ratio=0.7, seed=5)
    tokens = torch.randn(plan.flat_slot.numel(), 24, generator=torch.Generator().manual_seed(6)).half()
    got = kernels.segment_mean(tokens, plan.bag_order, plan.bag_offsets)
    exact = F.embedding_bag(plan.bag_order, tokens.double(), plan.bag_offsets, mode="mean")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.double(), exact, rtol=0, atol=float(exact.abs().max()) * 2**-10)


def test_the_triton_kernel_is_used_only_while_compiling_cuda_tokens(interpreted, monkeypatch):
    """merge(kernel="triton") in eager mode or on CPU tokens is embedding_bag: its launch costs the host
    less. (On CUDA under torch.compile the kernel runs: tests/patch/test_cuda.py.)"""
    plan = _plan((8, 8), units=1, ratio=0.5, seed=7)
    x = torch.randn(plan.slot.shape[0], 64, 16, generator=torch.Generator().manual_seed(8))
    calls = []
    monkeypatch.setattr(
        torch.ops.imptome, "segment_mean", lambda *args: calls.append(args) or F.embedding_bag(*args)
    )
    torch.testing.assert_close(plan.merge(x, "triton"), plan.merge(x), rtol=0, atol=0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plan.merge(x, "triton")  # compiling, but CPU tokens
    assert calls == []
