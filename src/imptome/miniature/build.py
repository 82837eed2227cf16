"""Model configs and the in-memory word tokenizer of the miniature Stable Diffusion model."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from . import data

MAX_TOKENS = 16  # bos + 11 prompt tokens at most + eos, padded to 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),  # two downsamples: 64 px -> 16x16 latent
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=data.IMAGE_SIZE,
    mid_block_add_attention=False,
)

TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    hidden_act="quick_gelu",
    projection_dim=128,
)

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=(16, 32, 96),  # 16x16 (256 tokens), 8x8, 4x4; narrow top level: CPU budget
    layers_per_block=1,
    attention_head_dim=16,
    cross_attention_dim=128,
    norm_num_groups=8,
)

# DDPM's linear schedule, not SD's scaled_linear: on a 16x16 latent, scaled_linear leaves 7% of the signal at
# t=999, enough for the UNet to read the layout from the noise instead of the prompt (Lin et al. 2024); the
# linear schedule leaves 0.6%.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="v_prediction",  # as SD 2.x; epsilon gives layout at high noise almost no loss weight
    clip_sample=False,
    steps_offset=1,
)


def _learn_merges(words: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """Tiny BPE training on the word list until every word is one symbol; returns tokens and merges.

    Merges learned this way replay consistently at encoding time, so each word becomes one token.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    tokens = sorted({t for s in seqs for t in s})
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for a, b in zip(s[:-1], s[1:], strict=True):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        pair = min(counts, key=lambda k: (-counts[k], k))
        merges.append(pair)
        tokens.append(pair[0] + pair[1])
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == pair:
                    s[i : i + 2] = [pair[0] + pair[1]]
                i += 1
    return tokens, merges


def build_tokenizer() -> CLIPTokenizer:
    """CLIP tokenizer whose vocabulary is the prompt words (each one token), their BPE parts, and specials."""
    tokens, merges = _learn_merges(data.WORDS)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    cfg = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1, **TEXT_CONFIG)
    return CLIPTextModel(cfg)


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_inference_scheduler() -> DPMSolverMultistepScheduler:
    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}
    return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Text embeddings [n, MAX_TOKENS, d] exactly as StableDiffusionPipeline computes them."""
    return text_encoder(tokenize(tokenizer, prompts))[0]


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Padded input ids [n, MAX_TOKENS]."""
    enc = tokenizer(
        prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    )
    return enc.input_ids


@torch.no_grad()
def denoise(
    unet: UNet2DConditionModel,
    scheduler: Any,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    steps: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """CFG sampling of the UNet while it trains (no pipeline object yet): latents [n, 4, h, w]."""
    n = cond.shape[0]
    size = unet.config.sample_size
    lat = torch.randn((n, unet.config.in_channels, size, size), generator=generator)
    scheduler.set_timesteps(steps)
    lat = lat * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([lat, lat]), t)
        e_u, e_c = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        lat = scheduler.step(e_u + guidance * (e_c - e_u), t, lat).prev_sample
    return lat
