"""Whole-generation timing for stacking speed-ups: imptome, DeepCache and both, on a Stable Diffusion pipeline
built around a benchmark UNet.

DeepCache saves whole steps (it reuses the deep UNet features on all but every `cache_interval`-th step) and
imptome makes the remaining top-level attention cheaper, so the two only show together over a generation,
not in one denoiser call. The pipeline gets precomputed prompt embeddings and returns latents: no text
encoder, no VAE, so the time is the denoising loop (UNet calls plus the scheduler).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import imptome
from imptome.bench.timing import quartiles, round_order, synchronize
from imptome.commands.speed import DEEPCACHE_INTERVAL

CACHE_BRANCH = 0  # with DEEPCACHE_INTERVAL, DeepCache's own example setting
GUIDANCE = 7.5  # the SD pipelines' default guidance scale
# steps of each variant's warm-up: imptome's SD schedule prunes at steps 0-1 and merges by importance from 2
WARM_UP_STEPS = 3


def sd_ddim_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's released noise schedule."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd_pipeline(unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline around `unet` with an SD-style DDIM scheduler and nothing else."""
    scheduler = sd_ddim_scheduler()
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class GenerationVariant:
    name: str  # none, importance, deepcache or deepcache+importance
    ratio: float  # 0 without imptome

    @property
    def label(self) -> str:
        return f"{self.name}@{self.ratio:g}" if self.ratio else self.name

    @contextmanager
    def applied(self, pipe: StableDiffusionPipeline) -> Iterator[None]:
        """imptome's hooks, then DeepCache's forward wrappers around them; undone in reverse order."""
        if self.ratio:
            imptome.apply_patch(pipe, ratio=self.ratio)
        helper = None
        if self.name.startswith("deepcache"):
            from DeepCache import DeepCacheSDHelper

            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=DEEPCACHE_INTERVAL, cache_branch_id=CACHE_BRANCH)
            helper.enable()
        try:
            yield
        finally:
            if helper is not None:
                helper.disable()
            imptome.remove_patch(pipe)


def generation_variants(ratios: list[float]) -> list[GenerationVariant]:
    variants = [GenerationVariant("none", 0.0), GenerationVariant("deepcache", 0.0)]
    for ratio in ratios:
        variants += [GenerationVariant("importance", ratio), GenerationVariant("deepcache+importance", ratio)]
    return variants


def measure_generations(
    unet: UNet2DConditionModel,
    inputs: dict[str, Any],
    res: int,
    ratios: list[float],
    steps: int,
    rounds: int,
    say: Callable[[str], None],
    tag: str,
) -> list[dict[str, Any]]:
    """Seconds per generation of `steps` DDIM steps at guidance GUIDANCE (a CFG batch per step) for every
    variant, alternated over `rounds` rounds (`round_order`) after a warm-up generation of each; rows with
    median, IQR and the speedup over "none" from the same run."""
    pipe = sd_pipeline(unet)
    device = unet.device
    text = inputs["encoder_hidden_states"]
    uncond, cond = text.chunk(2)
    latents = inputs["sample"].chunk(2)[0]

    def generate(num_steps: int) -> None:
        pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            height=res,
            width=res,
            num_inference_steps=num_steps,
            guidance_scale=GUIDANCE,
            latents=latents,
            output_type="latent",
        )

    variants = generation_variants(ratios)
    seconds: dict[GenerationVariant, list[float]] = {variant: [] for variant in variants}
    # Called as users call a pipeline: under its own no_grad, not inference_mode (whose tensors, the
    # scheduler's timesteps among them, have no version counter, so imptome would read each timestep
    # from the GPU and wait for it).
    for variant in variants:  # a warm-up generation through every phase of each variant's schedule
        with variant.applied(pipe):
            generate(min(steps, WARM_UP_STEPS))
    for round_index in range(rounds):
        for variant in round_order(variants, round_index):
            with variant.applied(pipe):
                synchronize(device)
                start = time.perf_counter()
                generate(steps)
                synchronize(device)
                elapsed = time.perf_counter() - start
            seconds[variant].append(elapsed)
            say(f"{tag} generation round {round_index + 1}/{rounds} {variant.label}: {elapsed:.3f} s")
    base = statistics.median(seconds[variants[0]])
    rows = []
    for variant in variants:
        times = seconds[variant]
        median = statistics.median(times)
        q1, q3 = quartiles(times)
        rows.append(
            {
                "variant": variant.name,
                "ratio": variant.ratio,
                "steps": steps,
                "cache_interval": DEEPCACHE_INTERVAL if variant.name.startswith("deepcache") else None,
                "median_s": median,
                "iqr_s": q3 - q1,
                "times_s": times,
                "speedup": base / median,
            }
        )
    return rows
