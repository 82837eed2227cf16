"""Model families: which denoisers are supported, and where their mergeable transformer blocks are."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    Transformer2DModel,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel
from torch import nn

# Denoiser class -> family name (a key of imptome.config.PRESETS).
DENOISER_FAMILIES: dict[type[nn.Module], str] = {
    UNet2DConditionModel: "unet",
    UNetMotionModel: "unet",
    UNetSpatioTemporalConditionModel: "unet",
    PixArtTransformer2DModel: "pixart",
    DiTTransformer2DModel: "dit",
    SD3Transformer2DModel: "sd3",
}

# Modules whose `transformer_blocks` attend over the 2-D token grid. Temporal attention (AnimateDiff's
# motion modules, class AnimateDiffTransformer3D) uses the same block class with frames as tokens, so blocks
# are found through their spatial container, never by their own class. Stable Video Diffusion's container
# holds both kinds: spatial `transformer_blocks`, and `temporal_transformer_blocks`, which stay unmerged.
SPATIAL_CONTAINERS: tuple[type[nn.Module], ...] = (
    Transformer2DModel,
    PixArtTransformer2DModel,
    DiTTransformer2DModel,
    TransformerSpatioTemporalModel,
    SD3Transformer2DModel,
)


def supported_names() -> str:
    return ", ".join(cls.__name__ for cls in DENOISER_FAMILIES)


@dataclass(frozen=True)
class DenoiserInfo:
    """What the hooks need to know about a denoiser.

    family: preset name; patch_size: latent pixels per token side (1 for UNets); noise_channels: latent
    channels, the leading ones of the output (the rest is a learned variance) and of the input (noisy
    latents; the rest is conditioning the pipeline concatenates, e.g. inpainting masks); cond_first: default
    CFG batch order; channel_dim: the channel dimension of the sample, 1 ([B, C, H, W], AnimateDiff's
    [B, C, F, H, W]) or 2 (Stable Video Diffusion's [B, F, C, H, W]); a 5-D sample's frames are in the other;
    noise_last: the noisy latents are the input's last channels, after the conditioning (Marigold).
    """

    family: str
    patch_size: int
    noise_channels: int
    cond_first: bool
    channel_dim: int = 1
    noise_last: bool = False

    def frames(self, sample: torch.Tensor) -> int:
        """Frames in a sample: the spatial layers see batch x frames rows."""
        return sample.shape[3 - self.channel_dim] if sample.ndim == 5 else 1

    def latents(self, sample: torch.Tensor) -> torch.Tensor:
        """The noisy latents of a sample, without the conditioning channels concatenated to them."""
        channels = sample.shape[self.channel_dim]
        noise = min(self.noise_channels, channels)
        return sample.narrow(self.channel_dim, channels - noise if self.noise_last else 0, noise)

    def conditioning(self, sample: torch.Tensor) -> torch.Tensor:
        """The channels of a sample that are not its noisy latents (none: an empty tensor)."""
        channels = sample.shape[self.channel_dim]
        noise = min(self.noise_channels, channels)
        return sample.narrow(self.channel_dim, 0 if self.noise_last else noise, channels - noise)


def denoiser_info(denoiser: nn.Module) -> DenoiserInfo:
    family = next((name for cls, name in DENOISER_FAMILIES.items() if isinstance(denoiser, cls)), None)
    if family is None:
        raise TypeError(
            f"imptome cannot patch {type(denoiser).__name__} objects; supported denoisers: "
            f"{supported_names()} (or a diffusers pipeline that has one as `unet` or `transformer`)"
        )
    config: Any = denoiser.config  # diffusers' FrozenDict (nn.Module's attributes type it as a tensor)
    in_channels = config.in_channels
    out_channels = config.get("out_channels") or in_channels
    noise_channels = in_channels if out_channels == 2 * in_channels else out_channels
    patch_size = 1 if family == "unet" else (config.get("patch_size") or 1)
    channel_dim = 2 if isinstance(denoiser, UNetSpatioTemporalConditionModel) else 1
    return DenoiserInfo(family, patch_size, noise_channels, family == "dit", channel_dim)


@dataclass(frozen=True)
class BlockSite:
    """A transformer block on the spatial token grid: `index` counts blocks in its container.

    `joint` marks SD3's MMDiT blocks: attention `attn` over text and image tokens together, and in SD3.5's
    dual-attention blocks an image self-attention `attn2`; other blocks have self-attention `attn1` and
    cross-attention `attn2`.
    """

    name: str
    index: int
    block: nn.Module
    in_transformer_denoiser: bool
    joint: bool = False


def spatial_blocks(denoiser: nn.Module) -> list[BlockSite]:
    """Every transformer block that attends over image tokens, in module order."""
    sites = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, SPATIAL_CONTAINERS):
            continue
        for index, block in enumerate(getattr(module, "transformer_blocks", ())):
            joint = isinstance(block, JointTransformerBlock)
            if joint or hasattr(block, "attn1"):
                prefix = f"{name}." if name else ""
                site_name = f"{prefix}transformer_blocks.{index}"
                sites.append(BlockSite(site_name, index, block, module is denoiser, joint))
    return sites


def _level_downsample(levels: int, container: str, index: int) -> int:
    """Downsampling factor of a UNet with `levels` down blocks at block `index` of `container`: down block i
    runs at 2**i, up block i at 2**(levels - 1 - i) (its attentions run before its upsampler), the mid block
    at the coarsest level."""
    if container == "down_blocks":
        return 2**index
    if container == "up_blocks":
        return 2 ** (levels - 1 - index)
    return 2 ** max(levels - 1, 0)


def finest_attention_downsample(denoiser: nn.Module) -> int:
    """Downsampling factor of the highest-resolution UNet level with attention (1 for transformers)."""
    levels = len(getattr(denoiser, "down_blocks", ()))
    with_attention = [
        _level_downsample(levels, container, index)
        for container in ("down_blocks", "up_blocks")
        for index, block in enumerate(getattr(denoiser, container, ()))
        if getattr(block, "attentions", None)
    ]
    return min(with_attention, default=_level_downsample(levels, "mid_block", 0))


def block_downsample(denoiser: nn.Module, block_name: str) -> int:
    """Downsampling factor of the UNet level a block (a `spatial_blocks` name) runs at; 1 in transformer
    denoisers, which have one grid."""
    container, _, rest = block_name.partition(".")
    if container not in ("down_blocks", "up_blocks", "mid_block"):
        return 1
    index = 0 if container == "mid_block" else int(rest.split(".", 1)[0])
    return _level_downsample(len(getattr(denoiser, "down_blocks", ())), container, index)


def check_merged_layers(merged: dict[str, nn.Module], feed_forward_blocks: dict[str, nn.Module]) -> None:
    """Refuse what would make merging the layers go wrong: `check_no_output_cache`,
    `check_no_attention_store` and `check_no_chunked_feed_forward`. Run at patching and at every generation's
    start (pipelines set them on the model after patching, in their call)."""
    check_no_output_cache(merged)
    check_no_attention_store(merged)
    check_no_chunked_feed_forward(feed_forward_blocks)


# Processors that keep a layer's attention probabilities for their pipeline to read over the layer's full
# token grid, by class name: (pipeline, whether they store cross-attention maps only). Attend-and-Excite and
# Pix2Pix-Zero install theirs on every attention of the UNet, self-attention included, where they store
# nothing (Attend-and-Excite keeps the maps of calls with text, Pix2Pix-Zero those of its attn2 processors).
_ATTENTION_STORES = {
    "CrossAttnStoreProcessor": ("self-attention guidance (StableDiffusionSAGPipeline)", False),
    "AttendExciteAttnProcessor": ("Attend-and-Excite", True),
    "LEDITSCrossAttnProcessor": ("LEDITS++", True),
    "Pix2PixZeroAttnProcessor": ("Pix2Pix-Zero", True),
}


def check_no_attention_store(merged: dict[str, nn.Module]) -> None:
    """Refuse processors that store a merged layer's attention maps for their pipeline: the maps would cover
    the kept tokens only, and the pipeline, reading them over the token grid, fails deep inside diffusers
    (SAG, Attend-and-Excite, LEDITS++) or compares maps of different tokens (Pix2Pix-Zero). Processors that
    store cross-attention maps only are left alone on self-attention, which they do not store."""
    for name, module in merged.items():
        processor = processor_name(module)
        if processor not in _ATTENTION_STORES:
            continue
        pipeline, cross_attention_only = _ATTENTION_STORES[processor]
        if cross_attention_only and not getattr(module, "is_cross_attention", True):
            continue
        raise ValueError(
            f"imptome merges the tokens entering {name}, and {processor} ({pipeline}) "
            "stores that layer's attention maps for the pipeline, which reads them over every token. "
            "Leave the layer unmerged: merge_crossattn=False for cross-attention maps (Attend-and-"
            "Excite, LEDITS++, Pix2Pix-Zero), and a max_downsample below the mid block's for self-"
            "attention guidance."
        )


def check_no_chunked_feed_forward(blocks: dict[str, nn.Module]) -> None:
    """Refuse diffusers' feed-forward chunking in blocks whose feed-forward imptome merges (merge_mlp=True).

    `set_chunk_feed_forward` / `enable_forward_chunking` call the feed-forward on slices of the tokens or
    of the batch, so its merge would see a slice: a slice of tokens looks like a coarser grid and would be
    merged with that grid's plan, a wrong image without any error.
    """
    for name, block in blocks.items():
        if getattr(block, "_chunk_size", None) is not None:
            raise ValueError(
                f"imptome merges the tokens entering {name}.ff (merge_mlp=True), and that block's "
                f"feed-forward is chunked (chunk size {block._chunk_size} along dim {block._chunk_dim}), so "
                "it sees slices of the tokens or the batch that cannot be merged. Merging already shrinks "
                "the feed-forward's input: turn chunking off (disable_forward_chunking() on the models that "
                "have it, set_chunk_feed_forward(None) on the blocks) or use merge_mlp=False."
            )


def check_no_output_cache(merged: dict[str, nn.Module]) -> None:
    """Refuse diffusers hooks that keep a merged layer's output between calls.

    Pyramid Attention Broadcast, FasterCache and TaylorSeer (with patterns that match them) hook
    attention modules (`module._diffusers_hook`) and hand back an output cached in an earlier call. In a
    merged layer that output is in the earlier call's merged token order, and the current plan would unmerge
    it into the wrong tokens: a wrong image without any error. Caches of whole blocks see unmerged tokens.
    """
    for name, module in merged.items():
        for part_name, part in module.named_modules(prefix=name):
            hooks = getattr(getattr(part, "_diffusers_hook", None), "hooks", {})
            stateful = [
                type(hook).__name__ for hook in hooks.values() if getattr(hook, "_is_stateful", False)
            ]
            if stateful:
                raise ValueError(
                    f"imptome merges the tokens entering {name}, and diffusers' {', '.join(stateful)} on "
                    f"{part_name} reuses outputs of earlier calls: they are in another step's merged token "
                    "order, so the image would come out wrong. Caches of whole blocks see unmerged tokens "
                    "and work with imptome (MagCache, DeepCache). Keep attention caches off the layers "
                    "imptome merges (e.g. Pyramid Attention Broadcast on cross-attention only: "
                    "spatial_attention_block_skip_range=None), or leave those layers unmerged (merge_attn, "
                    "merge_crossattn, merge_mlp, block_range)."
                )


def processor_name(attention: nn.Module) -> str:
    """Class name of an attention module's diffusers processor ("NoneType" when it has none)."""
    return type(getattr(attention, "processor", None)).__name__


def scores_in_float32(attention: nn.Module) -> bool:
    """Whether the attention adds its mask to float32 scores whatever the tokens' dtype: diffusers'
    `Attention.get_attention_scores` (used by the classic and sliced processors, not by SDPA's) upcasts the
    queries and keys of a module built with `upcast_attention=True` (SD 2.1's UNet) and adds the mask to
    their product, which must then have the same dtype."""
    processor_class: type = type(getattr(attention, "processor", None))
    return getattr(attention, "upcast_attention", False) and _calls_get_attention_scores(processor_class)


@functools.cache
def _calls_get_attention_scores(processor_class: type) -> bool:
    call = next((vars(cls)["__call__"] for cls in processor_class.__mro__ if "__call__" in vars(cls)), None)
    code = getattr(call, "__code__", None)  # None without a processor (NoneType)
    return code is not None and "get_attention_scores" in code.co_names


def perturbed_attention_layout(attention_modules: list[nn.Module]) -> str | None:
    """How diffusers' perturbed-attention guidance (PAG) pipelines lay out the denoiser batch, read from the
    processors they install for the generation: "cfg" for [uncond, cond, perturbed] (a `PAGCFG*` processor),
    "plain" for [cond, perturbed] (PAG without CFG), None when no PAG processor is set."""
    names = [processor_name(module) for module in attention_modules]
    if any(name.startswith("PAGCFG") for name in names):
        return "cfg"
    if any(name.startswith("PAG") for name in names):
        return "plain"
    return None
