"""Real-size denoiser architectures for the speed benchmark, from config dicts written here (no download).

Each entry mirrors the published ``config.json`` of a real checkpoint; weights are random (speed does not
depend on their values). Parameter counts, built on the meta device:

| name             | model                    | params        | config follows                          |
| ---------------- | ------------------------ | ------------- | --------------------------------------- |
| ``sd15``         | UNet2DConditionModel     | 859,520,964   | SD 1.5 ``unet``                         |
| ``sd2``          | UNet2DConditionModel     | 865,910,724   | SD 2.1 (768-v) ``unet``                 |
| ``sdxl``         | UNet2DConditionModel     | 2,567,463,684 | SDXL base 1.0 ``unet``                  |
| ``pixart-alpha`` | PixArtTransformer2DModel | 611,349,152   | PixArt-XL-2-1024-MS ``transformer``     |
| ``animatediff``  | UNetMotionModel          | 1,312,730,244 | SD 1.5 ``unet`` + motion adapter v1-5-2 |
| ``svd``          | UNetSpatioTemporal...    | 1,524,623,082 | Stable Video Diffusion ``unet``         |
| ``sd3``          | SD3Transformer2DModel    | 2,028,328,000 | SD3 Medium ``transformer``              |

Usage::

    model = build_denoiser("sd2", dtype=torch.float16, device="cuda")
    out = model(**example_inputs("sd2", 768, dtype=torch.float16, device="cuda"))[0]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    MotionAdapter,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

__all__ = ["ARCHS", "ArchSpec", "build_denoiser", "count_params", "example_inputs"]

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


@dataclass(frozen=True)
class ArchSpec:
    """One benchmark architecture and the conditioning its pipeline sends to the denoiser.

    ``config`` builds ``model_class`` (for ``animatediff`` the SD 1.5 UNet, combined with ``adapter_config``
    by ``UNetMotionModel.from_unet2d``). ``text_seq_len`` x ``text_embed_dim`` is the per-sample
    ``encoder_hidden_states``; ``pooled_embed_dim`` SDXL's ``text_embeds``. ``published_params`` is the
    reference count for tests (see ``PUBLISHED_SOURCES``).
    """

    name: str
    family: str  # "sd" | "sdxl" | "pixart" | "animatediff" | "svd" | "sd3"
    model_class: type[torch.nn.Module]
    config: dict[str, Any]
    resolutions: tuple[int, ...]  # default square image sizes in px
    text_seq_len: int
    text_embed_dim: int
    published_params: int
    pooled_embed_dim: int | None = None
    num_frames: int | None = None
    adapter_config: dict[str, Any] | None = None
    vae_scale_factor: int = 8
    latent_channels: int = 4
    notes: str = field(default="", compare=False)

    def latent_hw(self, res: int | tuple[int, int]) -> tuple[int, int]:
        """Latent (height, width) for an image of ``res`` px (an int is square)."""
        height, width = (res, res) if isinstance(res, int) else res
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"{self.name}: {height}x{width} px is not a multiple of {self.vae_scale_factor}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def top_level_tokens(self, res: int | tuple[int, int]) -> int:
        """Image tokens seen by the highest-resolution attention (per frame for video).

        UNets: SD 1.x/2.x attend at the full latent grid; SDXL has no attention there, so its first
        attention level is 2x downsampled. PixArt, SD3: one token per ``patch_size``^2 latent patch.
        """
        h, w = self.latent_hw(res)
        if self.family in ("pixart", "sd3"):
            p = self.config["patch_size"]
            return (h // p) * (w // p)
        if self.family == "sdxl":
            return math.ceil(h / 2) * math.ceil(w / 2)
        return h * w


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            name="sd15",
            family="sd",
            model_class=UNet2DConditionModel,
            config=SD15_UNET,
            resolutions=(512, 768, 1024),
            text_seq_len=77,
            text_embed_dim=768,
            published_params=859_520_964,
            notes="Stable Diffusion 1.5 UNet; CLIP ViT-L/14 text encoder (77 x 768).",
        ),
        ArchSpec(
            name="sd2",
            family="sd",
            model_class=UNet2DConditionModel,
            config=SD2_UNET,
            resolutions=(512, 768, 1024),
            text_seq_len=77,
            text_embed_dim=1024,
            published_params=865_910_724,
            notes="Stable Diffusion 2.x UNet (2.0/2.1, base and 768-v share it); OpenCLIP ViT-H (77 x 1024).",
        ),
        ArchSpec(
            name="sdxl",
            family="sdxl",
            model_class=UNet2DConditionModel,
            config=SDXL_UNET,
            resolutions=(1024,),
            text_seq_len=77,
            text_embed_dim=2048,
            pooled_embed_dim=1280,
            published_params=2_567_463_684,
            notes="SDXL base 1.0 UNet; no attention at the full-resolution level; CLIP-L + OpenCLIP bigG.",
        ),
        ArchSpec(
            name="pixart-alpha",
            family="pixart",
            model_class=PixArtTransformer2DModel,
            config=PIXART_ALPHA_TRANSFORMER,
            resolutions=(512, 1024),
            text_seq_len=120,
            text_embed_dim=4096,
            published_params=611_000_000,
            notes="PixArt-alpha XL/2 (1024-MS): 28 blocks, 1152 wide; T5-XXL text (120 x 4096) with a mask.",
        ),
        ArchSpec(
            name="animatediff",
            family="animatediff",
            model_class=UNetMotionModel,
            config=SD15_UNET,
            adapter_config=MOTION_ADAPTER_V152,
            resolutions=(512,),
            num_frames=16,
            text_seq_len=77,
            text_embed_dim=768,
            published_params=859_520_964 + 453_000_000,
            notes="SD 1.5 UNet + AnimateDiff motion adapter v1-5-2 (motion modules at every level and mid).",
        ),
        ArchSpec(
            name="svd",
            family="svd",
            model_class=UNetSpatioTemporalConditionModel,
            config=SVD_UNET,
            resolutions=(512, 768),  # 768 px square: the 9216 tokens per frame of SVD's native 576 x 1024
            num_frames=14,
            text_seq_len=1,  # one CLIP image embedding
            text_embed_dim=1024,
            published_params=1_524_623_082,
            notes="Stable Video Diffusion UNet (spatial + temporal blocks at 3 levels); CLIP image embeds.",
        ),
        ArchSpec(
            name="sd3",
            family="sd3",
            model_class=SD3Transformer2DModel,
            config=SD3_MEDIUM_TRANSFORMER,
            resolutions=(1024,),
            text_seq_len=77 + 256,  # CLIP tokens, then T5's
            text_embed_dim=4096,
            pooled_embed_dim=2048,
            latent_channels=16,
            published_params=2_028_328_000,
            notes="SD3 Medium MMDiT: 24 joint blocks, 1536 wide, patch 2; CLIP-L/G + T5-XXL text: 333 x 4096",
        ),
    )
}

#: Where each ``published_params`` comes from.
PUBLISHED_SOURCES: dict[str, str] = {
    "sd15": "exact count of the released SD 1.5 UNet",
    "sd2": "exact count of the released SD 2.x UNet",
    "sdxl": "exact count of the released SDXL base UNet",
    "pixart-alpha": "~611M: 0.6B in the PixArt-alpha paper; ~2.45 GB fp32 transformer checkpoint",
    "animatediff": "SD 1.5 UNet + ~453M motion modules (mm_sd_v15_v2 fp32 checkpoint: ~1.82 GB)",
    "svd": "count of diffusers' UNetSpatioTemporalConditionModel with its default config, written for SVD",
    "sd3": "exact count of the released SD3 Medium transformer config ('2B' in its model card)",
}


def _spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def _construct(spec: ArchSpec) -> torch.nn.Module:
    """Instantiate the model in the ambient device context (meta, empty-weights or real)."""
    if spec.family == "animatediff":
        unet = UNet2DConditionModel(**spec.config)
        adapter = MotionAdapter(**spec.adapter_config)
        return UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    return spec.model_class(**spec.config)


def count_params(name: str) -> int:
    """Number of parameters of the ``name`` denoiser, built on the meta device (no memory, ~0.1-1 s)."""
    with torch.device("meta"):
        model = _construct(_spec(name))
    return sum(p.numel() for p in model.parameters())


@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers (positional tables) for real, on CPU."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


_PATTERN_LEN = 1_048_573  # prime, so the fill pattern does not line up with rows or channels


def _materialize(model: torch.nn.Module, dtype: torch.dtype, device: torch.device, seed: int) -> None:
    """Give meta parameters real storage with a cheap deterministic init; move buffers along.

    Weights (ndim >= 2) get a uniform(-1, 1) pattern from a seeded generator, tiled and scaled by
    1/sqrt(fan_in) (PyTorch's default bound); 1-D weights (norms) are 1, biases 0. Tiling instead of a
    fresh draw per element keeps a 2.6B-parameter build at memory speed on a CPU.
    """
    generator = torch.Generator().manual_seed(seed)
    pattern = (torch.rand(_PATTERN_LEN, generator=generator) * 2 - 1).to(device=device, dtype=dtype)
    offset = 0
    for module in model.modules():
        for pname, param in list(module._parameters.items()):
            if param is None:
                continue
            tensor = torch.empty(param.shape, dtype=dtype, device=device)
            if pname.endswith("bias"):
                tensor.zero_()
            elif param.ndim == 1:
                tensor.fill_(1.0)
            else:
                rolled = torch.roll(pattern, -offset) / math.sqrt(param[0].numel())
                flat = tensor.view(-1)
                for start in range(0, flat.numel(), _PATTERN_LEN):
                    chunk = flat[start : start + _PATTERN_LEN]
                    chunk.copy_(rolled[: chunk.numel()])
                offset = (offset + flat.numel()) % _PATTERN_LEN
            module._parameters[pname] = torch.nn.Parameter(tensor, requires_grad=False)
        for bname, buf in list(module._buffers.items()):
            if buf is not None:
                buf_dtype = dtype if buf.is_floating_point() else None
                module._buffers[bname] = buf.to(device=device, dtype=buf_dtype)


def build_denoiser(
    name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> torch.nn.Module:
    """The real-size ``name`` denoiser with deterministic random weights, in eval mode, ``requires_grad`` off.

    Built with parameters on the meta device, then filled in place on ``device`` (seconds even for SDXL).
    Memory: parameters x dtype size (SDXL fp32: 10.3 GB).
    """
    spec = _spec(name)
    with _params_on_meta():
        model = _construct(spec)
    _materialize(model, dtype, torch.device(device), seed)
    return model.eval()


def example_inputs(
    name: str,
    res: int | tuple[int, int],
    batch: int = 1,
    cfg: bool = True,
    num_frames: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of one denoiser call as the ``name`` pipeline sends them: ``model(**kwargs)[0]``.

    ``res`` is the image size in px (int: square; or (height, width)); latent h x w = res / 8. With ``cfg``
    the batch is doubled, [uncond, cond] as the pipelines send it: n = 2 * batch (else n = batch), both halves
    holding the same latents and different text.

    - sd15 / sd2: ``sample`` [n, 4, h, w], ``timestep`` 0-d int64, ``encoder_hidden_states`` [n, 77, D].
    - sdxl: also ``added_cond_kwargs`` = {``text_embeds`` [n, 1280], ``time_ids`` [n, 6]}
      (original size, crop (0, 0), target size).
    - pixart-alpha: ``hidden_states`` [n, 4, h, w], ``timestep`` [n], ``encoder_hidden_states``
      [n, 120, 4096], ``encoder_attention_mask`` [n, 120] (a 16-token prompt), ``added_cond_kwargs`` with
      ``resolution`` [n, 2] and ``aspect_ratio`` [n, 1] because ``sample_size == 128`` (else both ``None``).
    - animatediff: ``sample`` [n, 4, F, h, w]; ``encoder_hidden_states`` [n * F, 77, 768]: the pipeline
      repeats each prompt embedding per frame (``repeat_interleave``), UNetMotionModel does not.
    - sd3: ``hidden_states`` [n, 16, h, w], ``timestep`` [n], ``encoder_hidden_states`` [n, 333, 4096],
      ``pooled_projections`` [n, 2048].
    - svd: ``sample`` [n, F, 8, h, w] (frames first): the noisy latents, then the conditioning image's
      latents, zeros in the unconditional half; ``encoder_hidden_states`` [n, 1, 1024] (zeros in the
      unconditional half); ``added_time_ids`` [n, 3] (fps 6, motion bucket 127, noise augmentation 0.02).

    Every call also has ``return_dict=False``. Tensors are drawn from a generator seeded with ``seed``.
    """
    spec = _spec(name)
    h, w = spec.latent_hw(res)
    height, width = h * spec.vae_scale_factor, w * spec.vae_scale_factor
    n = batch * (2 if cfg else 1)
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    def latents(*shape: int) -> torch.Tensor:
        """[n, *shape]: one draw per prompt, repeated for the two CFG halves."""
        return randn(batch, *shape).repeat(n // batch, *([1] * len(shape)))

    timestep = torch.tensor(500, dtype=torch.int64, device=device)
    text = randn(n, spec.text_seq_len, spec.text_embed_dim)
    kwargs: dict[str, Any]
    if spec.family == "pixart":
        mask = torch.zeros(n, spec.text_seq_len, dtype=torch.int64)
        mask[:, :16] = 1
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if spec.config["sample_size"] == 128:
            added = {
                "resolution": torch.tensor([[height, width]] * n).to(device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([[height / width]] * n).to(device=device, dtype=dtype),
            }
        kwargs = {
            "hidden_states": latents(spec.latent_channels, h, w),
            "timestep": timestep[None].expand(n),
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask.to(device),
            "added_cond_kwargs": added,
        }
    elif spec.family == "animatediff":
        frames = num_frames or spec.num_frames
        kwargs = {
            "sample": latents(spec.latent_channels, frames, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text.repeat_interleave(frames, dim=0),
        }
    elif spec.family == "sd3":
        kwargs = {
            "hidden_states": latents(spec.latent_channels, h, w),
            "timestep": timestep[None].expand(n).to(dtype),
            "encoder_hidden_states": text,
            "pooled_projections": randn(n, spec.pooled_embed_dim),
        }
    elif spec.family == "svd":
        frames = num_frames or spec.num_frames
        image = randn(batch, 1, spec.latent_channels, h, w).expand(-1, frames, -1, -1, -1)
        if cfg:
            image = torch.cat([torch.zeros_like(image), image])
            text = torch.cat([torch.zeros_like(text[:batch]), text[batch:]])
        kwargs = {
            "sample": torch.cat([latents(frames, spec.latent_channels, h, w), image], dim=2),
            "timestep": timestep,
            "encoder_hidden_states": text,
            "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * n).to(device=device, dtype=dtype),
        }
    else:
        sample = latents(spec.latent_channels, h, w)
        kwargs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text}
        if spec.family == "sdxl":
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * n)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": randn(n, spec.pooled_embed_dim),
                "time_ids": time_ids.to(device=device, dtype=dtype),
            }
    kwargs["return_dict"] = False
    return kwargs
