"""DiT (DiTTransformer2DModel, class-conditional DiTPipeline, `ada_norm_zero` blocks): the CFG batch is
[cond, uncond] there, the reverse of every other pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imptome
from imptome.patch.api import patch_state
from tests.factories import tiny_dit_pipeline
from tests.patch.probes import token_shapes

LABELS = [1, 2]
TOKENS = 64  # 16 x 16 latent, patch 2 -> 8 x 8 tokens


def generate(pipe, steps: int = 3) -> np.ndarray:
    """Decoded images (DiTPipeline has no latent output)."""
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=LABELS, num_inference_steps=steps, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def dit():
    return tiny_dit_pipeline()


def test_preset_merges_self_attention_of_every_block(dit):
    base = generate(dit)
    imptome.apply_patch(dit)  # the DiT preset: ratio 0.5, all blocks, self-attention only
    seen = token_shapes(dit.transformer, lambda: generate(dit))
    assert len(seen) == 4 * 2  # attn1 and ff of 4 blocks; DiT blocks have no cross-attention
    for name, shapes in seen.items():
        assert shapes == [(4, TOKENS if name.endswith(".ff") else TOKENS // 2)] * 3, name
    merged = generate(dit)
    assert np.isfinite(merged).all() and not np.array_equal(merged, base)
    imptome.remove_patch(dit)
    assert np.array_equal(generate(dit), base)


def test_importance_pairs_each_label_with_its_null_class_row(dit):
    outputs = []
    imptome.apply_patch(dit)
    handle = dit.transformer.register_forward_hook(lambda m, a, o: outputs.append(o.sample))
    try:
        generate(dit, steps=2)
    finally:
        handle.remove()
    cond, uncond = outputs[-1][:, :4].chunk(2)  # rows [label 1, label 2, null, null]; 4 noise channels of 8
    torch.testing.assert_close(imptome.importance_map(dit), (cond - uncond).abs().mean(dim=1))


def test_auto_cfg_order_matches_on_the_conditional_half(dit):
    """Matching features come from the conditional half: [cond, uncond] on DiT. Only the features differ
    between the orders (the importance magnitude does not), so plans and images tell them apart."""
    results = {}
    for order in ("auto", "cond_first", "uncond_first"):
        imptome.apply_patch(dit, cfg_order=order)
        image = generate(dit, steps=4)
        results[order] = (image, imptome.merge_plan(dit)[0].source)
    assert np.array_equal(results["auto"][0], results["cond_first"][0])
    assert torch.equal(results["auto"][1], results["cond_first"][1])
    assert not torch.equal(results["auto"][1], results["uncond_first"][1])
    assert not np.array_equal(results["auto"][0], results["uncond_first"][0])


def test_default_matching_uses_the_conditional_half(dit):
    """DiT's CFG batch is [cond, uncond]: the default matches every copy on the conditional rows, so its
    sources are those match_rows="each" gives rows 0-1 (two images)."""
    transformer = dit.transformer
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    labels = torch.tensor([1, 2, 1000, 1000])  # 1000: the null class
    importance = torch.rand(2, 16, 16, generator=generator)
    sources = {}
    for match_rows in ("cond", "each"):
        imptome.apply_patch(transformer, match_rows=match_rows)
        state = patch_state(transformer)
        state.enter_step(10)  # past the warm-up, merging with this map
        state.importance, state.last_timestep = importance, 500.0
        with torch.no_grad():
            transformer(latent, timestep=torch.full((4,), 500), class_labels=labels)
        sources[match_rows] = imptome.merge_plan(transformer)[0].source
    shared, each = sources["cond"], sources["each"]
    assert torch.equal(shared[:2], each[:2]) and torch.equal(shared[:2], shared[2:])
    assert not torch.equal(each[:2], each[2:])  # the halves' tokens differ


def test_options_that_select_no_layer_are_refused_at_patch_time(dit):
    with pytest.raises(
        ValueError, match="nothing to merge in this DiTTransformer2DModel: .*merge_crossattn=True"
    ):
        imptome.apply_patch(dit, merge_attn=False, merge_crossattn=True)  # DiT blocks have no cross-attention
    assert not imptome.is_patched(dit)
