"""AnimateDiff (AnimateDiffPipeline, UNetMotionModel): spatial transformer blocks are merged per frame with
a per-frame importance map; the temporal motion modules are left alone; the latent is 5-D."""

from __future__ import annotations

import math

import pytest
import torch

import imptome
from imptome.merge import DESTINATION, MERGED
from tests.factories import tiny_animatediff_pipeline
from tests.patch.probes import assert_merged_then_restored, token_shapes

PROMPT = "a red circle on the left"
FRAMES = 3
TOP, SECOND = 256, 64  # tokens per frame: 16 x 16 latent, then 8 x 8


def generate(pipe, steps: int = 3, **kwargs) -> torch.Tensor:
    """Final latents [1, 4, FRAMES, 16, 16]."""
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        PROMPT,
        num_frames=FRAMES,
        num_inference_steps=steps,
        generator=generator,
        output_type="latent",
        **kwargs,
    )
    return out.frames


@pytest.fixture(scope="module")
def anim():
    return tiny_animatediff_pipeline()


def test_spatial_self_attention_merged_per_frame_motion_modules_untouched(anim):
    base = generate(anim)
    imptome.apply_patch(anim, ratio=0.5)
    seen = token_shapes(anim.unet, lambda: generate(anim))
    spatial = {name: shapes for name, shapes in seen.items() if ".attentions." in name}
    motion = {name: shapes for name, shapes in seen.items() if ".motion_modules." in name}
    assert len(spatial) + len(motion) == len(seen) and spatial and motion
    rows = 2 * FRAMES  # CFG halves x frames folded into the batch
    for name, shapes in spatial.items():
        top = name.startswith(("down_blocks.0.", "up_blocks.1."))
        tokens = TOP if top else SECOND
        merged = top and name.endswith("attn1")  # cross-attention, MLP and the lower level are not merged
        assert shapes == [(rows, tokens - math.floor(tokens * 0.5) if merged else tokens)] * 3, name
    for name, shapes in motion.items():  # temporal: pixels folded into the batch, all frames as tokens
        pixels = TOP if name.startswith(("down_blocks.0.", "up_blocks.1.")) else SECOND
        assert shapes == [(2 * pixels, FRAMES)] * 3, name
    assert_merged_then_restored(anim, lambda: generate(anim), base)


def test_importance_map_and_plans_are_per_frame(anim):
    outputs = []
    imptome.apply_patch(anim, ratio=0.7)
    handle = anim.unet.register_forward_hook(lambda m, a, o: outputs.append(o.sample))
    records = []
    callback = lambda pipe, i, t, kw: records.append(imptome.merge_plan(pipe)[0]) or kw  # noqa: E731
    try:
        generate(anim, steps=4, callback_on_step_end=callback)
    finally:
        handle.remove()
    assert outputs[-1].shape == (2, 4, FRAMES, 16, 16)  # [uncond, cond] x channels x frames
    uncond, cond = outputs[-1].chunk(2)
    expected = (cond - uncond).abs().mean(dim=1)[0]  # [FRAMES, 16, 16]
    torch.testing.assert_close(imptome.importance_map(anim), expected)

    record = records[-1]  # step 3, built from step 2's map
    assert record.importance.shape == (FRAMES, 16, 16) and record.roles.shape == (2 * FRAMES, 16, 16)
    assert torch.equal(record.roles[:FRAMES], record.roles[FRAMES:])  # both CFG halves of a frame share it
    num_remove = math.floor(TOP * 0.7)
    for frame in range(FRAMES):  # each frame's own least important tokens are merged (or destinations)
        unimportant = record.importance[frame].flatten().argsort(descending=True)[TOP - num_remove :]
        roles = record.roles[frame].flatten()[unimportant]
        assert bool(((roles == MERGED) | (roles == DESTINATION)).all()), frame
    assert not torch.equal(record.importance[0], record.importance[1])


def test_free_noise_merges_and_its_split_inference_is_refused():
    """FreeNoise works on frame windows inside the motion modules; the denoiser still gets every frame in
    one call, so merging is as usual. Its split inference feeds the spatial layers slices of the batch,
    which imptome's whole-batch plans do not fit: a clear error instead of plans applied to the wrong rows."""
    pipe = tiny_animatediff_pipeline()
    pipe.enable_free_noise(context_length=4, context_stride=2)
    imptome.apply_patch(pipe, ratio=0.5)
    frames = 8
    pipe("a red circle", num_frames=frames, num_inference_steps=3, output_type="latent")
    (record,) = imptome.merge_plan(pipe)
    assert record.source.shape == (2 * frames, TOP) and imptome.importance_map(pipe).shape[0] == frames
    pipe.enable_free_noise_split_inference(spatial_split_size=4, temporal_split_size=4)
    with pytest.raises(ValueError, match="received 4 rows of tokens in a denoiser call with 16"):
        pipe("a red circle", num_frames=frames, num_inference_steps=3, output_type="latent")
