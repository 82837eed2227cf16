"""imptome: importance-based token merging for diffusers pipelines.

import imptome
imptome.apply_patch(pipe, ratio=0.7)     # merge what classifier-free guidance says matters least
image = pipe(prompt).images[0]
imptome.importance_map(pipe)             # [B, h, w] map of the last step
imptome.remove_patch(pipe)               # back to the original model, bit for bit
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from imptome.config import PRESETS, MergeConfig

if TYPE_CHECKING:  # loaded on first use (see __getattr__)
    from imptome import visualize as visualize
    from imptome.patch.api import apply_patch, importance_map, is_patched, merge_plan, remove_patch
    from imptome.patch.state import PlanRecord

# 0.2.0: counter-based random draws (plans traced by torch.compile); plans differ from 0.1.0's.
# 0.3.0: default partition is cell destinations with a pool factor of 1.0 (was the paper's random
# destinations from a pool of 1.4); images made with the defaults differ from 0.2.0's.
# 0.4.0: calls without a CFG map use a random map (fallback="random"; was ToMeSD's partition); images made
# without guidance differ from 0.3.0's, guided ones do not.
# 0.5.0: split CFG (diffusers' guiders and modular pipelines: conditional and unconditional passes as two
# calls) and PAG pipelines with CFG ([uncond, cond, perturbed] batches) get importance instead of the
# fallback; PAG without CFG ([cond, perturbed]) is no longer taken for a CFG batch; one-step generations
# run back to back each start a generation (they used to count as one, so a seed's image depended on
# how many had run before); images of other pipelines do not change.
# 0.6.0: Stable Video Diffusion and SD3 supported; torch.compile(denoiser, fullgraph=True) works; patches
# that would merge nothing are refused at apply_patch; visualize.heatmap_overlay. Images of the pipelines
# supported before do not change.
# 0.6.1: the importance map and the call's key stay at one address (CUDA graphs re-recorded the model every
# step); importance_map() returns a copy; a generation outside torch.inference_mode after one inside it no
# longer fails. Images do not change.
# 0.6.2: `imptome generate --compile MODE`. Images do not change.
# 0.6.3: split CFG under CUDA graphs: the second pass of a pair copies the first pass's plans and output
# (graph memory its own replay overwrote: torch.compile(mode="reduce-overhead") failed on it). Images do not
# change.
# 0.6.4: the denoiser hook waits for the GPU only in the first two calls of a generation: the timestep is
# read from a host copy of the scheduler's timesteps, and the CFG layout of a batch shape is kept once two
# calls in a row agree on it; the second pass of split CFG on the same latent tensor is found without
# comparing values, and a latent tensor written in place between two calls at one timestep is no longer taken
# for a split-CFG pair. Images do not change otherwise.
# 0.6.5: a call stopped by an exception inside a merged layer (Ctrl-C, out of memory) no longer leaves its
# plan for that layer's next unmerged call to apply (a wrong output without an error), nor holds it until the
# patch is removed; a generation without CFG rerun after one cancelled in its first call no longer fails
# (its first call was taken for a split-CFG pass); dependency floors raised to the versions CI runs. Images
# do not change otherwise.
# 0.6.6: a generation whose timesteps live in new memory is a new one (image-to-image after an interrupted
# generation continued it; back-to-back one-step generations without CFG were taken for split-CFG pairs);
# a deep copy of a patched model drives its own state; an attn1 over the text (only_cross_attention) gets no
# proportional-attention mask; a grid with no room for a destination stays unmerged; max_ratio respects the
# cells of warm-up steps with any dst_selection; feed-forward chunking on a merged feed-forward is refused;
# `imptome bench speed` counts operators per step; CLI fixes (demo --out checked first, `generate --guidance`
# defaults to 5 on the bundled model, `bench quality` no longer hangs on one image, `--version`). Images of
# uninterrupted generations do not change.
# 0.6.7: with split CFG and a second-order scheduler (Heun), the second evaluation of each timestep is a pair
# of its own (its passes got different plans, and only the first pair made the map); InstructPix2Pix's
# three copies per image (recognised by the input image's latent channels) share one plan and make the map
# (it was taken for a batch without CFG); proportional attention works with the classic and sliced
# processors on an fp16/bf16 UNet that upcasts its attention; training with gradient checkpointing works;
# a max_downsample that would merge nothing is refused; `import imptome` no longer imports diffusers;
# clearer errors for bad block_range, max_downsample, visualize panels and `bench quality --guidance`.
# Images of other pipelines do not change.
# 0.6.8: a call merges with the map of the call at its place in the step before (MultiDiffusion's panorama:
# its own crop's map, not the crop's before it; Heun with a CFG batch: its own evaluation's); apply_patch
# refuses method="importance" on SEGA, whose 2 + n copies passed for a CFG batch; every subcommand checks its
# input before importing torch (--help and input errors in 0.2 s, not 7 s); `bench quality`'s SSIM averages
# the map the same way with every torchmetrics (1.3 left out the border), and its image cache is keyed by
# prompt text (other prompts with the same --json reused images by index). Images of pipelines with one
# guided call per step do not change.
__version__ = "0.6.8"


# Loaded on first use: importing diffusers (for the patch) or matplotlib (for pictures) takes seconds, which
# `import imptome`, `imptome --version` and `imptome --help` need not wait for.
_LAZY = {
    "apply_patch": "imptome.patch.api",
    "importance_map": "imptome.patch.api",
    "is_patched": "imptome.patch.api",
    "merge_plan": "imptome.patch.api",
    "remove_patch": "imptome.patch.api",
    "PlanRecord": "imptome.patch.state",
}


_SUBPACKAGES = ("visualize", "patch", "merge", "bench", "miniature")


def __getattr__(name: str) -> object:
    if name in _SUBPACKAGES:
        if name == "patch":  # as when the package imported its functions: imptome.patch.api etc. loaded
            importlib.import_module("imptome.patch.api")
        return importlib.import_module(f"imptome.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imptome' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBPACKAGES})


__all__ = [
    "PRESETS",
    "MergeConfig",
    "PlanRecord",
    "__version__",
    "apply_patch",
    "importance_map",
    "is_patched",
    "merge_plan",
    "remove_patch",
]
