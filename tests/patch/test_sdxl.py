"""SDXL (StableDiffusionXLPipeline, UNet with added text/time conditioning): the default layer selection
merges the finest level that has attention, since SDXL has none at full resolution."""

from __future__ import annotations

import numpy as np
import torch

import imptome
from tests.factories import tiny_sdxl_pipeline
from tests.patch.probes import token_shapes


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
    imptome.remove_patch(pipe)
    assert np.array_equal(generate(), base)
