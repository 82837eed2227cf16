"""PixArt-alpha / PixArt-sigma (PixArtTransformer2DModel, `ada_norm_single` blocks): the paper's transformer
setting through the same `apply_patch`, on tiny offline pipelines of the real classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel
from torch._dynamo.utils import counters

import imptome
from imptome.merge import DESTINATION, MERGED
from tests.factories import PIXART_CONFIG, tiny_pixart_pipeline, tiny_pixart_sigma_pipeline, tiny_sd_unet
from tests.patch.probes import token_shapes

PROMPT = "a red circle on the left"
TOKENS = 64  # 16 x 16 latent, patch 2 -> 8 x 8 tokens
MERGED_BLOCKS = (1, 3)  # the tiny transformers have 4 blocks; the preset's (7, 21) is for 28


def generate(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
        **kwargs,
    )
    return out.images.numpy()


@pytest.fixture(scope="module", params=["alpha", "sigma"])
def pipe(request):
    return tiny_pixart_pipeline() if request.param == "alpha" else tiny_pixart_sigma_pipeline()


@pytest.fixture(scope="module")
def alpha():
    return tiny_pixart_pipeline()


def test_selected_blocks_merge_self_and_cross_attention_queries(pipe):
    base = generate(pipe, steps=6)
    imptome.apply_patch(pipe, block_range=MERGED_BLOCKS)  # otherwise the PixArt preset
    seen = token_shapes(pipe.transformer, lambda: generate(pipe, steps=6))
    kept = TOKENS - math.floor(TOKENS * 0.5)
    assert len(seen) == 4 * 3  # attn1, attn2, ff of 4 blocks
    for name, shapes in seen.items():
        block = int(name.split(".")[1])
        merged = MERGED_BLOCKS[0] <= block < MERGED_BLOCKS[1] and not name.endswith(".ff")
        assert shapes == [(2, kept if merged else TOKENS)] * 6, name
    merged_out = generate(pipe, steps=6)
    assert np.isfinite(merged_out).all() and not np.array_equal(merged_out, base)
    imptome.remove_patch(pipe)
    assert np.array_equal(generate(pipe, steps=6), base)


def test_preset_schedule_random_prune_then_importance_prune_then_merge(alpha):
    imptome.apply_patch(alpha, block_range=MERGED_BLOCKS)
    records = []
    callback = lambda step, t, latents: records.append(imptome.merge_plan(alpha)[0])  # noqa: E731
    generate(alpha, steps=6, callback=callback)
    assert [r.importance is not None for r in records] == [False, True, True, True, True, True]
    assert [r.pruned for r in records] == [True, True, True, True, False, False]
    assert all(r.grid == (8, 8) for r in records)
    # pool_factor 1.0: the pool is exactly the N - R kept tokens, so besides the cell destinations the kept
    # tokens are the most important ones
    last = records[-1]
    roles = last.roles[0].flatten()
    least_important = last.importance[0].flatten().argsort(descending=True)[TOKENS // 2 :]
    assert bool(((roles[least_important] == MERGED) | (roles[least_important] == DESTINATION)).all())
    assert int((roles[least_important] == MERGED).sum()) > 0


def test_importance_comes_from_the_noise_channels_only(alpha):
    outputs = []
    imptome.apply_patch(alpha, block_range=MERGED_BLOCKS)
    handle = alpha.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0]))
    try:
        generate(alpha, steps=2)
    finally:
        handle.remove()
    assert outputs[-1].shape == (2, 8, 16, 16)  # 4 noise + 4 variance channels
    uncond, cond = outputs[-1].chunk(2)
    expected = (cond[:, :4] - uncond[:, :4]).abs().mean(dim=1)
    with_variance = (cond - uncond).abs().mean(dim=1)
    importance = imptome.importance_map(alpha)
    assert importance.shape == (1, 16, 16)  # latent grid; pooled to the 8 x 8 token grid per layer
    torch.testing.assert_close(importance, expected)
    assert not torch.allclose(importance, with_variance)


def test_grid_matching_merges_into_the_nearest_destination(alpha):
    plans = {}
    for matching in ("feature", "grid"):
        imptome.apply_patch(alpha, block_range=MERGED_BLOCKS, matching=matching)
        out = generate(alpha, steps=5)
        assert np.isfinite(out).all()
        plans[matching] = imptome.merge_plan(alpha)[0]
    assert not torch.equal(plans["grid"].source, plans["feature"].source)
    plan = plans["grid"]
    roles, source = plan.roles[0].flatten(), plan.source[0]
    ys, xs = torch.arange(TOKENS) // 8, torch.arange(TOKENS) % 8
    dst = (roles == DESTINATION).nonzero().flatten()
    for token in (roles == MERGED).nonzero().flatten():
        distance = (ys[dst] - ys[token]) ** 2 + (xs[dst] - xs[token]) ** 2
        chosen = (ys[source[token]] - ys[token]) ** 2 + (xs[source[token]] - xs[token]) ** 2
        assert roles[source[token]] == DESTINATION and chosen == distance.min()


def _pixart_transformer(num_layers: int) -> PixArtTransformer2DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        narrow = dict(attention_head_dim=8, cross_attention_dim=16, caption_channels=16)
        model = PixArtTransformer2DModel(**{**PIXART_CONFIG, **narrow, "num_layers": num_layers})
    return model.eval()


def test_preset_merges_blocks_7_to_20_of_28_and_reads_a_positional_timestep():
    transformer = _pixart_transformer(28)
    imptome.apply_patch(transformer)
    latents = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)
    text = torch.randn(2, 5, 16)
    conditions = {"resolution": None, "aspect_ratio": None}
    records = []

    def run():
        with torch.no_grad():
            for t in (900, 800, 900):  # the third call starts a new generation: no map yet
                # positional call: forward(hidden_states, encoder_hidden_states, timestep, ...)
                transformer(latents, text, torch.tensor([t, t]), added_cond_kwargs=conditions)
                records.append(imptome.merge_plan(transformer)[0])

    seen = token_shapes(transformer, run)
    for name, shapes in seen.items():
        merged = 7 <= int(name.split(".")[1]) <= 20 and not name.endswith(".ff")
        assert shapes == [(2, 32 if merged else TOKENS)] * 3, name
    assert [r.importance is not None for r in records] == [False, True, False]


def test_proportional_attention_masks_self_attention_only(alpha):
    base = generate(alpha, steps=6)
    imptome.apply_patch(alpha, block_range=MERGED_BLOCKS, proportional_attention=True)
    masks = {"attn1": [], "attn2": []}
    block = alpha.transformer.transformer_blocks[MERGED_BLOCKS[0]]
    handles = [  # registered after the patch's hooks, so they see what the attention receives
        getattr(block, name).register_forward_pre_hook(
            lambda module, args, kwargs, name=name: masks[name].append(kwargs.get("attention_mask")),
            with_kwargs=True,
        )
        for name in masks
    ]
    try:
        merged = generate(alpha, steps=6)
    finally:
        for handle in handles:
            handle.remove()
    # merged self-attention gets log group sizes over the 32 kept tokens; cross-attention (text keys) none
    assert len(masks["attn1"]) == 6
    assert all(m is not None and m.shape == (2, 1, TOKENS // 2) for m in masks["attn1"])
    assert all(m is None or m.shape[-1] != TOKENS // 2 for m in masks["attn2"])
    assert np.isfinite(merged).all() and not np.array_equal(merged, base)


def test_block_range_out_of_range_is_a_clear_error(alpha):
    with pytest.raises(ValueError, match=r"4 transformer blocks: allowed .* stop <= 4"):
        imptome.apply_patch(alpha)  # the preset's (7, 21) needs 28 blocks
    with pytest.raises(ValueError, match="UNet2DConditionModel has none"):
        imptome.apply_patch(tiny_sd_unet(), block_range=(0, 1))
    assert not imptome.is_patched(alpha)


def test_torch_compile_traces_the_transformer_path_with_one_graph_per_phase():
    """The PixArt preset's schedule has three phases (random cells at step 0, importance pruning on steps
    1-3, importance merging from step 4): three graphs, reused by a second generation, and the outputs of
    eager mode. Merged self- and cross-attention queries trace like the UNet's self-attention, with no graph
    break (fullgraph=True)."""
    pipe = tiny_pixart_pipeline()
    imptome.apply_patch(pipe, block_range=MERGED_BLOCKS)
    eager = generate(pipe, steps=6)
    torch._dynamo.reset()
    counters.clear()
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, fullgraph=True, backend="eager")
    try:
        first = generate(pipe, steps=6)
        second = generate(pipe, steps=6)
        assert counters["stats"]["unique_graphs"] == 3
        assert not counters["graph_break"]  # the denoiser hooks run outside the graph
        np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(second, first)
    finally:
        pipe.transformer = transformer
        torch._dynamo.reset()
