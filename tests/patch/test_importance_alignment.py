"""The importance map reaches every family's merged layers at the right token positions.

Where a layer's grid is coarser than the latent (PixArt, DiT and SD3 patchify by 2; SDXL's finest attention
is at half resolution) the map is area-pooled: each plan must be built from the block mean of the previous
step's map, in the layer's row-major token order, and keep the most important tokens.
"""

from __future__ import annotations

import pytest
import torch

import imptome
from imptome.merge import MERGED
from tests.factories import tiny_dit_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sdxl_pipeline

# (pipeline, one call of it, options for a tiny model): the 4-block transformers have no blocks 7-20
FAMILIES = {
    "sdxl": (
        lambda: tiny_sdxl_pipeline(top_level_attention=False),
        lambda pipe: pipe("a red circle", num_inference_steps=3, output_type="latent"),
        {},
    ),
    "pixart": (
        tiny_pixart_pipeline,
        lambda pipe: pipe(
            "a red circle", num_inference_steps=3, output_type="latent", use_resolution_binning=False
        ),
        {"block_range": None},
    ),
    "dit": (tiny_dit_pipeline, lambda pipe: pipe(class_labels=[2], num_inference_steps=3), {}),
    "sd3": (
        tiny_sd3_pipeline,
        lambda pipe: pipe(
            "a red circle", num_inference_steps=3, max_sequence_length=32, output_type="latent"
        ),
        {},
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_plan_keeps_the_most_important_tokens_of_the_pooled_previous_map(family):
    make, run, options = FAMILIES[family]
    pipe = make()
    # pool factor 1 with destinations drawn from the pool: the N - R kept tokens are exactly the pool, the
    # N - R most important tokens (at ratio 0.75 all of them destinations)
    imptome.apply_patch(
        pipe,
        ratio=0.75,
        dst_selection="random",
        pool_factor=1.0,
        importance_start_step=1,
        merge_start_step=1,
        **options,
    )
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    calls = []
    denoiser.register_forward_hook(  # after imptome's hook: this call's plans and the map it made
        lambda *_: calls.append((imptome.merge_plan(pipe), imptome.importance_map(pipe)))
    )
    with torch.no_grad():
        run(pipe)
    assert len(calls) == 3
    for (records, _), (_, previous_map) in zip(calls[1:], calls[:-1], strict=True):
        assert records, "nothing was merged"
        for record in records:
            h, w = record.grid
            units, height, width = previous_map.shape
            assert (height, width) == (2 * h, 2 * w)  # pooled 2x, not taken as it is
            blocks = previous_map.view(units, h, 2, w, 2).mean(dim=(2, 4))
            torch.testing.assert_close(record.importance, blocks)
            kept = (record.roles != MERGED).flatten(1)  # [B, N], both CFG halves
            most_important = torch.zeros_like(kept)
            most_important.scatter_(1, blocks.flatten(1).topk(h * w // 4).indices.repeat(2, 1), True)
            assert torch.equal(kept, most_important), record.layer
