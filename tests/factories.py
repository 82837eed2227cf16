"""Tiny offline diffusers pipelines with random weights, for fast CPU tests.

Every builder returns a real pipeline of the real class (StableDiffusionPipeline, PixArtAlphaPipeline, ...),
built from config dicts with nothing downloaded: fp32, on CPU, every model in eval mode, progress bar off.
Weights are drawn under ``torch.manual_seed(seed)`` inside a forked RNG, so a builder is deterministic and
leaves the caller's global RNG state untouched.

Common sizes: the VAE has 4 levels, so ``vae_scale_factor == 8`` as in the real models, and a pipeline's
default image is ``8 * sample_size`` px (128 px for ``sample_size=16``). The CLIP tokenizers pad to 77 tokens,
the T5 tokenizer to PixArt's ``max_sequence_length`` (120 by default, a call-time argument).

| builder                        | denoiser                 | latent (default) | tokens, top attention level |
| ------------------------------ | ------------------------ | ---------------- | --------------------------- |
| ``tiny_sd_pipeline``           | UNet2DConditionModel     | 4 x 16 x 16      | 256 (16x16), then 64 (8x8)  |
| ``tiny_sdxl_pipeline``         | UNet2DConditionModel     | 4 x 16 x 16      | 256, or 64 without top attn |
| ``tiny_pixart_pipeline``       | PixArtTransformer2DModel | 4 x 16 x 16      | 64 (patch 2: 8x8)           |
| ``tiny_pixart_sigma_pipeline`` | PixArtTransformer2DModel | 4 x 16 x 16      | 64                          |
| ``tiny_dit_pipeline``          | DiTTransformer2DModel    | 4 x 16 x 16      | 64                          |
| ``tiny_sd3_pipeline``          | SD3Transformer2DModel    | 16 x 16 x 16     | 64 (patch 2: 8x8)           |
| ``tiny_animatediff_pipeline``  | UNetMotionModel          | 4 x F x 16 x 16  | 256 per frame               |
| ``tiny_svd_pipeline``          | UNetSpatioTemporal...    | F x 4 x 16 x 16  | 256 per frame               |

Non-square latents (e.g. Zero123++-style 3x2 view tiles) need no special builder: call the SD pipeline with
``height != width``. Latent sides that are not multiples of the UNet's downsampling (2 here) also work, e.g.
``height=72, width=104`` (latent 9 x 13); diffusers then passes explicit ``upsample_size``s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    MotionAdapter,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from imptome.bench.generation import sd_ddim_scheduler

__all__ = [
    "WORDS",
    "tiny_animatediff_pipeline",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "tiny_dit_pipeline",
    "tiny_pixart_pipeline",
    "tiny_pixart_sigma_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd_pipeline",
    "tiny_sd_unet",
    "tiny_sdxl_pipeline",
    "tiny_svd_pipeline",
    "tiny_t5",
    "tiny_vae",
]

#: Words the tiny tokenizers know as single tokens; anything else is spelled out (CLIP) or <unk> (T5).
WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "red", "green", "blue", "yellow",
    "black", "white", "small", "large", "cat", "dog", "bird", "car", "tree", "house", "circle", "square",
    "triangle", "star", "sky", "grass", "water", "left", "right", "top", "bottom", "background",
)  # fmt: skip

CLIP_MAX_LENGTH = 77
TEXT_HIDDEN = 32
SCALING_FACTOR = 0.18215


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for a build without disturbing the caller's global CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _finish(pipe):
    """Eval mode (models are built fp32 on CPU) and no progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------- components


def tiny_clip_tokenizer(max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer built in memory: characters + the merges spelling every word of WORDS.

    Ids: 0 ``<|startoftext|>`` (bos), 1 ``<|endoftext|>`` (eos, pad, unk). About 200 tokens.
    """
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_clip_text_encoder(
    tokenizer: CLIPTokenizer, hidden_size: int = TEXT_HIDDEN, projection_dim: int | None = None, seed: int = 0
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """2-layer CLIP text encoder: ``last_hidden_state`` [B, 77, hidden_size].

    With ``projection_dim`` it is a CLIPTextModelWithProjection (SDXL's second encoder), whose ``text_embeds``
    is [B, projection_dim].
    """
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_t5(
    d_model: int = TEXT_HIDDEN, max_length: int = 120, seed: int = 0
) -> tuple[T5TokenizerFast, T5EncoderModel]:
    """WordLevel T5 tokenizer over WORDS (lower-cased, whitespace split, ``</s>`` appended) and a 2-layer
    T5 encoder.

    Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``. Encoder output [B, L, d_model].
    """
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.1,  # as in real T5: only eval mode makes outputs deterministic
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with _seeded(seed):
        encoder = T5EncoderModel(config)
    return tokenizer, encoder.eval()


def tiny_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    """4-level AutoencoderKL, 8 px per latent cell like SD's: image [B, 3, 8h, 8w] <-> latent [B, 4, h, w].

    ``overrides`` go to the config (e.g. SD3's 16 ``latent_channels`` and ``shift_factor``)."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=SCALING_FACTOR,
    )
    with _seeded(seed):
        vae = AutoencoderKL(**{**config, **overrides})
    return vae.eval()


def tiny_sd_unet_config(
    sample_size: int = 16,
    cross_attention_dim: int = TEXT_HIDDEN,
    top_level_attention: bool = True,
    **overrides,
) -> dict:
    """The config of `tiny_sd_unet` (see there), for code that builds the model itself."""
    top_down = "CrossAttnDownBlock2D" if top_level_attention else "DownBlock2D"
    top_up = "CrossAttnUpBlock2D" if top_level_attention else "UpBlock2D"
    config = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=(top_down, "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", top_up),
        block_out_channels=(32, 64),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=(2, 4),  # diffusers' name for the number of heads
        cross_attention_dim=cross_attention_dim,
    )
    return {**config, **overrides}


def tiny_sd_unet(
    sample_size: int = 16,
    cross_attention_dim: int = TEXT_HIDDEN,
    top_level_attention: bool = True,
    seed: int = 0,
    **overrides,
) -> UNet2DConditionModel:
    """2-level UNet2DConditionModel, channels (32, 64), 2 resnets + 2 transformer blocks per down level.

    ``sample`` [B, 4, h, w] -> [B, 4, h, w]; self-attention sees h*w tokens at the top level (dim 32,
    2 heads) and ceil(h/2)*ceil(w/2) at the second (dim 64, 4 heads); cross-attention over
    [B, 77, cross_attention_dim].
    ``top_level_attention=False`` makes the top level attention-free (DownBlock2D / UpBlock2D), as in SDXL.
    ``overrides`` go to the UNet config (e.g. the SDXL ``addition_embed_type`` keys).
    """
    config = tiny_sd_unet_config(sample_size, cross_attention_dim, top_level_attention, **overrides)
    with _seeded(seed):
        unet = UNet2DConditionModel(**config)
    return unet.eval()


# ---------------------------------------------------------------------------------------------- pipelines


def tiny_sd_pipeline(sample_size: int = 16, seed: int = 0) -> StableDiffusionPipeline:
    """Stable Diffusion 1.x/2.x-shaped pipeline; cross-attention at both UNet levels; DDIM scheduler.

    Default call: 128 x 128 px, latent [B, 4, 16, 16], text [B, 77, 32]; top-level tokens 256, then 64.
    Any ``height``/``width`` that are multiples of 8 work, square or not (latent ``height // 8`` x
    ``width // 8``; odd latent sides included).
    """
    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(tokenizer, seed=seed + 1),
        tokenizer=tokenizer,
        unet=tiny_sd_unet(sample_size, seed=seed + 2),
        scheduler=sd_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_pipeline(
    sample_size: int = 16, top_level_attention: bool = True, seed: int = 0
) -> StableDiffusionXLPipeline:
    """SDXL-shaped pipeline: two CLIP encoders (32 + 32 -> cross_attention_dim 64; the second one projects its
    pooled output to 32), ``addition_embed_type="text_time"`` with 6 time ids x 8 dims, so
    ``projection_class_embeddings_input_dim = 6 * 8 + 32 = 80``.

    Default call: 128 x 128 px, latent [B, 4, 16, 16], text [B, 77, 64], ``text_embeds`` [B, 32],
    ``time_ids`` [B, 6]. Top-level tokens 256 (self-attention at 16x16, then 64 at 8x8). With
    ``top_level_attention=False`` (like the real SDXL, which has none at full resolution) the first attention
    is at the second level: 64 tokens.
    """
    addition_time_embed_dim = 8
    pooled_dim = 32
    tokenizer = tiny_clip_tokenizer()
    tokenizer_2 = tiny_clip_tokenizer()
    unet = tiny_sd_unet(
        sample_size,
        cross_attention_dim=2 * TEXT_HIDDEN,
        top_level_attention=top_level_attention,
        seed=seed + 3,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(tokenizer, seed=seed + 1),
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, projection_dim=pooled_dim, seed=seed + 2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sd_ddim_scheduler(),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe)


#: The tiny PixArt transformer's config (4 blocks, 32 wide, patch 2, 8 output channels = noise + variance).
PIXART_CONFIG: dict = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=4,
    num_attention_heads=2,
    attention_head_dim=16,
    cross_attention_dim=32,
    caption_channels=TEXT_HIDDEN,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    num_embeds_ada_norm=1000,
    activation_fn="gelu-approximate",
    attention_bias=True,
)


def _tiny_pixart_parts(sample_size: int, seed: int, **transformer_overrides) -> dict:
    tokenizer, text_encoder = tiny_t5(seed=seed + 1)
    config = {**PIXART_CONFIG, "sample_size": sample_size, **transformer_overrides}
    with _seeded(seed + 2):
        transformer = PixArtTransformer2DModel(**config)
    return dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(seed), transformer=transformer.eval()
    )


def tiny_pixart_pipeline(sample_size: int = 16, seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-alpha-shaped pipeline: 4 ``ada_norm_single`` blocks, patch 2, inner dim 32 (2 heads x 16);
    out_channels 8 = 4 noise + 4 variance; tiny T5 encoder; DPM-Solver++ scheduler.

    Call it with ``use_resolution_binning=False``: binning snaps sizes to PixArt's 256/512/1024 px aspect
    tables and breaks at tiny sizes. ``clean_caption=False`` avoids a warning (beautifulsoup4 is absent).
    Default call: 128 x 128 px, latent [B, 4, 16, 16], 64 image tokens (8x8), text [B, 120, 32] with an
    attention mask (``max_sequence_length`` at call time).
    ``added_cond_kwargs`` are ``None`` (only ``sample_size == 128`` turns on resolution conditioning).
    """
    parts = _tiny_pixart_parts(sample_size, seed)
    pipe = PixArtAlphaPipeline(**parts, scheduler=DPMSolverMultistepScheduler())
    return _finish(pipe)


def tiny_pixart_sigma_pipeline(sample_size: int = 16, seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Sigma-shaped pipeline: the PixArt-alpha parts with ``interpolation_scale=2`` (as in Sigma's
    config) and the PixArtSigmaPipeline class. Same shapes as ``tiny_pixart_pipeline``; Sigma's call default
    ``max_sequence_length`` is 300. Call with ``use_resolution_binning=False``.
    """
    parts = _tiny_pixart_parts(sample_size, seed, interpolation_scale=2)
    pipe = PixArtSigmaPipeline(**parts, scheduler=DPMSolverMultistepScheduler())
    return _finish(pipe)


DIT_LABELS: dict[int, str] = {0: "tench, Tinca tinca", 1: "goldfish", 2: "cat, tabby", 3: "dog, puppy"}


def tiny_dit_pipeline(sample_size: int = 16, seed: int = 0) -> DiTPipeline:
    """DiT-shaped class-conditional pipeline: 4 ``ada_norm_zero`` blocks, patch 2, inner dim 32; 1000 classes
    + the null class 1000 that DiTPipeline hard-codes; out_channels 8 = noise + variance; DDIM scheduler.

    ``pipe.get_label_ids(["cat", "goldfish"])`` works (labels in ``DIT_LABELS``). Call with ``class_labels``;
    the CFG batch is [cond, uncond] (the other pipelines send [uncond, cond]). Latent [B, 4, 16, 16]
    (128 x 128 px; the size is fixed by ``sample_size``), 64 tokens (8x8). DiT always decodes: no "latent"
    output type.
    """
    with _seeded(seed + 2):
        transformer = DiTTransformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=4,
            num_attention_heads=2,
            attention_head_dim=16,
            norm_type="ada_norm_zero",
            num_embeds_ada_norm=1000,
            dropout=0.0,
        )
    pipe = DiTPipeline(
        transformer=transformer.eval(), vae=tiny_vae(seed), scheduler=sd_ddim_scheduler(), id2label=DIT_LABELS
    )
    return _finish(pipe)


def tiny_sd3_pipeline(
    sample_size: int = 16, dual_attention_layers: tuple[int, ...] = (0,), seed: int = 0
) -> StableDiffusion3Pipeline:
    """SD3-shaped pipeline: an MMDiT transformer of 3 joint blocks (32 wide, patch 2; blocks listed in
    ``dual_attention_layers`` also have SD3.5's image self-attention ``attn2``), two CLIP encoders (32 wide,
    pooled 32 + 32 -> 64) and a T5 encoder (64 wide, 32 tokens), a VAE with 16 latent channels, and the
    flow-matching Euler scheduler.

    Default call (pass ``max_sequence_length=32``): 128 x 128 px, latent [B, 16, 16, 16], 64 image tokens
    (8x8) and 77 + 32 text tokens in every joint attention.
    """
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    t5_tokenizer, t5 = tiny_t5(d_model=2 * TEXT_HIDDEN, max_length=32, seed=seed + 3)
    with _seeded(seed + 4):
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=16,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=2 * TEXT_HIDDEN,  # the T5 width; CLIP's 32 + 32 are padded to it
            caption_projection_dim=32,
            pooled_projection_dim=2 * TEXT_HIDDEN,
            out_channels=16,
            pos_embed_max_size=2 * sample_size,
            dual_attention_layers=dual_attention_layers,
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(
            seed, latent_channels=16, shift_factor=0.06, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=tiny_clip_text_encoder(tokenizer, projection_dim=TEXT_HIDDEN, seed=seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, projection_dim=TEXT_HIDDEN, seed=seed + 2),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )
    return _finish(pipe)


def tiny_animatediff_pipeline(
    sample_size: int = 16, max_frames: int = 32, seed: int = 0
) -> AnimateDiffPipeline:
    """AnimateDiff-shaped pipeline: ``UNetMotionModel.from_unet2d(tiny_sd_unet(), MotionAdapter(...))`` with a
    motion module after every spatial transformer and resnet pair (2 per down level, 3 per up level, 1 mid).

    ``num_frames`` is a call-time argument, at most ``max_frames`` (the motion modules' positional encoding).
    Latent [B, 4, F, 16, 16]; inside the UNet, spatial blocks see [B*F, 256, 32] at the top level (frames
    folded into the batch) and motion modules see [B*256, F, 32] (pixels folded into the batch).
    """
    unet = tiny_sd_unet(sample_size, seed=seed + 2)
    with _seeded(seed + 3):
        adapter = MotionAdapter(
            block_out_channels=(32, 64),
            motion_layers_per_block=2,
            motion_num_attention_heads=2,
            motion_norm_num_groups=16,
            motion_max_seq_length=max_frames,
            use_motion_mid_block=True,
        )
        motion_unet = UNetMotionModel.from_unet2d(unet, adapter)
    tokenizer = tiny_clip_tokenizer()
    pipe = AnimateDiffPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(tokenizer, seed=seed + 1),
        tokenizer=tokenizer,
        unet=motion_unet.eval(),
        motion_adapter=adapter.eval(),
        scheduler=sd_ddim_scheduler(),
        feature_extractor=None,
        image_encoder=None,
    )
    return _finish(pipe)


def tiny_svd_pipeline(sample_size: int = 16, seed: int = 0) -> StableVideoDiffusionPipeline:
    """Stable Video Diffusion-shaped image-to-video pipeline: UNetSpatioTemporalConditionModel (attention at
    the top level, spatial and temporal transformer blocks), a temporal-decoder VAE with SD's 8 px per latent
    cell, a CLIP vision encoder on 224 px inputs, and SVD's Euler scheduler (v-prediction, Karras sigmas).

    Call with a PIL image and ``height=width=8 * sample_size``; ``num_frames`` at call time. Latent
    [B, F, 4, 16, 16] (frames before channels); the UNet input adds 4 channels of image latents, zeros in
    the unconditional CFG copy. Spatial blocks see [B*F, 256, 32] at the top level, temporal blocks
    [B*256, F, 32].
    """
    with _seeded(seed):
        vae = AutoencoderKLTemporalDecoder(
            down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(32,) * 4,  # its norms use 32 groups
            latent_channels=4,
            sample_size=8 * sample_size,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=37,
                image_size=224,  # the pipeline resizes its input image to 224 px for the encoder
                patch_size=32,
            )
        )
        unet = UNetSpatioTemporalConditionModel(
            sample_size=sample_size,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64),
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=3 * 32,  # fps, motion bucket, noise augmentation
            layers_per_block=2,
            cross_attention_dim=32,
            num_attention_heads=(2, 4),
        )
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        interpolation_type="linear",
        use_karras_sigmas=True,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(crop_size=224, size=224),
    )
    return _finish(pipe)
