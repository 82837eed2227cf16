"""Multi-view generation in one tiled latent (Zero123++: 6 views in a 3 x 2 grid, a SD UNet with CFG): a
non-square token grid whose height is not a multiple of the 2 x 2 stride."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

import imptome
from imptome.merge import DESTINATION
from tests.factories import tiny_sd_pipeline
from tests.patch.probes import token_shapes

VIEW = 5  # latent side of one view (40 px)
ROWS, COLS = 3, 2  # Zero123++'s layout: 3 rows x 2 columns, portrait
GRID = (ROWS * VIEW, COLS * VIEW)  # 15 x 10 latent, 120 x 80 px
N = GRID[0] * GRID[1]
SECOND = math.ceil(GRID[0] / 2) * math.ceil(GRID[1] / 2)  # 8 x 5 at the UNet's second level


def tiled_latents(seed: int = 0) -> torch.Tensor:
    """[1, 4, 15, 10]: six independent 5 x 5 view latents laid out row-major in a 3 x 2 grid."""
    views = torch.randn(ROWS * COLS, 4, VIEW, VIEW, generator=torch.Generator().manual_seed(seed))
    return views.view(ROWS, COLS, 4, VIEW, VIEW).permute(2, 0, 3, 1, 4).reshape(1, 4, *GRID)


def generate(pipe, steps: int = 3, **kwargs) -> torch.Tensor:
    out = pipe(
        "a red circle",
        height=GRID[0] * 8,
        width=GRID[1] * 8,
        latents=tiled_latents(),
        num_inference_steps=steps,
        output_type="latent",
        **kwargs,
    )
    return out.images


def test_tiled_views_merge_on_the_whole_non_square_grid(sd):
    base = generate(sd)
    imptome.apply_patch(sd, ratio=0.7)
    seen = token_shapes(sd.unet, lambda: generate(sd))
    for name, shapes in seen.items():
        top = name.startswith(("down_blocks.0.", "up_blocks.1."))  # full resolution
        tokens = N if top else SECOND
        merged = top and name.endswith("attn1")  # cross-attention, MLPs and the second level keep every token
        assert shapes == [(2, tokens - math.floor(tokens * 0.7) if merged else tokens)] * 3, name
    merged = generate(sd)
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    assert imptome.importance_map(sd).shape == (1, *GRID)
    (record,) = imptome.merge_plan(sd)
    assert record.grid == GRID and record.importance.shape == (1, *GRID)
    assert torch.equal(record.roles[0], record.roles[1])  # uncond and cond rows share the plan
    imptome.remove_patch(sd)
    assert torch.equal(generate(sd), base)


def test_cells_on_an_odd_height_leave_the_last_row_without_destinations(sd):
    imptome.apply_patch(sd, ratio=0.7, method="tome")
    generate(sd, steps=2)
    (record,) = imptome.merge_plan(sd)
    is_dst = record.roles[0] == DESTINATION
    cells = is_dst[: GRID[0] - 1].view(GRID[0] // 2, 2, GRID[1] // 2, 2).sum(dim=(1, 3))
    assert torch.equal(cells, torch.ones_like(cells))  # one destination per full 2 x 2 cell: 7 x 5
    assert not is_dst[-1].any()  # the 15th row has no full cell


class ReferencePassUNet(nn.Module):
    """The shape of Zero123++'s `RefOnlyNoisedUNet`: the pipeline's `unet` becomes a wrapper that, at every
    step, first runs the UNet on the condition image's latent (its own 8 x 8 grid, rows [negative, condition],
    so no CFG batch) and then the main CFG pass on the tiled views, both at the same timestep."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.reference = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the pipeline reads unet.config, unet.dtype, ... through the wrapper
            return getattr(self.unet, name)

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.unet(self.reference, timestep, encoder_hidden_states=encoder_hidden_states)
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs)


def test_a_reference_pass_per_step_keeps_steps_and_importance_of_the_main_pass():
    pipe = tiny_sd_pipeline()
    pipe.unet = ReferencePassUNet(pipe.unet)
    base = generate(pipe, steps=4)
    imptome.apply_patch(pipe, ratio=0.7)  # finds the UNet inside the wrapper
    records = []
    callback = lambda p, i, t, kw: records.append(imptome.merge_plan(p)[0]) or kw  # noqa: E731
    with pytest.warns(UserWarning, match="reference image"):
        seen = token_shapes(pipe.unet.unet, lambda: generate(pipe, steps=4, callback_on_step_end=callback))
    # the reference pass (8 x 8, no CFG) is merged without a map (the fallback); the main pass keeps its own
    # schedule
    reference, main = 64 - math.floor(64 * 0.7), N - math.floor(N * 0.7)
    assert seen["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [(2, reference), (2, main)] * 4
    assert [r.grid for r in records] == [GRID] * 4
    assert [r.pruned for r in records] == [True, True, False, False]  # steps, not calls: merging from step 2
    assert [r.importance is not None for r in records] == [False, False, True, True]
    assert imptome.importance_map(pipe).shape == (1, *GRID)
    imptome.remove_patch(pipe)
    assert torch.equal(generate(pipe, steps=4), base)


class ReferenceOnlyAttnProc:
    """Zero123++'s reference-only attention processor (its pipeline.py, without the `is_cfg_guidance` branch
    that its pipeline leaves off), set on every attention and enabled on attn1: there the reference pass (mode
    "w") stores the attention's input tokens [B, M, C] by layer name, and the main pass (mode "r") appends
    them to its own as keys and values."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        self.chained_proc = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "w",
        ref_dict: dict | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        if self.enabled and mode == "w":
            ref_dict[self.name] = encoder_hidden_states
        elif self.enabled and mode == "r":
            encoder_hidden_states = torch.cat([encoder_hidden_states, ref_dict.pop(self.name)], dim=1)
        return self.chained_proc(attn, hidden_states, encoder_hidden_states, attention_mask)


def set_reference_attention(unet: nn.Module) -> None:
    """Put Zero123++'s reference-only processors on `unet`, as `RefOnlyNoisedUNet` does."""
    unet.set_attn_processor(
        {name: ReferenceOnlyAttnProc(name, name.endswith("attn1.processor")) for name in unet.attn_processors}
    )


class ReferenceAttentionUNet(ReferencePassUNet):
    """`RefOnlyNoisedUNet` with its reference-only attention: the main pass's self-attention also attends to
    the reference pass's tokens of the same layer."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__(unet)
        set_reference_attention(unet)

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        ref_dict = {}
        write = dict(mode="w", ref_dict=ref_dict)
        self.unet(
            self.reference,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            cross_attention_kwargs=write,
        )
        kwargs["cross_attention_kwargs"] = dict(mode="r", ref_dict=ref_dict)
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs)


def test_proportional_attention_is_refused_with_reference_only_attention():
    """The main pass's keys are its kept tokens and the reference pass's, which imptome merged too (20 of
    64 here): proportional attention's mask covers only the former. Before 0.8.3 it was passed on, diffusers
    padded it to the wrong length and SDPA failed inside torch at the first step. Without proportional
    attention, merging works."""
    pipe = tiny_sd_pipeline()
    pipe.unet = ReferenceAttentionUNet(pipe.unet)
    refusal = (
        r"and ReferenceOnlyAttnProc \(Zero123\+\+'s reference-only attention\) also attends to the reference"
    )
    with pytest.raises(ValueError, match=refusal):
        imptome.apply_patch(pipe, ratio=0.7, proportional_attention=True)
    base = generate(pipe, steps=3)
    imptome.apply_patch(pipe, ratio=0.7)
    attn1 = pipe.unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    keys = []
    handle = attn1.to_k.register_forward_pre_hook(lambda module, args: keys.append(tuple(args[0].shape[:2])))
    with pytest.warns(UserWarning, match="reference image"):
        merged = generate(pipe, steps=3)
    handle.remove()
    reference, main = 64 - math.floor(64 * 0.7), N - math.floor(N * 0.7)
    # the main pass attends to its kept tokens and to the reference pass's merged ones
    assert keys == [(2, reference), (2, main + reference)] * 3
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    imptome.remove_patch(pipe)
    assert torch.equal(generate(pipe, steps=3), base)
    # processors set after patching are refused at the next merged call
    pipe.unet.unet.set_attn_processor(AttnProcessor2_0())
    imptome.apply_patch(pipe, ratio=0.7, proportional_attention=True)
    set_reference_attention(pipe.unet.unet)
    with pytest.raises(ValueError, match=refusal):
        generate(pipe, steps=3)
