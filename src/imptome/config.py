"""`MergeConfig`: every option of imptome in one dataclass, with per-family presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

Method = Literal["importance", "tome"]
CfgOrder = Literal["auto", "uncond_first", "cond_first"]
Matching = Literal["feature", "grid"]
MatchRows = Literal["cond", "each"]
DstSelection = Literal["random", "topk", "cells"]
PlanScope = Literal["step", "layer"]
Fallback = Literal["auto", "random", "tome"]
MergeKernel = Literal["auto", "triton", "embedding_bag"]


@dataclass(frozen=True)
class MergeConfig:
    """How and where tokens are merged. Defaults follow the paper's Stable Diffusion setting except where
    the README's "Defaults that differ from the paper" says otherwise (ratio, destination placement and
    pool size, merged levels, planning scope, calls without CFG, which CFG half is matched on);
    `MergeConfig(dst_selection="random", pool_factor=1.4, ratio=0.7)` is the paper's SD partition.

    Merge amount
        ratio: fraction R/N of each merged layer's N tokens that are removed before attention.
            Allowed: 0 <= ratio <= max_ratio (see `max_ratio`); 0 disables merging exactly.
        method: "importance" (keep what CFG says matters) or "tome" (ToMeSD's random sx x sy cells).

    Importance partition (method="importance")
        dst_fraction: destinations D = floor(N * dst_fraction) (paper: 0.25).
        pool_factor: the pool holds the M = min(N, floor((N - R) * pool_factor)) most important tokens
            (paper: 1.4 for SD UNets, 1.0 for PixArt; default 1.0: the pool is as large as the kept set).
            Must be >= 1 so the pool can hold every kept token.
        dst_selection: "cells" (default) places one destination at a random position in every sx x sy
            cell, as ToMeSD does, and keeps the pool's role: sources outside it are always merged, so
            importance decides which other tokens stay independent (D is then the number of cells;
            dst_fraction is not used). "random" draws the destinations uniformly from the pool (paper);
            "topk" takes the D most important tokens (an ablation). On the bundled model "cells" with
            pool_factor 1.0 beat ToMeSD's fidelity at ratios 0.3 and 0.5 and tied it at 0.7 (a shuffled map
            did as well there), while "random" packed the destinations onto the objects and lost to ToMeSD
            at 0.7 (docs/RESULTS.md, Quality).

        fallback: what importance merging does, after the warm-up, on a denoiser call without a usable
            CFG map (guidance_scale <= 1, a CFG cut-off, a distilled model, an auxiliary pass such as
            Zero123++'s reference image). "random": the same partition with a random map in place of the
            importance map, so the pool (and with it the independent tokens) is a random set of N - R
            tokens. "tome": ToMeSD's partition, the R most similar sources merged (0.3.0's behaviour).
            "auto" (default): "random", or "tome" with proportional_attention. On the bundled model
            without guidance, a random map was 0.9-4.6 dB closer to the unmerged images than ToMeSD's
            partition planned per block without proportional attention (the 0.9 dB at ratio 0.7 within its
            interval), and 0.2-1.6 dB further with it (docs/RESULTS.md, "Without guidance");
            `fallback_partition` is the resolved choice.

    ToMeSD partition (method="tome", and every warm-up step)
        sx, sy: cell size; one destination per cell at a random position.

    Schedule (importance only; step = index of the timestep within one generation: denoiser calls at the
    same timestep, such as Zero123++'s reference pass before the main pass, share one step)
        importance_start_step: steps before it use the random cell partition (no map exists at step 0;
            with 0, step 0 merges as a call without CFG does, see `fallback`).
        merge_start_step: steps before it *prune* (removed tokens receive their destination's output
            but are not averaged into it); from it on they are merged (averaged). Paper: SD 2 / 2,
            PixArt-alpha 1 / 4.

    Layers
        max_downsample: merge only layers whose token grid is the latent grid downsampled by at most
            this factor (1 = highest resolution only, ToMeSD's default). None (default) picks the finest
            level that has attention: 1 on SD 1.x/2.x (the same as ToMeSD), 2 on SDXL, whose top level has
            no attention, so ToMeSD's 1 would merge nothing there (apply_patch refuses a factor below
            the finest level with attention). Transformers have one grid.
        block_range: (first, stop) transformer-block indices to merge in transformer denoisers
            (PixArt/DiT/SD3), stop exclusive; None merges all blocks. Indices are absolute, not scaled to the
            model's depth: the PixArt preset's (7, 21) is the paper's blocks 7-20 of the 28 that every
            PixArt-alpha/sigma checkpoint has. apply_patch rejects a range past the model's depth and any
            range on a UNet.
        merge_attn / merge_crossattn / merge_mlp: which sub-layers of a transformer block are merged. In
            SD3's blocks merge_attn selects the image tokens of the joint attention (and of SD3.5's image
            self-attention); they have no cross-attention, so merge_crossattn changes nothing there.
        matching: "feature" matches sources to destinations by cosine similarity of the layer's tokens;
            "grid" by distance on the token grid (the authors' PixArt code; on the bundled model it took
            images 1.6-3.8 dB further from the unmerged ones, beyond the intervals at ratios 0.3 and 0.5,
            and lowered SSIM by 0.12-0.14 at every ratio, docs/RESULTS.md).
        match_rows: whose tokens feature matching reads under CFG. "cond" (default): the conditional
            half's, one plan shared by both halves of an image (half the matching work). "each": every
            denoiser row is matched on its own tokens, as the paper and ToMeSD do; the partition and the
            importance pool stay shared by the two halves. Calls without CFG match each row either way.
        proportional_attention: in merged self-attention layers, add log(group size) to each kept key's
            logit (ToMe's proportional attention; ToMeSD and the paper leave it out), so that attention over
            the K kept tokens equals attention over all N tokens with each replaced by its group's mean. On
            the bundled model it brought merged images 4-9 dB closer to the unmerged ones than ToMeSD. Off by
            default: an additive mask keeps SDPA from its flash kernels, which cost 3-8% of the merged step
            on an H100. Refused with processors whose keys are not the kept tokens (Zero123++'s
            reference-only attention, Text2Video-Zero) or that cannot take the mask (see README,
            Limitations); a call given keys of its own (`encoder_hidden_states`, the community
            reference-only pipelines' attn1) attends to them unmerged, without a mask.

    Runtime
        plan_scope: "step" computes one plan per token grid per denoiser call and reuses it in every
            layer of that grid (fast, default); "layer" plans at every block (ToMeSD / paper behaviour).
        cfg_order: which half of the CFG batch is conditional. "auto" takes it from the denoiser:
            [cond, uncond] for DiT, [uncond, cond] otherwise. The importance magnitude does not depend on
            it; it selects the conditional half whose features drive matching.
        seed: keys imptome's own random draws (never the global RNG), a non-negative int. Draws are
            counter-based: a plan's draws depend on the seed, the denoiser call within the generation, the
            grid (with plan_scope="layer": the block's position among the merged blocks) and the image's row
            in the batch, and are the same on every device.
        similarity_chunk: upper bound on similarity-matrix entries held at once per plan (bounds memory
            at large token counts). The default, 2**26 (128 MB in half precision), computes SD2's 1024 px
            top level (12288 sources x 4096 destinations) in one piece: fewer launches on a GPU.
        merge_kernel: what averages the merged tokens while torch.compile traces a step on CUDA. "auto"
            (default): imptome's Triton kernel (`imptome.merge.kernels`; float32 sums in a fixed order,
            deterministic as embedding_bag is) where the triton package imports (PyTorch's CUDA wheels
            install it), else ATen's `embedding_bag(mode="mean")`. "triton": the Triton kernel, an error
            without triton. "embedding_bag": ATen's kernel always (the default up to 0.7). Eager steps, CPU
            tokens and training (tokens that need a gradient) use embedding_bag whatever the choice: in
            eager mode its launch costs the host less. On an H200 under CUDA graphs the Triton kernel made
            the compiled 1024 px step 2-5% faster than embedding_bag (docs/RESULTS.md).
    """

    ratio: float = 0.5
    method: Method = "importance"
    dst_fraction: float = 0.25
    pool_factor: float = 1.0
    dst_selection: DstSelection = "cells"
    sx: int = 2
    sy: int = 2
    importance_start_step: int = 2
    merge_start_step: int = 2
    max_downsample: int | None = None
    block_range: tuple[int, int] | None = None
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    matching: Matching = "feature"
    match_rows: MatchRows = "cond"
    proportional_attention: bool = False
    fallback: Fallback = "auto"
    plan_scope: PlanScope = "step"
    cfg_order: CfgOrder = "auto"
    seed: int = 0
    similarity_chunk: int = 1 << 26
    merge_kernel: MergeKernel = "auto"

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")
        for name in ("sx", "sy", "importance_start_step", "merge_start_step", "similarity_chunk"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name}={value!r} must be an int")
        for name in ("ratio", "dst_fraction", "pool_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(f"{name}={value!r} must be a number")
        for name in ("merge_attn", "merge_crossattn", "merge_mlp", "proportional_attention"):
            if not isinstance(getattr(self, name), bool):  # "no" would otherwise count as True
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        # Plain Python numbers from here on: a NumPy scalar (np.int8(2), np.int32(seed)) passes the checks
        # above but wraps around in the products and hashes that use it (a cell size of np.int8 overflowed
        # in the partition; a seed of np.int32 failed at the first denoiser call with an OverflowError).
        for name in ("sx", "sy", "importance_start_step", "merge_start_step", "similarity_chunk"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("ratio", "dst_fraction", "pool_factor"):
            object.__setattr__(self, name, _as_float(getattr(self, name)))
        if not 0.0 < self.dst_fraction <= 0.5:
            raise ValueError(f"dst_fraction={self.dst_fraction} must be in (0, 0.5]")
        if not (self.pool_factor >= 1.0 and math.isfinite(self.pool_factor)):  # also rejects NaN
            raise ValueError(
                f"pool_factor={self.pool_factor} must be a finite number >= 1 (the pool holds every kept "
                "token)"
            )
        if self.sx < 1 or self.sy < 1 or self.sx * self.sy < 2:
            raise ValueError(f"sx={self.sx}, sy={self.sy}: cells must hold at least 2 tokens")
        downsample = self.max_downsample
        if downsample is not None:
            if not (_is_int(downsample) and downsample in (1, 2, 4, 8)):
                raise ValueError(f"max_downsample={downsample!r} must be None (auto) or one of 1, 2, 4, 8")
            object.__setattr__(self, "max_downsample", int(downsample))
        if self.importance_start_step < 0 or self.merge_start_step < 0:
            raise ValueError(
                f"importance_start_step={self.importance_start_step} and merge_start_step="
                f"{self.merge_start_step} must both be >= 0"
            )
        if self.block_range is not None:
            pair = self.block_range
            if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(map(_is_int, pair))):
                raise ValueError(
                    f"block_range={pair!r} must be None or a pair of ints (first, stop), 0 <= first < stop"
                )
            first, stop = pair
            if not 0 <= first < stop:
                raise ValueError(f"block_range={pair} must be (first, stop), 0 <= first < stop")
            object.__setattr__(self, "block_range", (int(first), int(stop)))  # a list would be unhashable
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError("at least one of merge_attn, merge_crossattn, merge_mlp must be True")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative int")
        object.__setattr__(self, "seed", int(self.seed))
        if self.similarity_chunk < 1:
            raise ValueError(f"similarity_chunk={self.similarity_chunk} must be >= 1")
        if not 0.0 <= self.ratio <= self.max_ratio:
            cells = f"{self.sx}x{self.sy} cells"
            if self.max_ratio < 1.0 - 1.0 / (self.sx * self.sy):
                cells = f"dst_selection={self.dst_selection!r}, dst_fraction={self.dst_fraction:g}"
            raise ValueError(
                f"ratio={self.ratio} is out of range: allowed 0 <= ratio <= {self.max_ratio:g} for "
                f"method={self.method!r} with {cells} (at most N - D tokens can be removed, D = destinations)"
            )

    @property
    def max_ratio(self) -> float:
        """Largest allowed ratio: every destination must survive, so R <= N - D. The cells' bound holds for
        every method: steps before `importance_start_step` and calls that fall back to ToMeSD's partition
        use cells, whatever `dst_selection` says."""
        cells = 1.0 - 1.0 / (self.sx * self.sy)
        if self.method == "tome" or self.dst_selection == "cells":
            return cells
        return min(cells, 1.0 - self.dst_fraction)

    @property
    def fallback_partition(self) -> Literal["random", "tome"]:
        """`fallback` with "auto" resolved: "tome" with proportional attention, "random" without."""
        if self.fallback != "auto":
            return self.fallback
        return "tome" if self.proportional_attention else "random"

    def replace(self, **changes: Any) -> MergeConfig:
        """A copy with some fields changed; unknown names raise a TypeError listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise TypeError(f"unknown MergeConfig option(s) {unknown}; valid options: {sorted(valid)}")
        return dataclasses.replace(self, **changes)


def _as_float(value: float) -> float:
    """`value` as a Python float; an int too large for one is infinite (and then refused as out of range)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _is_int(value: object) -> bool:
    """An integer that is not a bool (True would otherwise pass for 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The allowed values of every Literal-typed field, in the order its type lists them (checked on construction).
_CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(hint) for name, hint in get_type_hints(MergeConfig).items() if get_origin(hint) is Literal
}

# Transformers without a published setting (DiT, SD3 / SD3.5): PixArt's warm-up, on every block.
_UNPUBLISHED_TRANSFORMER = MergeConfig(ratio=0.5, importance_start_step=1, merge_start_step=4)

PRESETS: dict[str, MergeConfig] = {
    # Stable Diffusion 1.x / 2.x / XL UNets (paper: 50 DDIM steps, ratio 0.7, importance from step 2), and the
    # video UNets built on them (AnimateDiff, Stable Video Diffusion), merged per frame.
    "unet": MergeConfig(),
    # PixArt-alpha/sigma (paper: 1024 px, 20 steps, ratio 0.5, blocks 7-20 of 28, self+cross attention,
    # random pruning at step 0, importance pruning on steps 1-3, importance merging from step 4; pool factor
    # 1.0 as here; the paper draws destinations from the pool, this preset keeps the default 2x2 cells).
    "pixart": MergeConfig(
        ratio=0.5,
        importance_start_step=1,
        merge_start_step=4,
        block_range=(7, 21),
        merge_crossattn=True,
    ),
    "dit": _UNPUBLISHED_TRANSFORMER,
    # SD3 / SD3.5 (MMDiT): image tokens of every block's joint attention (and SD3.5's image self-attention).
    "sd3": _UNPUBLISHED_TRANSFORMER,
}
