"""SDXL (StableDiffusionXLPipeline, UNet with added text/time conditioning): the default layer selection
merges the finest level that has attention, since SDXL has none at full resolution."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import imptome
from tests.factories import tiny_sdxl_pipeline
from tests.patch.probes import outputs_and_plans, token_shapes
from tests.versions import needs_diffusers


def test_default_merges_self_attention_at_the_finest_attention_level_only():
    pipe = tiny_sdxl_pipeline(top_level_attention=False)  # like SDXL: the 16 x 16 level has no attention

    def generate() -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red circle", num_inference_steps=3, generator=generator, output_type="latent"
        ).images.numpy()

    base = generate()
    imptome.apply_patch(pipe)  # the unet preset: ratio 0.5, max_downsample chosen automatically (2 here)
    seen = token_shapes(pipe.unet, generate)
    assert any(name.endswith("attn2") for name in seen) and any(name.endswith(".ff") for name in seen)
    for name, shapes in seen.items():  # every level with attention is 8 x 8 in this 2-level UNet
        assert shapes == [(2, 32 if name.endswith("attn1") else 64)] * 3, name
    merged_out = generate()
    assert np.isfinite(merged_out).all() and not np.array_equal(merged_out, base)
    # ToMeSD's setting would merge nothing on SDXL (0.6.6 accepted it silently)
    with pytest.raises(ValueError, match=r"max_downsample=1 merges nothing .* use max_downsample >= 2"):
        imptome.apply_patch(pipe, ratio=0.5, max_downsample=1)
    assert imptome.is_patched(pipe)  # the refused patch left the last one in place
    imptome.remove_patch(pipe)
    assert np.array_equal(generate(), base)


# diffusers 0.35's modular pipelines take only components loaded through a ComponentSpec
@needs_diffusers("0.36", "a modular pipeline built from components made in memory")
def test_modular_pipeline_with_split_cfg_gets_importance():
    """diffusers' modular SDXL pipeline runs classifier-free guidance as two denoiser calls per step (its
    guider's conditional pass, then the unconditional one) with the same latents. imptome recognises the
    pair: no "no CFG" warning, the second pass reuses the first pass's plans, and the map is the channel
    mean of |cond - uncond| from the pair's outputs."""
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    classic = tiny_sdxl_pipeline()
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**{name: part for name, part in classic.components.items() if part is not None})
    imptome.apply_patch(pipe, ratio=0.5)  # a modular pipeline holds its UNet as `unet` too
    steps = 4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome")
        calls = outputs_and_plans(
            pipe.unet,
            lambda: pipe(
                prompt="a red circle",
                num_inference_steps=steps,
                height=128,
                width=128,
                generator=torch.Generator().manual_seed(0),
                output="latents",
            ),
        )
    outputs, plans = [output for output, _ in calls], [plan for _, plan in calls]
    assert len(outputs) == 2 * steps  # two passes per step
    for first, second in zip(plans[::2], plans[1::2], strict=True):
        (first,), (second,) = first, second
        assert torch.equal(first.source, second.source)  # one plan for both passes
    (last,) = plans[-1]
    assert last.importance is not None and not last.pruned  # merged with the previous step's map
    expected = (outputs[-2] - outputs[-1]).abs().mean(dim=1)
    torch.testing.assert_close(imptome.importance_map(pipe), expected)
