"""Reference-only control (diffusers' community `stable_diffusion_reference.py` and its SDXL twin): the
pipeline replaces every BasicTransformerBlock's forward so that attn1 is called with `encoder_hidden_states`,
the block's own tokens followed by those a reference pass stored. imptome merges attn1's queries only."""

from __future__ import annotations

import math
from types import MethodType

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

import imptome
from imptome import PlanRecord
from tests.factories import tiny_sd_pipeline

N = 16 * 16  # tokens of the top level, the only one merged
KEPT = N - math.floor(N * 0.7)


class ReferenceOnlyUNet(nn.Module):
    """The UNet of the community reference-only pipeline, its self-attention hack reduced to SD's layer-norm
    blocks: at every step a reference pass ("write", the reference latent [2, 4, 16, 16] as a CFG batch)
    stores each block's normalised tokens [B, N, C], then the main pass ("read") calls attn1 over its own
    tokens and the stored ones, and, with CFG and `style_fidelity` > 0, attn1 again on the unconditional rows
    alone over their own tokens, mixing the two outputs as the pipeline does."""

    def __init__(self, unet: nn.Module, style_fidelity: float = 0.5) -> None:
        super().__init__()
        self.unet = unet
        self.style_fidelity = style_fidelity
        self.mode = "write"
        noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        self.reference = torch.cat([noise] * 2)  # the pipeline's noised reference latent under CFG
        for block in unet.modules():
            if isinstance(block, BasicTransformerBlock):
                block.bank = []
                block.forward = MethodType(self._block_forward, block)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # the pipeline reads unet.config, unet.dtype, ... through the wrapper
            return getattr(self.unet, name)

    def _block_forward(
        self,
        block: BasicTransformerBlock,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **_: object,
    ) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]: the community pipeline's block forward (no attention masks, no GLIGEN)."""
        norm_hidden_states = block.norm1(hidden_states)
        if self.mode == "write":
            block.bank.append(norm_hidden_states.detach().clone())
            attn_output = block.attn1(norm_hidden_states)
        else:
            keys = torch.cat([norm_hidden_states, *block.bank], dim=1)
            attn_output_uc = block.attn1(norm_hidden_states, encoder_hidden_states=keys)
            attn_output_c = attn_output_uc.clone()
            if self.style_fidelity > 0:  # CFG: [uncond, cond]
                uc_mask = torch.arange(hidden_states.shape[0]) < hidden_states.shape[0] // 2
                attn_output_c[uc_mask] = block.attn1(
                    norm_hidden_states[uc_mask], encoder_hidden_states=norm_hidden_states[uc_mask]
                )
            attn_output = self.style_fidelity * attn_output_c + (1.0 - self.style_fidelity) * attn_output_uc
            block.bank.clear()
        hidden_states = attn_output + hidden_states
        cross = block.attn2(block.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states)
        hidden_states = cross + hidden_states
        return block.ff(block.norm3(hidden_states)) + hidden_states

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        self.mode = "write"
        self.unet(self.reference, timestep, encoder_hidden_states=encoder_hidden_states)
        self.mode = "read"
        return self.unet(sample, timestep, encoder_hidden_states, **kwargs)


def generate(pipe) -> torch.Tensor:
    """[1, 4, 16, 16] latent of a 3-step generation with CFG."""
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return pipe("a red circle", latents=latents, num_inference_steps=3, output_type="latent").images


def slot_means(tokens: torch.Tensor, record: PlanRecord) -> torch.Tensor:
    """[B, N, C] -> [B, N, C]: every token replaced by what it is merged into: the mean of the tokens that
    share its kept token, or that kept token alone when the step prunes."""
    source = record.source
    if record.pruned:
        return tokens.gather(1, source.unsqueeze(-1).expand_as(tokens))
    same = (source.unsqueeze(2) == source.unsqueeze(1)).to(tokens.dtype)  # [B, N, N]
    return same @ tokens / same.sum(dim=2, keepdim=True)


def run_and_record(pipe, **options) -> tuple[list[dict], PlanRecord]:
    """Patch `pipe` and generate, recording every call of the top block's attn1 (its tokens and keys before
    merging, the query count and mask it ran with, its output after unmerging) and the last call's plan."""
    attn1 = pipe.unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    calls: list[dict] = []

    def before(module, args, kwargs):
        calls.append({"tokens": args[0], "keys": kwargs.get("encoder_hidden_states")})

    def merged(module, args, kwargs):
        calls[-1].update(queries=args[0].shape[1], mask=kwargs.get("attention_mask"))

    def after(module, args, kwargs, output):
        calls[-1]["output"] = output

    handles = [attn1.register_forward_pre_hook(before, with_kwargs=True)]  # runs before imptome's hooks
    imptome.apply_patch(pipe, ratio=0.7, **options)
    handles += [
        attn1.register_forward_pre_hook(merged, with_kwargs=True),
        attn1.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        generate(pipe)
    finally:
        for handle in handles:
            handle.remove()
    (record,) = imptome.merge_plan(pipe)
    return calls, record


@pytest.mark.parametrize("proportional", [False, True])
def test_merged_queries_attend_to_every_reference_key(proportional):
    """The main pass's attn1 runs on KEPT merged queries over all its own and the reference's tokens (2N
    keys, not merged), with no mask: its output is attention over those keys of each token's merged query.
    Before 0.8.3, the unconditional rows' call was refused as a split batch (FreeNoise's error) and, with
    proportional attention, the mask over the KEPT tokens reached SDPA for 2N keys and failed inside torch."""
    pipe = tiny_sd_pipeline()
    pipe.unet = ReferenceOnlyUNet(pipe.unet)
    base = generate(pipe)
    calls, record = run_and_record(pipe, proportional_attention=proportional)
    reference_pass, main, uncond = calls[-3:]  # the last step's
    assert (reference_pass["keys"], reference_pass["queries"]) == (None, KEPT)  # a self-attention as usual
    assert (reference_pass["mask"] is not None) == proportional
    assert main["keys"].shape[:2] == (2, 2 * N) and (main["queries"], main["mask"]) == (KEPT, None)
    assert not record.pruned  # step 2 averages
    attn1 = pipe.unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    exact = attn1.processor(attn1, slot_means(main["tokens"], record), main["keys"])  # no hooks, N queries
    torch.testing.assert_close(main["output"], exact, rtol=1e-4, atol=1e-5)
    # the unconditional rows alone are not the batch the plan is for: left unmerged, exact
    assert uncond["tokens"].shape[0] == 1 and (uncond["queries"], uncond["mask"]) == (N, None)
    torch.testing.assert_close(uncond["output"], attn1.processor(attn1, uncond["tokens"], uncond["keys"]))
    imptome.remove_patch(pipe)
    assert torch.equal(generate(pipe), base)
