"""The public verbs: apply_patch, remove_patch, is_patched, importance_map, merge_plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import nn
from torch._dynamo.eval_frame import reset_code
from torch.utils.hooks import RemovableHandle

from imptome.config import PRESETS, MergeConfig, MergeKernel
from imptome.merge import AveragingKernel
from imptome.patch.families import (
    DENOISER_FAMILIES,
    block_downsample,
    check_merged_layers,
    denoiser_info,
    finest_attention_downsample,
    spatial_blocks,
    supported_names,
)
from imptome.patch.hooks import check_mask_support, merged_layers, register_hooks
from imptome.patch.state import PatchState, PlanRecord

T = TypeVar("T")
_ATTR = "_imptome_patch"


@dataclass
class _Patch:
    state: PatchState
    handles: list[RemovableHandle]


# Attributes that lead from a wrapper to the module it wraps: torch.compile's, and the pipelines' own
# (`pipe.unet`, `pipe.transformer`) that custom pipelines reuse for wrappers (Zero123++'s RefOnlyNoisedUNet).
_INNER = ("_orig_mod", "unet", "transformer")
_MAX_WRAPPING = 4


def find_denoiser(target: Any, verb: str = "patch") -> nn.Module:
    """The denoiser of a pipeline (`unet` or `transformer`, looking through wrappers that keep the denoiser
    under one of those names), a supported denoiser itself, or a TypeError saying what cannot be `verb`ed."""
    module, found = target, None
    supported = tuple(DENOISER_FAMILIES)
    for _ in range(_MAX_WRAPPING + 1):
        if isinstance(module, supported):
            return module
        inner = (getattr(module, name, None) for name in _INNER)
        module = next((m for m in inner if isinstance(m, nn.Module)), None)
        if module is None:
            break
        found = module
    if found is not None:  # a pipeline (or wrapper) whose denoiser imptome does not support
        raise TypeError(
            f"imptome cannot {verb} the {type(found).__name__} of this {type(target).__name__}: supported "
            f"denoisers are {supported_names()}"
        )
    raise TypeError(
        f"imptome cannot {verb} {type(target).__name__} objects: pass a diffusers pipeline with a `unet` or "
        f"`transformer`, or one of the supported denoisers: {supported_names()}"
    )


def apply_patch(target: T, config: MergeConfig | None = None, **options: Any) -> T:
    """Merge tokens in `target`'s denoiser from its next call on; returns `target`.

    Args:
        target: a diffusers pipeline or its denoiser (UNet2DConditionModel, UNetMotionModel,
            UNetSpatioTemporalConditionModel, PixArtTransformer2DModel, DiTTransformer2DModel,
            SD3Transformer2DModel).
        config: a MergeConfig; None uses the preset of the denoiser's family.
        **options: MergeConfig fields overriding `config` (e.g. ratio=0.7, method="tome").

    Applying again replaces the previous patch.
    """
    denoiser = find_denoiser(target)
    if config is not None and not isinstance(config, MergeConfig):
        raise TypeError(
            f"config must be an imptome.MergeConfig, got {type(config).__name__}; pass options as keywords "
            "(apply_patch(pipe, ratio=0.5)) or apply_patch(pipe, **options)"
        )
    info = denoiser_info(denoiser)
    if not _NOISE_LAST.isdisjoint(_class_names(target)):
        info = replace(info, noise_last=True)
    config = config if config is not None else PRESETS[info.family]
    if options:
        config = config.replace(**options)
    _check_copies_readable(target, config)
    _check_block_range(denoiser, config.block_range)
    merge_kernel = _merge_kernel(config.merge_kernel)
    finest = finest_attention_downsample(denoiser)
    if config.max_downsample is not None and config.max_downsample < finest:
        raise ValueError(
            f"max_downsample={config.max_downsample} merges nothing in this {type(denoiser).__name__}: its "
            f"finest level with attention is downsampled {finest}x (as SDXL's, whose top level has none); "
            f"use max_downsample >= {finest}, or None to pick that level"
        )
    blocks = spatial_blocks(denoiser)
    layers = merged_layers(blocks, config)
    if not layers:
        raise ValueError(_nothing_to_merge(denoiser, config, has_blocks=bool(blocks)))
    # The layers hooked on levels coarser than max_downsample are never merged (their token count matches no
    # merged grid), so the checks of what a merged layer cannot hold leave them out: SAG's mid block, say.
    max_downsample = config.max_downsample or finest
    merged_here = [
        layer for layer in layers if block_downsample(denoiser, layer.block_name) <= max_downsample
    ]
    merged_modules = {layer.name: layer.module for layer in merged_here}
    feed_forward_blocks = {
        layer.block_name: layer.block for layer in merged_here if layer.name.endswith(".ff")
    }
    check_merged_layers(merged_modules, feed_forward_blocks)
    if config.proportional_attention:
        for layer in layers:
            if layer.self_attention:
                check_mask_support(layer.module, num_kept=None)
    _unhook(denoiser)
    cond_first = info.cond_first if config.cfg_order == "auto" else config.cfg_order == "cond_first"
    state = PatchState(
        config=config,
        info=info,
        cond_first=cond_first,
        max_downsample=max_downsample,
        merge_kernel=merge_kernel,
        merged_modules=merged_modules,
        feed_forward_blocks=feed_forward_blocks,
        attention_modules=[module for module in denoiser.modules() if hasattr(module, "processor")],
    )
    handles = register_hooks(denoiser, layers, state)
    setattr(denoiser, _ATTR, _Patch(state, handles))
    _drop_compiled_code(denoiser)
    return target


def _merge_kernel(requested: MergeKernel) -> AveragingKernel:
    """The kernel that averages merged tokens in compiled CUDA steps (see MergeConfig.merge_kernel). Triton's
    is imported here, which registers its custom operator: with a diffusers pipeline loaded, Triton and
    Inductor are imported already, and this takes milliseconds."""
    if requested == "embedding_bag":
        return requested
    try:
        import imptome.merge.kernels  # noqa: F401
    except ImportError as error:
        if requested == "auto":
            return "embedding_bag"
        raise ValueError(
            "merge_kernel='triton' needs the triton package, which is not installed (PyTorch's CUDA wheels "
            "install it); use merge_kernel='auto' or 'embedding_bag'"
        ) from error
    return "triton"


def _attention_holders(model: nn.Module) -> list[nn.Module]:
    """The blocks that hold `model`'s attention modules: each one's closest ancestor that is no container."""
    modules = dict(model.named_modules())
    holders = []
    for name, module in modules.items():
        if not hasattr(module, "processor") or not name:
            continue
        parent = name
        while True:
            parent = parent.rpartition(".")[0]
            holder = modules[parent]
            if not parent or not isinstance(holder, nn.ModuleList | nn.ModuleDict | nn.Sequential):
                break
        holders.append(holder)
    return holders


def _nothing_to_merge(denoiser: nn.Module, config: MergeConfig, has_blocks: bool) -> str:
    name = type(denoiser).__name__
    if not has_blocks:
        holders = sorted({type(block).__name__ for block in _attention_holders(denoiser)})
        found = f"its attention sits in {', '.join(holders)}" if holders else "it has no attention"
        return (
            f"imptome found nothing to merge in this {name}: it has no transformer blocks over the image "
            f"tokens that imptome knows ({found}). imptome merges those of Stable Diffusion-style UNets "
            "(AnimateDiff and Stable Video Diffusion included), PixArt, DiT and SD3; UNets whose attention "
            "sits in other blocks (SimpleCrossAttn blocks in DeepFloyd IF, Kandinsky and unCLIP, KAttention "
            "blocks in the latent upscaler) are not supported."
        )
    return (
        f"imptome found nothing to merge in this {name}: its transformer blocks have none of the sub-layers "
        f"selected (merge_attn={config.merge_attn}, merge_crossattn={config.merge_crossattn}, "
        f"merge_mlp={config.merge_mlp}, block_range={config.block_range})."
    )


# Pipelines whose batch of copies the map cannot be read from, by class name (their modules, deprecated in
# diffusers, are not imported): why.
_UNREADABLE_COPIES = {
    "SemanticStableDiffusionPipeline": (
        "SEGA sends 2 + n copies of every image (unconditional, conditional, one per editing prompt); with "
        "an even n they pass for the two halves of a CFG batch of more images, and the map would compare "
        "the wrong copies"
    ),
    **dict.fromkeys(
        ("LEditsPPPipelineStableDiffusion", "LEditsPPPipelineStableDiffusionXL"),
        "LEDITS++ sends 1 + n copies of every image (unconditional, one per editing prompt); with an odd n "
        "they pass for the two halves of a CFG batch of more images, and the map would compare the wrong "
        "copies",
    ),
}


# Pipelines that put the noisy latents after the conditioning channels, by class name: the image latents
# come first, torch.cat([image_latent, pred_latent], dim=1).
_NOISE_LAST = {"MarigoldDepthPipeline", "MarigoldNormalsPipeline", "MarigoldIntrinsicsPipeline"}


def _class_names(target: Any) -> list[str]:
    """The names of `target`'s class and its bases, to recognise pipelines (and subclasses of them, e.g.
    community pipelines) without importing their modules."""
    return [cls.__name__ for cls in type(target).__mro__]


def _check_copies_readable(target: Any, config: MergeConfig) -> None:
    """Refuse method="importance" on a pipeline whose copies would be misread (method="tome" reads none)."""
    if config.method != "importance":
        return
    for name in _class_names(target):
        why = _UNREADABLE_COPIES.get(name)
        if why is not None:
            raise ValueError(
                f"imptome: method='importance' does not work with {name}: {why}. Use method='tome' there."
            )


def _check_block_range(denoiser: nn.Module, block_range: tuple[int, int] | None) -> None:
    """block_range indexes a transformer denoiser's blocks; a range past its depth is a mistake."""
    if block_range is None:
        return
    depth = len(getattr(denoiser, "transformer_blocks", ()))
    name = type(denoiser).__name__
    if depth == 0:
        raise ValueError(
            f"block_range={block_range} selects blocks of transformer denoisers (PixArt, DiT, SD3); a {name} "
            "has none: pass block_range=None and choose its merged levels with max_downsample"
        )
    if block_range[1] > depth:
        raise ValueError(
            f"block_range={block_range} is out of range for this {name} with {depth} transformer blocks: "
            f"allowed (first, stop) with 0 <= first < stop <= {depth}, or None for all blocks (the PixArt "
            "preset's (7, 21) is the paper's choice for the 28 blocks of PixArt-alpha/sigma)"
        )


def remove_patch(target: T) -> T:
    """Remove imptome's hooks; the model computes exactly what it did before patching. Returns `target`."""
    denoiser = find_denoiser(target, "unpatch")
    if _unhook(denoiser):
        _drop_compiled_code(denoiser)
    return target


def _unhook(denoiser: nn.Module) -> bool:
    """Remove the hooks of the denoiser's patch, if it has one; returns whether it had."""
    patch = denoiser.__dict__.pop(_ATTR, None)
    if patch is None:
        return False
    for handle in patch.handles:
        handle.remove()
    return True


def _drop_compiled_code(denoiser: nn.Module) -> None:
    """Make torch.compile re-trace the denoiser and its sub-modules at their next call.

    Dynamo does not guard on module hooks (`torch._dynamo.config.skip_nnmodule_hook_guards`): a graph
    compiled before patching would go on running without imptome's hooks, and one compiled while patched
    keeps them inlined. Dropping the compiled code of every class in the denoiser (for all of that class's
    instances in the process; `torch.compile(unet)` and regional compilation of its blocks alike) makes the
    patch take effect, or its removal, at the cost of one recompilation.
    """
    for cls in {type(module) for module in denoiser.modules()}:
        code = getattr(cls.forward, "__code__", None)
        if code is not None:
            reset_code(code)


def patch_state(target: Any) -> PatchState | None:
    """The live state of the patch on `target` (a pipeline or a denoiser), or None when it is not patched.

    For imptome's own tools (the benchmarks set it mid-generation); users read it through `importance_map`
    and `merge_plan`. A TypeError when `target` holds no denoiser imptome could patch.
    """
    patch = find_denoiser(target, "inspect").__dict__.get(_ATTR)
    return None if patch is None else patch.state


def is_patched(target: Any) -> bool:
    """Whether `target` (a pipeline or a denoiser) carries an imptome patch; False for anything else."""
    try:
        return patch_state(target) is not None
    except TypeError:  # no denoiser imptome could patch, so no patch
        return False


def _patched_state(target: Any, function: str) -> PatchState:
    state = patch_state(target)
    if state is None:
        raise ValueError(
            f"imptome.{function}: this {type(target).__name__} is not patched, so there is nothing to "
            "inspect; call imptome.apply_patch on it first (imptome.is_patched tells)"
        )
    return state


def importance_map(target: Any) -> torch.Tensor | None:
    """The latest CFG importance map, float32 [U, H, W] on the latent grid, or None.

    U is the number of images (for video: images x frames); each merged layer area-pools it to its own token
    grid (PixArt/DiT: H / patch x W / patch). None before the first guided call of a generation (throughout a
    generation without CFG); calls without CFG keep the last guided map. A copy: editing it leaves the maps
    the patch merges with as they are. A ValueError when `target` is not patched.
    """
    importance = _patched_state(target, "importance_map").importance
    return None if importance is None else importance.clone()


def merge_plan(target: Any) -> list[PlanRecord]:
    """The plans used in the last denoiser call, one per token grid (per merged block with
    plan_scope="layer"); empty before the first call or when that call merged nothing. A ValueError when
    `target` is not patched."""
    return _patched_state(target, "merge_plan").records()
