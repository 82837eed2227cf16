"""Matching sources to destinations, the resulting merge plan, and merge / unmerge.

Shapes: U plan units (one per image, or per video frame; one per row when every row is matched on its own
tokens, `match_rows="each"`), B denoiser rows (2U under CFG when both halves of a sample share one plan), N
tokens, D destinations, R removed tokens, K = N - R kept tokens, C channels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from imptome.merge import constants

MERGED, DESTINATION, INDEPENDENT = 0, 1, 2
# What averages merged tokens in a compiled CUDA step: MergeConfig.merge_kernel as apply_patch resolved it.
AveragingKernel = Literal["embedding_bag", "triton"]


@dataclass(frozen=True, kw_only=True)
class MergePlan:
    """Index tensors that take N tokens to K kept tokens and back.

    Attributes:
        kept_idx: [U, K] token index of each kept slot; slots 0..D-1 are destinations, the rest
            independent tokens.
        unit_slot: [U, N] kept slot whose attention output each token of a unit receives (`slot` has it
            per denoiser row).
        rows: B, the denoiser rows the plan is applied to (row b uses unit b % U).
        num_dst: D, the number of destination slots.
        grid: (h, w) token grid, N = h * w.
        flat_slot: [B * N] `slot` as rows of the flattened [B * K, C] kept tokens (b * K + slot[b, n]).
        flat_kept: [B * K] the kept tokens as rows of the flattened [B * N, C] input (b * N + kept token)
            when removed tokens are pruned (dropped before attention, not averaged), else None.
        bag_order: [B * N] rows of the flattened input sorted by slot, or None when pruning.
        bag_offsets: [B * K] where each slot's rows start in `bag_order` (None when pruning).
        key_bias: [B, 1, K] log of how many tokens each kept slot stands for, in the dtype of the tokens
            it is for (an SDPA mask of another dtype than the queries is refused by the memory-efficient
            kernel and misread by cuDNN's, pytorch/pytorch#191612), to add to the self-attention logits
            (proportional attention), or None.

    merge is one `embedding_bag(mode="mean")` over the flattened rows (a single kernel with no atomics, so
    deterministic), or inside torch.compile on CUDA optionally imptome's Triton kernel (`merge.kernels`),
    and unmerge one row `index_select`: few launches matter on a GPU, where a large model's step is often
    bound by the host issuing kernels.
    """

    kept_idx: torch.Tensor
    unit_slot: torch.Tensor
    rows: int
    num_dst: int
    grid: tuple[int, int]
    flat_slot: torch.Tensor
    flat_kept: torch.Tensor | None
    bag_order: torch.Tensor | None
    bag_offsets: torch.Tensor | None
    key_bias: torch.Tensor | None = None

    @property
    def pruned(self) -> bool:
        return self.bag_order is None

    @property
    def num_kept(self) -> int:
        return self.kept_idx.shape[1]

    @property
    def slot(self) -> torch.Tensor:
        """[B, N] kept slot whose attention output each token receives, made on request."""
        return self.unit_slot.repeat(self.rows // self.unit_slot.shape[0], 1)

    @property
    def roles(self) -> torch.Tensor:
        """[U, N] int8: MERGED (0), DESTINATION (1) or INDEPENDENT (2). Made on request (for inspection and
        pictures), not while planning."""
        units, num_tokens = self.unit_slot.shape
        roles = torch.full((units, num_tokens), MERGED, dtype=torch.int8, device=self.kept_idx.device)
        roles.scatter_(1, self.kept_idx[:, : self.num_dst], DESTINATION)
        return roles.scatter_(1, self.kept_idx[:, self.num_dst :], INDEPENDENT)

    def clone(self) -> MergePlan:
        """The same plan in new memory (e.g. to keep it past a CUDA graph replay that reuses its memory)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        clones: dict[str, Any] = {k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        return replace(self, **clones)

    def merge(self, x: torch.Tensor, kernel: AveragingKernel = "embedding_bag") -> torch.Tensor:
        """[B, N, C] -> [B, K, C]: each kept slot is the mean of its tokens (or just itself when pruning).

        kernel="triton" averages with imptome's Triton kernel where it pays, while torch.compile traces
        CUDA tokens that need no gradient (`imptome.merge.kernels`, which must have been imported;
        apply_patch does that); elsewhere it is `embedding_bag` too (over float32 copies of float16 CPU
        tokens, whose sums the CPU kernel would keep in float16).
        """
        rows, num_tokens, channels = x.shape
        if (rows, num_tokens) != (self.rows, self.unit_slot.shape[1]):  # [2B, N / 2] has the same size
            num_tokens = self.unit_slot.shape[1]
            raise ValueError(f"this plan is for {(self.rows, num_tokens)} tokens, got {tuple(x.shape[:2])}")
        tokens = x.reshape(rows * num_tokens, channels)
        if self.bag_order is None:
            assert self.flat_kept is not None  # pruning keeps rows of the input
            return tokens.index_select(0, self.flat_kept).view(rows, self.num_kept, channels)
        if (
            kernel == "triton"
            and tokens.is_cuda
            and not tokens.requires_grad
            and torch.compiler.is_compiling()
        ):
            merged = torch.ops.imptome.segment_mean(tokens, self.bag_order, self.bag_offsets)
        elif tokens.dtype == torch.float16 and tokens.device.type == "cpu":
            # ATen's CPU kernel keeps a bag's sum in the tokens' dtype before dividing: past 65504, inf
            merged = F.embedding_bag(self.bag_order, tokens.float(), self.bag_offsets, mode="mean").half()
        else:
            merged = F.embedding_bag(self.bag_order, tokens, self.bag_offsets, mode="mean")
        return merged.view(rows, self.num_kept, channels)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, K, C] -> [B, N, C]: every token receives the output of its slot (one row gather)."""
        rows, num_kept, channels = y.shape
        if (rows, num_kept) != (self.rows, self.num_kept):  # a gather would read other rows' slots, or fail
            raise ValueError(
                f"this plan is for {(self.rows, self.num_kept)} kept tokens, got {tuple(y.shape[:2])}"
            )
        return y.reshape(rows * num_kept, channels).index_select(0, self.flat_slot).view(rows, -1, channels)

    def source(self) -> torch.Tensor:
        """[B, N] token index of the kept token whose output each token receives."""
        return self.kept_idx.gather(1, self.unit_slot).repeat(self.rows // self.unit_slot.shape[0], 1)


def _best_destination(
    metric: torch.Tensor | None,
    grid: tuple[int, int],
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    chunk_entries: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each source, its most similar destination: (score [U, S], destination position [U, S]).

    metric [U, N, C] selects cosine similarity of features; None selects (negative squared) distance on
    the token grid. The [U, S, D] similarity is computed in chunks of sources to bound memory.
    """
    units, num_src = src_idx.shape
    num_dst = dst_idx.shape[1]
    if metric is None:
        width = grid[1]
        dst_y, dst_x = (dst_idx // width).float(), (dst_idx % width).float()
    else:
        if metric.dtype == torch.float16:
            # in float16 a norm past 65504 is inf (every similarity 0) and normalize's eps of 1e-12 is 0 (a
            # zero token's similarities NaN, which max() takes: every source matched to a zero destination)
            metric = F.normalize(metric.float(), dim=-1).half()
        else:
            metric = F.normalize(metric, dim=-1)
        dst_feat = metric.gather(1, dst_idx.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
    step = max(1, chunk_entries // max(1, units * num_dst))
    scores, best = [], []
    for start in range(0, max(1, num_src), step):  # one empty chunk when every token is a destination
        idx = src_idx[:, start : start + step]
        if metric is None:
            dy = (idx // width).float().unsqueeze(-1) - dst_y.unsqueeze(1)
            dx = (idx % width).float().unsqueeze(-1) - dst_x.unsqueeze(1)
            sim = -(dy * dy + dx * dx)
        else:
            src_feat = metric.gather(1, idx.unsqueeze(-1).expand(-1, -1, metric.shape[-1]))
            sim = src_feat @ dst_feat.transpose(1, 2)
        value, position = sim.max(dim=-1)
        scores.append(value.float())
        best.append(position)
    if len(scores) == 1:  # one chunk (the usual case): no copies
        return scores[0], best[0]
    return torch.cat(scores, dim=1), torch.cat(best, dim=1)


def build_plan(
    dst_idx: torch.Tensor,
    num_remove: int,
    grid: tuple[int, int],
    rows: int,
    metric: torch.Tensor | None = None,
    in_pool: torch.Tensor | None = None,
    average: bool = True,
    chunk_entries: int = 1 << 26,
    proportional: bool = False,
    bias_dtype: torch.dtype = torch.float32,
) -> MergePlan:
    """Match every source to a destination and choose the R sources to remove.

    Args:
        dst_idx: [U, D] distinct destination token indices (from a partition), U >= 1, D >= 1.
        num_remove: R, tokens removed per row; R <= N - D.
        grid: (h, w) token grid.
        rows: B, denoiser rows the plan is applied to; a multiple of U (row b uses unit b % U).
        metric: [U, N, C] token features for cosine matching, or None to match by grid distance.
        in_pool: [U, N] bool, the important tokens. Sources outside the pool are always removed; the rest of
            the R removals go to the pool sources most similar to their destination. None: no pool
            (ToMeSD: the R most similar sources).
        average: merge removed tokens into their destination (True) or prune them (False).
        chunk_entries: upper bound on similarity entries computed at once.
        proportional: also make `key_bias`, the log group sizes that turn attention over the K kept tokens
            into attention over all N tokens with each token replaced by its slot's mean (ToMe's
            proportional attention).
        bias_dtype: dtype of `key_bias`, that of the attention's inputs (cast once here, not per layer).
    """
    units, num_dst = dst_idx.shape
    num_tokens = grid[0] * grid[1]
    if units < 1 or num_dst < 1:  # no destination: the matching's max would fail inside torch
        raise ValueError(f"dst_idx {list(dst_idx.shape)} must hold at least one unit and one destination")
    if not 0 <= num_remove <= num_tokens - num_dst:
        raise ValueError(f"num_remove={num_remove} must be in [0, N - D = {num_tokens - num_dst}]")
    if rows % units:
        raise ValueError(f"rows={rows} is not a multiple of the plan's units={units}")
    for name, given in (("metric", metric), ("in_pool", in_pool)):  # larger ones would be read in part
        if given is not None and tuple(given.shape[:2]) != (units, num_tokens):
            raise ValueError(f"{name} {list(given.shape)} must start with [U, N] = {[units, num_tokens]}")
    device = dst_idx.device

    is_dst = torch.zeros(units, num_tokens, dtype=torch.uint8, device=device).scatter_(1, dst_idx, 1)
    src_idx = is_dst.argsort(dim=1, stable=True)[:, : num_tokens - num_dst]  # [U, N - D]

    score, best = _best_destination(metric, grid, src_idx, dst_idx, chunk_entries)
    if in_pool is not None:
        score = torch.where(in_pool.gather(1, src_idx), score, float("inf"))
    order = score.argsort(dim=1, descending=True, stable=True)
    removed_pos, independent_pos = order[:, :num_remove], order[:, num_remove:]
    removed_idx = src_idx.gather(1, removed_pos)
    kept_idx = torch.cat([dst_idx, src_idx.gather(1, independent_pos)], dim=1)  # [U, K]
    num_kept = kept_idx.shape[1]

    # Few operators: on a GPU each is a launch, and a merged step is bound by the host. So the index tensors
    # that depend on sizes only are shared constants, and rows get their offsets by broadcasting.
    slot = torch.empty(units, num_tokens, dtype=torch.long, device=device)
    slot.scatter_(1, kept_idx, constants.arange(num_kept, device).expand(units, -1))
    slot.scatter_(1, removed_idx, best.gather(1, removed_pos))

    copies = rows // units  # [copies, U, 1]: b * K for row b = c * U + u
    first_slot = constants.arange(rows * num_kept, device, step=num_kept).view(copies, units, 1)
    flat_slot = (slot + first_slot).flatten()
    flat_kept = bag_order = bag_offsets = key_bias = None
    if not average:  # pruning keeps rows of the input; averaging reads them through bag_order
        first_token = constants.arange(rows * num_tokens, device, step=num_tokens).view(copies, units, 1)
        flat_kept = (kept_idx + first_token).flatten()
    if average or proportional:  # every slot holds at least its own kept token, so no bag is empty
        sorted_slot, order = flat_slot.sort(stable=True)
        slots = constants.arange(rows * num_kept, device)
        starts = torch.searchsorted(sorted_slot, slots)
        if average:
            bag_order, bag_offsets = order, starts
        if proportional:  # group sizes from the sorted slots: no atomics, so deterministic on every device
            sizes = torch.searchsorted(sorted_slot, slots, right=True) - starts
            key_bias = sizes.float().log().to(bias_dtype).view(rows, 1, num_kept)
    return MergePlan(
        kept_idx=kept_idx,
        unit_slot=slot,
        rows=rows,
        num_dst=num_dst,
        grid=grid,
        flat_slot=flat_slot,
        flat_kept=flat_kept,
        bag_order=bag_order,
        bag_offsets=bag_offsets,
        key_bias=key_bias,
    )
