"""Real-size denoiser architectures for the speed benchmark, from config dicts written here (no download).

Each entry mirrors the published ``config.json`` of a real checkpoint; `imptome.bench.denoisers` builds it
with random weights (speed does not depend on their values). This module is plain data, so that the command
line can name the architectures without importing torch. Parameter counts, built on the meta device:

| name             | model                    | params        | config follows                          |
| ---------------- | ------------------------ | ------------- | --------------------------------------- |
| ``sd15``         | UNet2DConditionModel     | 859,520,964   | SD 1.5 ``unet``                         |
| ``sd2``          | UNet2DConditionModel     | 865,910,724   | SD 2.1 (768-v) ``unet``                 |
| ``sdxl``         | UNet2DConditionModel     | 2,567,463,684 | SDXL base 1.0 ``unet``                  |
| ``pixart-alpha`` | PixArtTransformer2DModel | 611,349,152   | PixArt-XL-2-1024-MS ``transformer``     |
| ``animatediff``  | UNetMotionModel          | 1,312,730,244 | SD 1.5 ``unet`` + motion adapter v1-5-2 |
| ``svd``          | UNetSpatioTemporal...    | 1,524,623,082 | Stable Video Diffusion ``unet``         |
| ``sd3``          | SD3Transformer2DModel    | 2,028,328,000 | SD3 Medium ``transformer``              |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["ARCHS", "ArchSpec"]

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": _SD_DOWN,
    "up_block_types": _SD_UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # diffusers' legacy name: 8 heads at every level
}

SD2_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "attention_head_dim": (5, 10, 20, 20),  # heads per level, 64 channels each
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids x 256
}

PIXART_ALPHA_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,  # 1024 px; 128 also switches on resolution / aspect-ratio conditioning
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,  # 4 noise + 4 variance
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "dropout": 0.0,
    "upcast_attention": False,
}

MOTION_ADAPTER_V152: dict[str, Any] = {
    "block_out_channels": (320, 640, 1280, 1280),
    "motion_layers_per_block": 2,
    "motion_mid_block_layers_per_block": 1,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
    "conv_in_channels": None,
}


# Stable Video Diffusion (img2vid and img2vid-xt share the UNet): diffusers' defaults for the class.
SVD_UNET: dict[str, Any] = {
    "sample_size": 96,
    "in_channels": 8,  # 4 noisy latents + 4 latents of the conditioning image
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    "up_block_types": ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 768,  # fps, motion bucket, noise augmentation x 256
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "num_attention_heads": (5, 10, 20, 20),
    "num_frames": 25,
}


SD3_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL width; the CLIP-L + CLIP-G hidden states are padded to it
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,  # pooled CLIP-L (768) + CLIP-G (1280)
    "pos_embed_max_size": 192,
}


_PATCH_TRANSFORMERS = ("pixart", "sd3")  # model kinds that cut the latent into patch_size^2 patches


@dataclass(frozen=True)
class ArchSpec:
    """One benchmark architecture and the conditioning its pipeline sends to the denoiser.

    ``config`` builds the ``model_kind``'s diffusers model (for ``animatediff`` the SD 1.5 UNet, combined with
    ``adapter_config`` by ``UNetMotionModel.from_unet2d``). ``text_seq_len`` x ``text_embed_dim`` is the
    per-sample ``encoder_hidden_states``; ``pooled_embed_dim`` SDXL's ``text_embeds``. The configs are checked
    against the released models' parameter counts (tests/bench/test_archs.py).
    """

    name: str
    # which diffusers model and conditioning: "sd" | "sdxl" | "pixart" | "animatediff" | "svd" | "sd3" (not
    # the preset family imptome patches it with, `DenoiserInfo.family`)
    model_kind: str
    config: dict[str, Any]
    resolutions: tuple[int, ...]  # default square image sizes in px
    text_seq_len: int
    text_embed_dim: int
    pooled_embed_dim: int | None = None
    num_frames: int | None = None
    adapter_config: dict[str, Any] | None = None
    vae_scale_factor: int = 8
    latent_channels: int = 4

    def latent_hw(self, res: int | tuple[int, int]) -> tuple[int, int]:
        """Latent (height, width) for an image of ``res`` px (an int is square)."""
        height, width = (res, res) if isinstance(res, int) else res
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"{self.name}: {height}x{width} px is not a multiple of {self.vae_scale_factor}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side: the patch transformers' (PixArt, SD3) patch size, 1 for UNets."""
        return self.config["patch_size"] if self.model_kind in _PATCH_TRANSFORMERS else 1

    def top_level_tokens(self, res: int | tuple[int, int]) -> int:
        """Image tokens seen by the highest-resolution attention (per frame for video).

        UNets: the grid of the first down block with attention, each block before it halving the latent grid
        (SD 1.x/2.x attend at the full latent grid, SDXL from its 2x downsampled second block, as
        `finest_attention_downsample` finds on a built model). PixArt, SD3: one token per ``patch_size``^2
        latent patch.
        """
        h, w = self.latent_hw(res)
        if self.model_kind in _PATCH_TRANSFORMERS:
            return (h // self.patch_size) * (w // self.patch_size)
        for block in self.config["down_block_types"]:
            if "Attn" in block:
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)  # a stride-2 convolution, padded
        return h * w


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        # Stable Diffusion 1.5 UNet; CLIP ViT-L/14 text encoder (77 x 768).
        ArchSpec(
            name="sd15",
            model_kind="sd",
            config=SD15_UNET,
            resolutions=(512, 768, 1024),
            text_seq_len=77,
            text_embed_dim=768,
        ),
        # Stable Diffusion 2.x UNet (2.0/2.1, base and 768-v share it); OpenCLIP ViT-H (77 x 1024).
        ArchSpec(
            name="sd2",
            model_kind="sd",
            config=SD2_UNET,
            resolutions=(512, 768, 1024),
            text_seq_len=77,
            text_embed_dim=1024,
        ),
        # SDXL base 1.0 UNet; no attention at the full-resolution level; CLIP-L + OpenCLIP bigG.
        ArchSpec(
            name="sdxl",
            model_kind="sdxl",
            config=SDXL_UNET,
            resolutions=(1024,),
            text_seq_len=77,
            text_embed_dim=2048,
            pooled_embed_dim=1280,
        ),
        # PixArt-alpha XL/2 (1024-MS): 28 blocks, 1152 wide; T5-XXL text (120 x 4096) with a mask.
        ArchSpec(
            name="pixart-alpha",
            model_kind="pixart",
            config=PIXART_ALPHA_TRANSFORMER,
            resolutions=(512, 1024),
            text_seq_len=120,
            text_embed_dim=4096,
        ),
        # SD 1.5 UNet + AnimateDiff motion adapter v1-5-2 (motion modules at every level and mid).
        ArchSpec(
            name="animatediff",
            model_kind="animatediff",
            config=SD15_UNET,
            adapter_config=MOTION_ADAPTER_V152,
            resolutions=(512,),
            num_frames=16,
            text_seq_len=77,
            text_embed_dim=768,
        ),
        # Stable Video Diffusion UNet (spatial + temporal blocks at 3 levels); CLIP image embeds.
        ArchSpec(
            name="svd",
            model_kind="svd",
            config=SVD_UNET,
            resolutions=(512, 768),  # 768 px square: the 9216 tokens per frame of SVD's native 576 x 1024
            num_frames=14,
            text_seq_len=1,  # one CLIP image embedding
            text_embed_dim=1024,
        ),
        # SD3 Medium MMDiT: 24 joint blocks, 1536 wide, patch 2; CLIP-L/G + T5-XXL text: 333 x 4096
        ArchSpec(
            name="sd3",
            model_kind="sd3",
            config=SD3_MEDIUM_TRANSFORMER,
            resolutions=(1024,),
            text_seq_len=77 + 256,  # CLIP tokens, then T5's
            text_embed_dim=4096,
            pooled_embed_dim=2048,
            latent_channels=16,
        ),
    )
}
