"""Stable Diffusion 3 (StableDiffusion3Pipeline, SD3Transformer2DModel): the image tokens of every MMDiT
block's joint attention (and of SD3.5's image self-attention) are merged; the text tokens of the joint
attention are not; the map comes from the [uncond, cond] batch of flow predictions."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import imptome
from tests.factories import tiny_sd3_pipeline
from tests.patch.probes import assert_merged_then_restored, token_shapes

PROMPTS = ["a red circle", "a blue square"]
IMAGE_TOKENS, TEXT_TOKENS = 64, 77 + 32  # 8 x 8 patches; CLIP tokens, then T5's


def generate(pipe, steps: int = 6, **kwargs) -> torch.Tensor:
    """Final latents [2, 16, 16, 16]."""
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        PROMPTS,
        num_inference_steps=steps,
        generator=generator,
        output_type="latent",
        max_sequence_length=32,
        **kwargs,
    )
    return out.images


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_pipeline()


def test_image_tokens_of_joint_and_dual_attention_merged_text_tokens_untouched(sd3):
    base = generate(sd3)
    imptome.apply_patch(sd3)  # the sd3 preset: ratio 0.5, every block
    seen = token_shapes(sd3.transformer, lambda: generate(sd3))
    rows = 2 * len(PROMPTS)
    image_queries = {name for name in seen if not name.endswith((".add_q_proj", ".ff"))}
    assert image_queries == {
        "transformer_blocks.0.attn",
        "transformer_blocks.0.attn2",  # SD3.5's dual attention in block 0
        "transformer_blocks.1.attn",
        "transformer_blocks.2.attn",
    }
    for name in image_queries:
        assert set(seen[name]) == {(rows, IMAGE_TOKENS // 2)}, name
    for name in (n for n in seen if n.endswith(".add_q_proj")):
        assert set(seen[name]) == {(rows, TEXT_TOKENS)}, name
    for name in (n for n in seen if n.endswith(".ff")):
        assert set(seen[name]) == {(rows, IMAGE_TOKENS)}, name  # merge_mlp is off
    assert_merged_then_restored(sd3, lambda: generate(sd3), base)


def test_map_is_the_cfg_difference_of_the_flow_prediction(sd3):
    outputs = []
    imptome.apply_patch(sd3)
    handle = sd3.transformer.register_forward_hook(lambda m, args, out: outputs.append(out[0]))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="imptome")  # the CFG batch is found: no warning
            generate(sd3)
    finally:
        handle.remove()
    uncond, cond = outputs[-1].chunk(2)  # [2, 16, 16, 16] each
    torch.testing.assert_close(imptome.importance_map(sd3), (cond - uncond).abs().mean(dim=1))
    (record,) = imptome.merge_plan(sd3)
    assert record.grid == (8, 8) and record.roles.shape == (4, 8, 8) and not record.pruned
    assert record.importance.shape == (2, 8, 8)


def test_skip_layer_guidance_pass_merges_with_its_steps_map(sd3):
    """SD3.5's skip-layer guidance adds, at every step, a conditional-only call without the skipped blocks,
    after the CFG batch: it merges with that step's map instead of the no-guidance fallback."""
    imptome.apply_patch(sd3)
    calls = []
    handle = sd3.transformer.register_forward_hook(lambda *_: calls.append(imptome.merge_plan(sd3)))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="imptome")
            generate(
                sd3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0
            )
    finally:
        handle.remove()
    skip_layer_passes = calls[2::2]  # step 0: the CFG batch; later steps: CFG batch, then skip-layer pass
    assert len(calls) == 1 + 2 * len(skip_layer_passes) == 11
    for records in skip_layer_passes:  # from step 1, the preset's first step with importance
        (record,) = records
        assert record.roles.shape[0] == len(PROMPTS) and record.importance is not None


def test_proportional_attention_is_refused_on_joint_attention(sd3):
    """At patching (0.7.0 refused it only at the first call), and at the call when the processors are set
    after patching."""
    with pytest.raises(ValueError, match="JointAttnProcessor2_0 .* ignores attention masks"):
        imptome.apply_patch(sd3, proportional_attention=True)
    assert not imptome.is_patched(sd3)
    processors = sd3.transformer.attn_processors
    sd3.transformer.set_attn_processor(AttnProcessor2_0())  # no joint processor: accepted
    try:
        imptome.apply_patch(sd3, proportional_attention=True)
    finally:
        sd3.transformer.set_attn_processor(processors)
    with pytest.raises(ValueError, match="JointAttnProcessor2_0 .* ignores attention masks"):
        generate(sd3, steps=2)


def test_torch_compile_fullgraph_one_graph_per_phase(sd3):
    """The joint attention's tuple output traces too: no graph break, one graph per phase of the preset's
    schedule (random cells, importance pruning, importance merging), reused by a second generation."""
    from torch._dynamo.utils import counters

    imptome.apply_patch(sd3)
    eager = generate(sd3)
    transformer = sd3.transformer
    torch._dynamo.reset()
    counters.clear()
    sd3.transformer = torch.compile(transformer, fullgraph=True, backend="eager")
    try:
        first = generate(sd3)
        graphs = counters["stats"]["unique_graphs"]
        second = generate(sd3)
        assert graphs == 3 and counters["stats"]["unique_graphs"] == graphs
        assert not counters["graph_break"]
        assert torch.equal(first, eager) and torch.equal(second, eager)
    finally:
        sd3.transformer = transformer
        torch._dynamo.reset()
