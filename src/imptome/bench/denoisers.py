"""The architectures of `imptome.bench.archs` as models: real-size denoisers with deterministic random
weights, and the inputs their pipelines send them.

Usage::

    model = build_denoiser("sd2", dtype=torch.float16, device="cuda")
    out = model(**example_inputs("sd2", 768, dtype=torch.float16, device="cuda"))[0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    MotionAdapter,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)

from imptome.bench.archs import ARCHS, ArchSpec

__all__ = ["build_denoiser", "example_inputs"]

#: The diffusers model of each model kind (animatediff: a UNetMotionModel built from an SD UNet).
_MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {
    "sd": UNet2DConditionModel,
    "sdxl": UNet2DConditionModel,
    "pixart": PixArtTransformer2DModel,
    "svd": UNetSpatioTemporalConditionModel,
    "sd3": SD3Transformer2DModel,
}


def _spec(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None


def _construct(spec: ArchSpec) -> torch.nn.Module:
    """Instantiate the model in the ambient device context (meta, empty-weights or real)."""
    if spec.model_kind == "animatediff":
        assert spec.adapter_config is not None  # every animatediff architecture has one
        unet = UNet2DConditionModel(**spec.config)
        adapter = MotionAdapter(**spec.adapter_config)
        return UNetMotionModel.from_unet2d(unet, adapter, load_weights=False)
    return _MODEL_CLASSES[spec.model_kind](**spec.config)


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
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (tables) real
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
    if spec.model_kind == "pixart":
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
    elif spec.model_kind == "animatediff":
        frames = num_frames or spec.num_frames
        assert frames is not None  # video architectures have num_frames
        kwargs = {
            "sample": latents(spec.latent_channels, frames, h, w),
            "timestep": timestep,
            "encoder_hidden_states": text.repeat_interleave(frames, dim=0),
        }
    elif spec.model_kind == "sd3":
        assert spec.pooled_embed_dim is not None  # set for sd3 and sdxl
        kwargs = {
            "hidden_states": latents(spec.latent_channels, h, w),
            "timestep": timestep[None].expand(n).to(dtype),
            "encoder_hidden_states": text,
            "pooled_projections": randn(n, spec.pooled_embed_dim),
        }
    elif spec.model_kind == "svd":
        frames = num_frames or spec.num_frames
        assert frames is not None  # video architectures have num_frames
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
        if spec.model_kind == "sdxl":
            assert spec.pooled_embed_dim is not None  # set for sd3 and sdxl
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * n)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": randn(n, spec.pooled_embed_dim),
                "time_ids": time_ids.to(device=device, dtype=dtype),
            }
    kwargs["return_dict"] = False
    return kwargs
