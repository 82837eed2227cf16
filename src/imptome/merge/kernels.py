"""The merge's averaging as a Triton kernel, for compiled steps on CUDA (`MergeConfig.merge_kernel`).

Inductor has no lowering for `embedding_bag`, so inside a compiled step the merge would stay ATen's kernel.
Timed alone on an H100, that kernel took 44-60 us per merge at the 1024 px SD2, PixArt-alpha and SD3 shapes,
this one 7.5-9.4 us; inside CUDA-graphed 1024 px steps on an H200, 9-12 us per merge, which made the step
2-5% faster (docs/RESULTS.md). Its launch costs the host more than ATen's, so eager steps, which the host
bounds on a GPU, keep `embedding_bag`.

Importing this module registers the custom operator `torch.ops.imptome.segment_mean` through
`torch.library.triton_op`, which lets torch.compile put the kernel into its graph (and CUDA graphs). It needs
the `triton` package, which PyTorch's CUDA wheels install; `apply_patch` imports it unless
merge_kernel="embedding_bag", and falls back to embedding_bag with the default "auto" where it cannot.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl


@functools.cache
def _segment_mean_kernel() -> Any:
    """The jitted kernel, made on first use: triton.jit reads TRITON_INTERPRET (run on the CPU, for tests)
    when it is applied."""

    @triton.jit
    def segment_mean_kernel(tokens, order, offsets, out, num_rows, num_slots, channels, BLOCK: tl.constexpr):
        # One program per (kept slot, block of channels): the mean of the slot's rows, summed in float32 in
        # `order`, so the result does not depend on scheduling.
        slot = tl.program_id(0).to(tl.int64)  # int64 offsets: B * K * C may pass 2**31
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = columns < channels
        start = tl.load(offsets + slot)
        end = tl.load(offsets + slot + 1, mask=slot + 1 < num_slots, other=num_rows)
        total = tl.full([BLOCK], 0.0, tl.float32)
        position = start
        while position < end:  # a while loop: Triton's interpreter cannot take loaded bounds in range()
            row = tl.load(order + position)
            total += tl.load(tokens + row * channels + columns, mask=inside, other=0.0).to(tl.float32)
            position += 1
        mean = total / (end - start).to(tl.float32)
        tl.store(out + slot * channels + columns, mean.to(out.dtype.element_ty), mask=inside)

    return segment_mean_kernel


@torch.library.triton_op("imptome::segment_mean", mutates_args=())
def segment_mean(tokens: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[M, C] tokens, [M] row indices grouped by slot, [S] where each slot's group starts in `order`
    -> [S, C] group means, what `embedding_bag(order, tokens, offsets, mode="mean")` computes, summed in
    float32 (float64 tokens too) and rounded once to the tokens' dtype. Inference only: no gradient."""
    tokens, order, offsets = tokens.contiguous(), order.contiguous(), offsets.contiguous()
    num_slots, channels = offsets.shape[0], tokens.shape[1]
    out = tokens.new_empty(num_slots, channels)
    block = min(triton.next_power_of_2(channels), 512)
    grid = (num_slots, (channels + block - 1) // block)
    torch.library.wrap_triton(_segment_mean_kernel())[grid](
        tokens, order, offsets, out, order.shape[0], num_slots, channels, BLOCK=block
    )
    return out
