"""Perturbed-attention guidance (diffusers' PAG pipelines): the denoiser batch holds an extra perturbed copy
of every image, [uncond, cond, perturbed] with CFG and [cond, perturbed] without."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import (
    AnimateDiffPAGPipeline,
    PixArtSigmaPAGPipeline,
    StableDiffusion3PAGPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLPAGPipeline,
)

import imptome
from imptome.merge import guidance_importance
from tests.factories import (
    tiny_animatediff_pipeline,
    tiny_pixart_sigma_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)
from tests.patch.probes import outputs_and_plans

PROMPTS = ["a red circle on the left", "a blue square"]
TOP_SELF_ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def pag_pipeline(layers: list[str]) -> StableDiffusionPAGPipeline:
    return StableDiffusionPAGPipeline(**tiny_sd_pipeline().components, pag_applied_layers=layers)


def run(pipe, guidance_scale: float, steps: int = 4) -> list[tuple[torch.Tensor, list]]:
    """Each denoiser call's output and merge plans."""
    return outputs_and_plans(
        pipe.unet,
        lambda: pipe(
            PROMPTS,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            pag_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ),
    )


def test_pag_with_cfg_takes_importance_from_the_cond_and_uncond_copies():
    """[uncond, cond, perturbed]: one plan per image for its three copies, and the map from the first two
    (this batch used to be taken for one without CFG: fallback and a wrong warning)."""
    pipe = pag_pipeline(["mid"])
    imptome.apply_patch(pipe, ratio=0.5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome")
        calls = run(pipe, guidance_scale=5.0)
    output, (record,) = calls[-1]
    assert output.shape[0] == 3 * len(PROMPTS)
    uncond, cond, _ = output.chunk(3)
    torch.testing.assert_close(imptome.importance_map(pipe), guidance_importance(cond, uncond, 4))
    assert record.importance is not None and not record.pruned
    for copy in record.source.chunk(3)[1:]:
        assert torch.equal(copy, record.source[: len(PROMPTS)])  # one plan per image, for every copy
    assert not torch.equal(record.source[0], record.source[1])  # two images, two plans


def test_pag_without_cfg_is_not_taken_for_cfg():
    """[cond, perturbed] has two equal halves like a CFG batch, but their difference is PAG's, not CFG's:
    such calls use the fallback (and say so), with one plan for both copies."""
    pipe = pag_pipeline(["mid"])
    imptome.apply_patch(pipe, ratio=0.5)
    with pytest.warns(UserWarning, match="no classifier-free guidance"):
        calls = run(pipe, guidance_scale=1.0)
    output, (record,) = calls[-1]
    assert output.shape[0] == 2 * len(PROMPTS)
    assert imptome.importance_map(pipe) is None and record.importance is None
    cond_rows, perturbed_rows = record.source.chunk(2)
    assert torch.equal(cond_rows, perturbed_rows)


def test_pag_on_a_merged_layer():
    """PAG's processor on a layer imptome merges sees the merged tokens of its three copies and works;
    proportional attention's mask is refused there with the fix named, instead of a reshape error inside
    the processor."""
    pipe = pag_pipeline(["down_blocks.0"])
    imptome.apply_patch(pipe, ratio=0.5)
    seen = []
    values = pipe.unet.get_submodule(TOP_SELF_ATTENTION).to_v  # PAG's perturbed copy reads only the values
    handle = values.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    try:
        run(pipe, guidance_scale=5.0, steps=2)
    finally:
        handle.remove()
    kept = 256 - math.floor(256 * 0.5)
    assert (2 * len(PROMPTS), kept) in seen and (len(PROMPTS), kept) in seen  # org and perturbed parts
    imptome.apply_patch(pipe, ratio=0.5, proportional_attention=True)
    with pytest.raises(ValueError, match="perturbed-attention guidance.*pag_applied_layers"):
        run(pipe, guidance_scale=5.0, steps=2)


@pytest.mark.parametrize("family", ["sdxl", "pixart-sigma", "animatediff", "sd3"])
def test_pag_pipelines_of_other_families(family):
    """The PAG pipelines of the other supported families: three copies per image, one plan for them, the map
    from the cond and uncond copies, no fallback warning (PAG on a merged layer for PixArt-Sigma and SD3)."""
    kwargs = {"num_inference_steps": 4, "guidance_scale": 5.0, "pag_scale": 3.0, "output_type": "latent"}
    if family == "sdxl":
        pipe = StableDiffusionXLPAGPipeline(**tiny_sdxl_pipeline().components, pag_applied_layers=["mid"])
        options = {}
    elif family == "pixart-sigma":
        components = tiny_pixart_sigma_pipeline().components
        pipe = PixArtSigmaPAGPipeline(**components, pag_applied_layers=["transformer_blocks.1"])
        options = {"block_range": None}
        kwargs |= {"use_resolution_binning": False, "clean_caption": False}
    elif family == "animatediff":
        pipe = AnimateDiffPAGPipeline(**tiny_animatediff_pipeline().components, pag_applied_layers=["mid"])
        options = {}
        kwargs["num_frames"] = 4
    else:
        components = tiny_sd3_pipeline().components
        del components["image_encoder"], components["feature_extractor"]  # not parts of the PAG pipeline
        pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=["blocks.1"])
        options = {}
        kwargs["max_sequence_length"] = 32
    imptome.apply_patch(pipe, ratio=0.5, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome")
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs)
    record = imptome.merge_plan(pipe)[0]
    assert record.importance is not None and imptome.importance_map(pipe) is not None
    first, *others = record.source.chunk(3)
    for other in others:
        assert torch.equal(other, first)
