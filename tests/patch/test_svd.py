"""Stable Video Diffusion (StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel): spatial
transformer blocks are merged per frame with a per-frame importance map, temporal blocks are left alone; the
latent is [B, F, C, H, W] (frames before channels), and the unconditional CFG copy differs from the
conditional one in its concatenated image latents (zeros), not in its noisy latents."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

import imptome
from tests.factories import tiny_svd_pipeline
from tests.patch.probes import assert_merged_then_restored, token_shapes

FRAMES = 3
TOP = 256  # tokens per frame at the top level: 16 x 16 latent


def generate(pipe, steps: int = 3, **kwargs) -> torch.Tensor:
    """Final latents [1, FRAMES, 4, 16, 16]."""
    image = Image.new("RGB", (128, 128), (200, 30, 30))
    image.paste((20, 40, 220), (64, 64, 128, 128))
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        image,
        height=128,
        width=128,
        num_frames=FRAMES,
        num_inference_steps=steps,
        generator=generator,
        output_type="latent",
        **kwargs,
    )
    return out.frames


@pytest.fixture(scope="module")
def svd():
    return tiny_svd_pipeline()


def test_spatial_self_attention_merged_per_frame_temporal_blocks_untouched(svd):
    base = generate(svd)
    imptome.apply_patch(svd, ratio=0.5)
    seen = token_shapes(svd.unet, lambda: generate(svd))
    top_spatial = {
        n: s for n, s in seen.items() if n.endswith("transformer_blocks.0.attn1") and "temporal" not in n
    }
    top_spatial = {n: s for n, s in top_spatial.items() if n.startswith(("down_blocks.0.", "up_blocks.1."))}
    temporal = {n: s for n, s in seen.items() if ".temporal_transformer_blocks." in n}
    assert len(top_spatial) == 5 and temporal  # 2 down, 3 up at the top level
    rows = 2 * FRAMES  # CFG copies x frames folded into the batch
    for name, shapes in top_spatial.items():
        assert shapes == [(rows, TOP // 2)] * 3, name
    for name, shapes in temporal.items():  # pixels folded into the batch, all frames as tokens
        assert all(tokens == FRAMES for _, tokens in shapes), name
    assert_merged_then_restored(svd, lambda: generate(svd), base)


def test_cfg_found_despite_zero_image_latents_and_the_map_is_per_frame(svd):
    inputs, outputs = [], []
    imptome.apply_patch(svd, ratio=0.5)
    handle = svd.unet.register_forward_hook(  # the pipeline passes the sample positionally
        lambda m, args, out: inputs.append(args[0]) or outputs.append(out[0])  # return_dict=False
    )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="imptome")  # no "no classifier-free guidance" warning
            generate(svd, steps=4)
    finally:
        handle.remove()
    uncond_in, cond_in = inputs[-1].chunk(2)  # [1, F, 8, 16, 16]: noisy latents, then image latents
    assert torch.equal(uncond_in[:, :, :4], cond_in[:, :, :4]) and not torch.equal(uncond_in, cond_in)
    uncond, cond = outputs[-1].chunk(2)  # [1, F, 4, 16, 16]
    expected = (cond - uncond).abs().mean(dim=2).flatten(0, 1)  # [F, 16, 16], frame by frame
    torch.testing.assert_close(imptome.importance_map(svd), expected)
    (record,) = imptome.merge_plan(svd)
    assert record.roles.shape == (2 * FRAMES, 16, 16) and record.importance.shape == (FRAMES, 16, 16)
    # one plan per frame, shared by its two CFG copies, different between frames
    assert torch.equal(record.roles[:FRAMES], record.roles[FRAMES:])
    assert not torch.equal(record.roles[0], record.roles[1])


def test_without_guidance_the_fallback_merges_and_says_so(svd):
    imptome.apply_patch(svd, ratio=0.5)
    with pytest.warns(UserWarning, match="no classifier-free guidance"):
        generate(svd, min_guidance_scale=1.0, max_guidance_scale=1.0)
    assert imptome.importance_map(svd) is None
    (record,) = imptome.merge_plan(svd)
    assert record.roles.shape[0] == FRAMES and record.importance is None
