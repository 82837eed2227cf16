"""End-to-end behaviour of the patch on tiny Stable Diffusion and SDXL pipelines (random weights, CPU)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from diffusers import HeunDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, SlicedAttnProcessor

import imptome
from imptome.merge import DESTINATION, INDEPENDENT, MERGED
from imptome.patch.api import patch_state
from imptome.patch.families import finest_attention_downsample
from imptome.patch.state import _ranking_keys
from tests.factories import (
    TEXT_HIDDEN,
    tiny_sd_pipeline,
    tiny_sd_unet,
    tiny_sd_unet_config,
    tiny_sdxl_pipeline,
)
from tests.patch.probes import token_shapes

PROMPT = "a red circle on the left"
TOP_CROSS_ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def generate(pipe, steps: int = 4, seed: int = 0, prompt=PROMPT, **kwargs) -> np.ndarray:
    """Final latents (decoding adds nothing to what is tested here)."""
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs)
    return out.images.numpy()


def query_token_counts(unet, run) -> dict[str, list[int]]:
    """Tokens seen by every attention's query projection during `run()`, by attention module name."""
    shapes = token_shapes(unet, run)
    return {name: [tokens for _, tokens in seen] for name, seen in shapes.items() if not name.endswith(".ff")}


def test_ratio_zero_and_remove_patch_are_bit_identical(sd):
    base = generate(sd)
    imptome.apply_patch(sd, ratio=0.0)
    assert np.array_equal(generate(sd), base)
    imptome.apply_patch(sd, ratio=0.7)
    merged = generate(sd)
    assert not np.array_equal(merged, base)
    assert np.isfinite(merged).all()
    imptome.remove_patch(sd)
    assert np.array_equal(generate(sd), base)


def test_training_a_patched_unet_with_gradient_checkpointing_gives_the_same_gradients():
    """Gradients flow through merge and unmerge to the weights; plans are built without autograd, so
    gradient checkpointing's recomputation (which finds the step's plan built) saves what the first forward
    did (0.6.6 failed with a CheckpointError) and gives the same gradients as without checkpointing."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        unet = tiny_sd_unet().train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        imptome.apply_patch(unet, ratio=0.5, importance_start_step=0, merge_start_step=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no CFG in training: the fallback, with its warning
            unet(
                sample, torch.tensor([500, 500]), encoder_hidden_states=text
            ).sample.square().mean().backward()
        return {name: p.grad for name, p in unet.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own(sd):
    """copy.deepcopy (an EMA copy, a patched and a plain variant) gives a model that merges as the original
    does, through its own state, and unpatches alone. In 0.6.5 the copy's denoiser hooks drove the
    original's state while its layer hooks read the copy's, and the copy merged with stale plans."""
    base = generate(sd)
    imptome.apply_patch(sd, ratio=0.7)
    merged = generate(sd)
    copied = StableDiffusionPipeline(**{**sd.components, "unet": copy.deepcopy(sd.unet)})
    copied.set_progress_bar_config(disable=True)
    original_calls = patch_state(sd).calls
    assert np.array_equal(generate(copied), merged)
    assert patch_state(sd).calls == original_calls and patch_state(copied) is not patch_state(sd)
    imptome.remove_patch(copied)
    assert np.array_equal(generate(copied), base)
    assert np.array_equal(generate(sd), merged)


def test_patching_twice_equals_patching_once(sd):
    imptome.apply_patch(sd, ratio=0.7)
    once = generate(sd)
    imptome.apply_patch(sd, ratio=0.7)
    imptome.apply_patch(sd, ratio=0.7)
    assert np.array_equal(generate(sd), once)
    hooks = sum(len(m._forward_pre_hooks) for m in sd.unet.modules())
    imptome.remove_patch(sd)
    assert sum(len(m._forward_pre_hooks) for m in sd.unet.modules()) == 0 < hooks


class _PassThroughUNet(UNet2DConditionModel):
    """A subclass whose forward passes its arguments on unnamed, as wrappers in other libraries do."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def _with_unet_class(sd, unet_class: type) -> StableDiffusionPipeline:
    """`sd` with its UNet rebuilt as `unet_class` (a subclass of it), the same weights."""
    unet = unet_class.from_config(sd.unet.config)
    unet.load_state_dict(sd.unet.state_dict())
    pipe = StableDiffusionPipeline(**{**sd.components, "unet": unet.eval()})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_subclass_whose_forward_passes_its_arguments_on_is_patched_as_its_base(sd):
    """The timestep's position is read from the first class whose forward names it: apply_patch failed with
    "ValueError: 'timestep' is not in list"."""
    subclassed = _with_unet_class(sd, _PassThroughUNet)
    unet = subclassed.unet
    imptome.apply_patch(sd, ratio=0.7)
    imptome.apply_patch(subclassed, ratio=0.7)
    imptome.apply_patch(subclassed, ratio=0.7)
    assert np.array_equal(generate(subclassed), generate(sd))
    imptome.remove_patch(subclassed)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules()) == 0


class _Mixin:
    """A mixin without a forward, as libraries add to a model class (listed before it)."""


class _MixedInPassThroughUNet(_Mixin, _PassThroughUNet):
    pass


def test_a_mixin_without_forward_before_the_model_class_is_passed_over(sd):
    """The search for the forward that names the timestep read `forward` from every class of the MRO and
    failed on a mixin that has none: "AttributeError: type object '_Mixin' has no attribute 'forward'"."""
    mixed_in = _with_unet_class(sd, _MixedInPassThroughUNet)
    imptome.apply_patch(sd, ratio=0.7)
    imptome.apply_patch(mixed_in, ratio=0.7)
    assert np.array_equal(generate(mixed_in), generate(sd))


def test_same_seed_same_image_and_global_rng_untouched(sd):
    imptome.apply_patch(sd, ratio=0.7)
    first = generate(sd)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    second = generate(sd)
    assert np.array_equal(first, second)
    assert torch.equal(torch.rand(3), expected_next)  # imptome drew nothing from the global RNG


@pytest.mark.parametrize("guidance_scale", [0.0, 5.0], ids=["no-cfg", "cfg"])
def test_one_step_generations_back_to_back_are_reproducible(sd, guidance_scale):
    """One-step generations (turbo models) all call the denoiser at the same timestep, so the timestep
    going up cannot mark the next generation. A repeated first call of the same shape does (unless it is
    a split-CFG pair, whose second pass reuses the first's plans): the same seed gives the same image
    however many generations ran before, with different seeds in between too."""
    imptome.apply_patch(sd, ratio=0.7, method="tome")  # one step: ToMeSD's random cells either way

    def one_step(seed: int = 0) -> np.ndarray:
        return generate(sd, steps=1, seed=seed, guidance_scale=guidance_scale)

    first = one_step()
    others = [one_step(), one_step(seed=1), one_step(), one_step(seed=2), one_step()]
    assert all(np.array_equal(first, other) for other in others[::2])
    assert not np.array_equal(first, others[1])
    imptome.apply_patch(sd, ratio=0.7, method="tome")  # a fresh patch: the same image again
    assert np.array_equal(one_step(), first)


@pytest.mark.parametrize("method", ["importance", "tome"])
def test_merged_layers_see_n_minus_r_tokens(sd, method):
    imptome.apply_patch(sd, ratio=0.7, method=method)
    counts = query_token_counts(sd.unet, lambda: generate(sd, steps=3))
    n, r = 256, math.floor(256 * 0.7)
    for name, seen in counts.items():
        top_level = (
            ".0.attentions." in name
            and "down_blocks" in name
            or ".1.attentions." in name
            and "up_blocks" in name
        )
        if top_level and name.endswith("attn1"):
            assert seen == [n - r] * 3, name
        elif top_level:  # cross-attention: queries are not merged by default
            assert seen == [n] * 3, name
        else:
            assert seen == [64] * 3, name  # second level: untouched (ToMeSD's max_downsample=1)


def test_merge_kernels_change_nothing_outside_compiled_cuda_steps(sd):
    """merge_kernel "auto" (the default) and "triton" resolve to the Triton kernel where triton imports, and
    change nothing in eager steps on the CPU (they keep embedding_bag)."""
    pytest.importorskip("triton")
    imptome.apply_patch(sd, ratio=0.7, merge_kernel="embedding_bag")
    assert patch_state(sd).merge_kernel == "embedding_bag"
    base = generate(sd)
    for requested in ("auto", "triton"):
        imptome.apply_patch(sd, ratio=0.7, merge_kernel=requested)
        assert patch_state(sd).merge_kernel == "triton"
        assert np.array_equal(generate(sd), base), requested


@pytest.fixture
def without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "imptome.merge.kernels", raising=False)


def test_triton_merge_kernel_without_triton_is_a_clear_error(sd, without_triton):
    with pytest.raises(ValueError, match="merge_kernel='triton' needs the triton package"):
        imptome.apply_patch(sd, ratio=0.7, merge_kernel="triton")
    assert not imptome.is_patched(sd)


def test_default_merge_kernel_without_triton_is_embedding_bag(sd, without_triton):
    imptome.apply_patch(sd, ratio=0.7)
    assert patch_state(sd).merge_kernel == "embedding_bag"


def test_crossattn_and_mlp_options(sd):
    imptome.apply_patch(sd, ratio=0.5, merge_crossattn=True, merge_mlp=True, max_downsample=2)
    counts = query_token_counts(sd.unet, lambda: generate(sd, steps=2))
    assert {seen[0] for seen in counts.values()} == {256 - 128, 64 - 32}


def test_importance_map_is_channel_mean_of_cfg_difference(sd):
    outputs = []
    imptome.apply_patch(sd, ratio=0.7)
    handle = sd.unet.register_forward_hook(
        lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o.sample)
    )
    try:
        generate(sd, steps=3)
    finally:
        handle.remove()
    uncond, cond = outputs[-1].chunk(2)
    expected = (cond - uncond).abs().mean(dim=1)
    importance = imptome.importance_map(sd)
    assert importance.shape == (1, 16, 16)
    torch.testing.assert_close(importance, expected)


def test_merge_plan_records_roles_and_sources(sd):
    imptome.apply_patch(sd, ratio=0.7)
    generate(sd, steps=4)
    (record,) = imptome.merge_plan(sd)
    assert record.grid == (16, 16) and not record.pruned
    assert record.roles.shape == (2, 16, 16) and record.source.shape == (2, 256)
    assert torch.equal(record.roles[0], record.roles[1])  # both CFG halves share the plan
    n, r = 256, math.floor(256 * 0.7)
    assert int((record.roles[0] == MERGED).sum()) == r
    assert int((record.roles[0] == DESTINATION).sum()) == 64
    assert int((record.roles[0] == INDEPENDENT).sum()) == n - r - 64
    assert record.importance is not None  # built from the map of the previous step
    # kept tokens receive their own output; merged ones a destination's
    source, roles = record.source[0], record.roles[0].flatten()
    kept = roles != MERGED
    assert torch.equal(source[kept], torch.arange(n)[kept])
    assert bool((roles[source[~kept]] == DESTINATION).all())


@pytest.mark.parametrize("method", ["importance", "tome"])
def test_match_rows_each_matches_both_cfg_halves_on_their_own_tokens(sd, method):
    """match_rows="each" (the paper's and ToMeSD's matching): the two halves of an image keep one partition
    (the same destinations) but each half's sources go to the destinations most similar in its own tokens;
    the default shares the conditional half's matching. Planned per layer: the UNet's first merged layer
    comes before any cross-attention, so there both halves' tokens are equal. Without CFG both options are
    the same."""
    options = {"ratio": 0.7, "method": method, "plan_scope": "layer"}
    imptome.apply_patch(sd, match_rows="each", **options)
    each = generate(sd, steps=4)
    records = imptome.merge_plan(sd)
    first, *later = records
    for record in records:
        destinations = record.roles == DESTINATION
        assert torch.equal(destinations[0], destinations[1])
    assert torch.equal(first.source[0], first.source[1])
    assert not all(torch.equal(record.source[0], record.source[1]) for record in later)
    imptome.apply_patch(sd, **options)
    shared = generate(sd, steps=4)
    assert all(torch.equal(record.source[0], record.source[1]) for record in imptome.merge_plan(sd))
    assert not np.array_equal(each, shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-CFG warning
        unguided_shared = generate(sd, steps=4, guidance_scale=1.0)
        imptome.apply_patch(sd, match_rows="each", **options)
        assert np.array_equal(generate(sd, steps=4, guidance_scale=1.0), unguided_shared)


def test_default_matching_uses_the_conditional_half(sd):
    """The default (match_rows="cond") matches both copies of an image on the conditional copy's tokens:
    every layer's sources are those match_rows="each" gives the conditional row ([uncond, cond]: row 1)."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    importance = torch.rand(1, 16, 16, generator=generator)
    sources = {}
    for match_rows in ("cond", "each"):
        imptome.apply_patch(sd.unet, ratio=0.7, plan_scope="layer", match_rows=match_rows)
        state = patch_state(sd.unet)
        state.enter_step(10)  # past the warm-up, merging with this map
        state.importance, state.last_timestep = importance, 500.0
        with torch.no_grad():
            sd.unet(latent, 500, encoder_hidden_states=text)
        sources[match_rows] = [record.source for record in imptome.merge_plan(sd.unet)]
    for shared, each in zip(sources["cond"], sources["each"], strict=True):
        assert torch.equal(shared[0], shared[1]) and torch.equal(shared[1], each[1])
    assert any(not torch.equal(each[0], each[1]) for each in sources["each"])  # the halves' tokens differ


def test_cell_draws_change_with_the_call_and_the_seed_and_repeat_with_both(sd):
    """tome's destinations (a random position in every 2x2 cell) come from a key of (seed, call within the
    generation): new ones at every call, the same ones in every generation with that seed, and others with
    another seed."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)

    def destinations(seed: int) -> list[torch.Tensor]:
        imptome.apply_patch(sd.unet, ratio=0.5, method="tome", seed=seed)
        found = []
        with torch.no_grad():
            for _ in range(2):  # two generations
                for timestep in (900, 700, 500):
                    sd.unet(latent, timestep, encoder_hidden_states=text)
                    found.append(imptome.merge_plan(sd.unet)[0].roles == DESTINATION)
        return found

    first = destinations(0)
    assert all(not torch.equal(first[i], first[i + 1]) for i in (0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first[:3], first[3:], strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, destinations(1), strict=True))


def test_numpy_scalar_options_plan_as_python_numbers(sd):
    """Options given as NumPy scalars (a seed of np.int32, cells of np.int8) plan as the same Python numbers
    do: in their own width they wrapped around (an OverflowError at the first call for the seed, a
    shape error deep in the partition for the cells)."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)

    def roles(**options) -> torch.Tensor:
        imptome.apply_patch(sd.unet, ratio=0.5, method="tome", **options)
        with torch.no_grad():
            sd.unet(latent, 900, encoder_hidden_states=text)
        return imptome.merge_plan(sd.unet)[0].roles

    expected = roles(seed=3, sx=2, sy=2)
    assert torch.equal(roles(seed=np.int32(3), sx=np.int8(2), sy=np.int8(2)), expected)


def test_paper_partition_draws_destinations_from_the_pool(sd):
    imptome.apply_patch(sd, ratio=0.7, dst_selection="random", pool_factor=1.4)
    generate(sd, steps=4)
    (record,) = imptome.merge_plan(sd)
    n, r = 256, math.floor(256 * 0.7)
    order = record.importance[0].flatten().argsort(descending=True)
    num_pool = min(n, math.floor((n - r) * 1.4))
    roles = record.roles[0].flatten()
    assert bool((roles[order[num_pool:]] == MERGED).all())  # the least important tokens are always merged
    assert int((roles[order[:num_pool]] == DESTINATION).sum()) == 64  # every destination is in the pool


def test_warmup_prunes_then_merges(sd):
    imptome.apply_patch(sd, ratio=0.7)
    records = []
    callback = lambda pipe, i, t, kw: records.append(imptome.merge_plan(pipe)[0]) or kw  # noqa: E731
    generate(sd, steps=4, callback_on_step_end=callback)
    assert [rec.pruned for rec in records] == [True, True, False, False]
    assert [rec.importance is not None for rec in records] == [False, False, True, True]


def test_plan_scope_layer_plans_every_block(sd):
    imptome.apply_patch(sd, ratio=0.7, plan_scope="layer")
    generate(sd, steps=3)
    layers = [record.layer for record in imptome.merge_plan(sd)]
    assert len(layers) == len(set(layers)) == 5  # 2 down + 3 up blocks at the top level


def test_per_block_draws_do_not_move_when_more_sub_layers_are_merged(sd):
    """With plan_scope="layer" each block's random destinations are keyed by the block's position among the
    merged blocks, so merging its cross-attention or MLP too leaves the draws of every block as they were
    (0.6.8 keyed them by the sub-layer's position: every block after the first moved)."""

    def first_call_destinations(**options) -> dict[str, torch.Tensor]:
        imptome.apply_patch(sd, ratio=0.7, method="tome", plan_scope="layer", **options)
        generate(sd, steps=1)
        return {record.layer: record.roles == DESTINATION for record in imptome.merge_plan(sd)}

    attention_only = first_call_destinations()
    assert len(attention_only) == 5
    for options in ({"merge_crossattn": True}, {"merge_mlp": True}):
        moved = first_call_destinations(**options)
        assert moved.keys() == attention_only.keys()
        assert all(torch.equal(moved[block], attention_only[block]) for block in moved), options


def test_tome_partition_has_one_destination_per_cell(sd):
    imptome.apply_patch(sd, ratio=0.7, method="tome")
    generate(sd, steps=2)
    (record,) = imptome.merge_plan(sd)
    cells = (record.roles[0] == DESTINATION).view(8, 2, 8, 2).sum(dim=(1, 3))
    assert torch.equal(cells, torch.ones(8, 8, dtype=cells.dtype))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_default_partition_cells_place_destinations_importance_picks_the_rest(sd, ratio):
    imptome.apply_patch(sd, ratio=ratio)
    generate(sd, steps=4)
    (record,) = imptome.merge_plan(sd)
    roles = record.roles[0]
    cells = (roles == DESTINATION).view(8, 2, 8, 2).sum(dim=(1, 3))
    assert torch.equal(cells, torch.ones(8, 8, dtype=cells.dtype))  # destinations spread as in tome
    n = 256
    r = math.floor(n * ratio)
    assert int((roles == MERGED).sum()) == r
    # pool factor 1.0: the pool is the N - R most important tokens. Every source outside it is merged, so
    # the independent tokens are pool tokens, and only pool sources displaced by destinations outside the
    # pool are merged too.
    order = record.importance[0].flatten().argsort(descending=True)
    in_pool = torch.zeros(n, dtype=torch.bool)
    in_pool[order[: n - r]] = True
    roles = roles.flatten()
    is_dst = roles == DESTINATION
    assert bool(in_pool[roles == INDEPENDENT].all()) and int((roles == INDEPENDENT).sum()) == n - r - 64
    assert bool((roles[~in_pool & ~is_dst] == MERGED).all())
    assert int((in_pool & (roles == MERGED)).sum()) == int((~in_pool & is_dst).sum())


def test_the_pool_is_where_the_map_is_high_in_the_tokens_attention_sees(sd):
    """The map's (h, w) positions and the layer's token order line up: a map that is high on the top half
    of the latent makes exactly the top-half tokens the pool, checked on the tokens the attention receives
    (not on imptome's own records)."""
    unet = sd.unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = {}

    def keep(name):  # a pre-hook that records its first call's tokens and returns None (arguments unchanged)
        def hook(module, args):
            seen.setdefault(name, args[0][0])

        return hook

    before = attn.register_forward_pre_hook(keep("raw"))
    # pool factor 1.0 with destinations drawn from the pool: the N - R pool tokens are exactly the kept ones
    imptome.apply_patch(sd, ratio=0.5, dst_selection="random", pool_factor=1.0)
    after = attn.to_q.register_forward_pre_hook(keep("merged"))
    state = patch_state(unet)
    hot = torch.zeros(1, 16, 16)
    hot[:, :8, :] = 1.0 + torch.rand(1, 8, 16)  # the top 8 of 16 rows: 128 = N - R tokens
    state.enter_step(2)
    state.importance, state.last_timestep = hot, 500.0
    latent = torch.randn(1, 4, 16, 16).repeat(2, 1, 1, 1)  # a CFG batch: both halves equal
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    try:
        with torch.no_grad():
            unet(latent, 500, encoder_hidden_states=text)
    finally:
        before.remove()
        after.remove()
    raw, merged = seen["raw"], seen["merged"]  # [256, C] unmerged, [128, C] kept (destinations averaged)
    assert merged.shape[0] == 128
    # independent tokens (and destinations nothing merged into) reach attention unchanged: find them among
    # the raw tokens
    same = (merged[:, None, :] == raw[None, :, :]).all(-1)  # [128, 256]
    rows_matched, positions = same.nonzero(as_tuple=True)
    assert len(rows_matched) >= 128 - 64 and len(set(positions.tolist())) == len(positions)
    assert bool((positions < 128).all())  # all in the top half of the grid, where the map is high


def test_proportional_attention_passes_log_group_sizes_to_merged_self_attention(sd):
    masks = {}

    def record(name):
        def hook(module, args, kwargs):
            masks.setdefault(name, []).append(kwargs.get("attention_mask"))

        return hook

    attentions = {name: m for name, m in sd.unet.named_modules() if name.endswith(("attn1", "attn2"))}
    base = generate(sd, steps=3)
    imptome.apply_patch(sd, ratio=0.5, proportional_attention=True)
    handles = [m.register_forward_pre_hook(record(name), with_kwargs=True) for name, m in attentions.items()]
    try:
        merged = generate(sd, steps=3)
    finally:
        for handle in handles:
            handle.remove()
    for name, seen in masks.items():
        if name.endswith("attn1") and any(mask is not None for mask in seen):
            for mask in seen:  # [B, 1, K]: log of how many of the 256 tokens each kept token stands for
                assert mask.shape == (2, 1, 128)
                torch.testing.assert_close(mask.exp().sum(-1), torch.full((2, 1), 256.0))
        else:
            assert all(mask is None for mask in seen), name  # cross-attention and unmerged levels: no mask
    assert sum(any(m is not None for m in seen) for seen in masks.values()) == 5  # the 5 top-level attn1
    assert not np.array_equal(merged, base) and np.isfinite(merged).all()


@pytest.mark.parametrize("processor", [AttnProcessor(), SlicedAttnProcessor(1)], ids=["classic", "sliced"])
def test_proportional_attention_on_a_half_precision_unet_that_upcasts_its_attention(processor):
    """A UNet built with upcast_attention=True (SD 2.1's) adds the mask to float32 scores in the classic and
    sliced processors, so it gets a float32 mask even in a bf16 model (0.6.6 passed a bf16 one, and
    torch.baddbmm refused it); SDPA's processor gets one in the queries' dtype."""
    sd = tiny_sd_pipeline()
    sd.unet = tiny_sd_unet(upcast_attention=True)
    sd.to(torch.bfloat16)
    imptome.apply_patch(sd, ratio=0.5, proportional_attention=True)
    top_attn1 = sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    masks = []
    top_attn1.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )

    def latents() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return sd(PROMPT, num_inference_steps=3, generator=generator, output_type="latent").images

    latents()
    assert [mask.dtype for mask in masks] == [torch.bfloat16] * 3
    masks.clear()
    sd.unet.set_attn_processor(processor)
    assert latents().isfinite().all()
    assert [mask.dtype for mask in masks] == [torch.float32] * 3
    torch.testing.assert_close(
        masks[-1].exp().sum(-1), torch.full((2, 1), 256.0), rtol=0.01, atol=0
    )  # bf16 logs


def test_an_attn1_over_the_text_is_merged_as_cross_attention(sd):
    """UNets built with only_cross_attention (the SD 2 x4 upscaler's) have an attn1 whose keys are the text:
    its queries are merged, but proportional attention's mask over kept image tokens is not passed to it
    (0.6.5 did, and diffusers failed on a 77-key attention given a 128-key mask). With CFG and no other
    self-attention, proportional attention then changes nothing."""
    pipe = StableDiffusionPipeline(**{**sd.components, "unet": tiny_sd_unet(only_cross_attention=True)})
    pipe.set_progress_bar_config(disable=True)
    latents = {}
    for proportional in (False, True):
        imptome.apply_patch(pipe, ratio=0.5, proportional_attention=proportional)
        run = lambda proportional=proportional: latents.setdefault(proportional, generate(pipe))  # noqa: E731
        counts = query_token_counts(pipe.unet, run)
        assert counts["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [128] * 4
    assert np.array_equal(latents[True], latents[False])


def test_proportional_attention_with_xformers_and_an_unaligned_key_count_is_a_clear_error():
    from diffusers.models.attention_processor import XFormersAttnProcessor

    pipe = tiny_sd_pipeline()
    pipe.unet.set_attn_processor(XFormersAttnProcessor())  # made without xformers; never reached here
    imptome.apply_patch(pipe, ratio=0.7, proportional_attention=True)  # 256 - 179 = 77 kept tokens
    with pytest.raises(ValueError, match=r"77 kept tokens, and XFormersAttnProcessor cannot take a mask"):
        generate(pipe, steps=2)


def test_non_square_odd_grid_and_several_prompts(sd):
    imptome.apply_patch(sd, ratio=0.7)
    generator = torch.Generator().manual_seed(0)
    run = lambda: sd(  # noqa: E731
        [PROMPT, "a blue square"],
        height=72,
        width=104,
        num_inference_steps=3,
        generator=generator,
        output_type="latent",
    )
    counts = query_token_counts(sd.unet, run)
    n = 9 * 13
    assert counts["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [n - math.floor(n * 0.7)] * 3
    assert imptome.importance_map(sd).shape == (2, 9, 13)
    (record,) = imptome.merge_plan(sd)
    assert record.roles.shape == (4, 9, 13)
    assert torch.equal(record.roles[:2], record.roles[2:])  # [uncond x2, cond x2] rows share plans per image


@pytest.mark.parametrize(
    ("options", "tokens"),
    [
        ({"sx": 4, "sy": 4}, [15, 15, 15]),
        # steps 0-1 (before importance_start_step) partition into 2 x 2 cells, which this grid has room for
        ({"dst_selection": "random", "dst_fraction": 0.05}, [8, 8, 15]),
    ],
)
def test_a_grid_without_room_for_a_destination_is_left_unmerged(sd, options, tokens):
    """A 3 x 5 top level holds no full 4 x 4 cell, and 15 * 0.05 tokens round to no pool destination: that
    grid is not merged (0.6.5 failed in the similarity's max over no destinations)."""
    imptome.apply_patch(sd, ratio=0.5, **options)
    counts = query_token_counts(sd.unet, lambda: generate(sd, steps=3, height=24, width=40))
    assert counts["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == tokens


def test_no_cfg_warns_once_and_makes_no_map(sd):
    imptome.apply_patch(sd, ratio=0.7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counts = query_token_counts(sd.unet, lambda: generate(sd, steps=3, guidance_scale=1.0))
        generate(sd, steps=3, guidance_scale=1.0)
    ours = [w for w in caught if "imptome" in str(w.message)]
    assert len(ours) == 1 and "classifier-free guidance" in str(ours[0].message)
    assert ours[0].filename == __file__  # attributed to the pipeline call here, not to torch's hook code
    assert counts["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [256 - 179] * 3
    assert imptome.importance_map(sd) is None


def test_ratio_zero_does_not_warn_about_calls_without_cfg(sd):
    """Ratio 0 merges nothing: a warning that such calls 'merge without importance' would be wrong."""
    imptome.apply_patch(sd, ratio=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(sd, steps=3, guidance_scale=1.0)
    assert [str(w.message) for w in caught if "imptome" in str(w.message)] == []


@pytest.mark.parametrize(
    ("fallback", "cells", "says"), [("tome", (4, 2), "random 4x2-cell"), ("random", (2, 2), "random map")]
)
def test_the_warning_about_calls_without_cfg_names_the_fallback(sd, fallback, cells, says):
    imptome.apply_patch(sd, ratio=0.5, fallback=fallback, sx=cells[0], sy=cells[1])
    with pytest.warns(UserWarning, match="no classifier-free guidance") as caught:
        generate(sd, steps=3, guidance_scale=1.0)
    assert says in str(caught[0].message) and f"(fallback: {fallback})" in str(caught[0].message)


def test_no_cfg_fallback_tome_is_tomesd_and_random_keeps_a_random_pool(sd):
    def plans_and_latents(**options):
        imptome.apply_patch(sd, ratio=0.7, merge_start_step=0, **options)
        records = []
        callback = lambda pipe, i, t, kw: records.append(imptome.merge_plan(pipe)[0]) or kw  # noqa: E731
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            latents = generate(sd, steps=4, guidance_scale=1.0, callback_on_step_end=callback)
        return records, latents

    tome, tome_latents = plans_and_latents(method="tome")
    fallback_tome, fallback_tome_latents = plans_and_latents(fallback="tome")
    fallback_random, fallback_random_latents = plans_and_latents()  # the default without prop. attention
    # From importance_start_step (2) on there is no map: "tome" merges exactly as ToMeSD does ...
    assert np.array_equal(fallback_tome_latents, tome_latents)
    # ... "random" keeps as many tokens, but picks the independent ones from a random pool.
    assert torch.equal(fallback_random[1].source, tome[1].source)  # step 1: warm-up cells in both
    for step in (2, 3):
        assert not torch.equal(fallback_random[step].source, tome[step].source)
        kept = [int((r[step].roles != MERGED).sum()) for r in (fallback_random, tome)]
        assert kept[0] == kept[1] == 256 - 179  # one row: no CFG batch
        assert fallback_random[step].importance is None  # no CFG map was used
    assert not np.array_equal(fallback_random_latents, tome_latents)
    assert np.array_equal(plans_and_latents()[1], fallback_random_latents)  # the random map is seeded
    # the default ("auto") is "tome" with proportional attention
    prop_tome = plans_and_latents(method="tome", proportional_attention=True)[1]
    assert np.array_equal(plans_and_latents(proportional_attention=True)[1], prop_tome)


def test_fallback_does_not_change_guided_generations(sd):
    imptome.apply_patch(sd, ratio=0.7, fallback="tome")  # the default would be "random"
    tome = generate(sd)
    imptome.apply_patch(sd, ratio=0.7, fallback="random")
    assert np.array_equal(generate(sd), tome)


def test_map_from_another_image_is_never_reused(sd):
    imptome.apply_patch(sd, ratio=0.7, importance_start_step=0)  # a map would be used from step 0
    generate(sd, steps=3)
    records = []
    callback = lambda pipe, i, t, kw: records.append(imptome.merge_plan(pipe)[0]) or kw  # noqa: E731
    generate(sd, steps=3, seed=1, callback_on_step_end=callback)
    assert records[0].importance is None  # a new generation starts without a map


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_denoiser_keeps_dtype(dtype):
    unet = tiny_sd_pipeline().unet.to(dtype)
    imptome.apply_patch(unet, ratio=0.7, importance_start_step=1, proportional_attention=True)
    masks = []
    unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1").register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    latents = torch.randn(1, 4, 16, 16, dtype=dtype).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, 32, dtype=dtype)
    with torch.no_grad():
        for t in (900, 800):
            out = unet(latents, t, encoder_hidden_states=text).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert imptome.merge_plan(unet)[0].importance is not None
    # the proportional-attention mask has the queries' dtype: cuDNN's SDPA on Hopper misreads a float32
    # mask given with half-precision queries (pytorch/pytorch#191612)
    assert [mask.dtype for mask in masks] == [dtype, dtype]


def test_attention_only_in_the_up_blocks_counts_for_the_finest_level():
    """A UNet whose down blocks have no attention but whose up blocks do, at full resolution too: the finest
    attention level is 1, so max_downsample=1 is accepted and merges the up blocks' full-resolution
    self-attention (0.6.7's first refusal looked at the down blocks only)."""
    unet = tiny_sd_unet(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    assert finest_attention_downsample(unet) == 1
    imptome.apply_patch(unet, ratio=0.5, max_downsample=1, importance_start_step=0, merge_start_step=0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)  # a CFG batch
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts = query_token_counts(unet, lambda: unet(latents, 900, encoder_hidden_states=text))
    assert counts["up_blocks.1.attentions.0.transformer_blocks.0.attn1"] == [128]  # 16 x 16, ratio 0.5
    assert counts["up_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [64]  # 8 x 8: not merged


def test_sdxl_with_top_level_attention():
    pipe = tiny_sdxl_pipeline()
    imptome.apply_patch(pipe, ratio=0.7)
    counts = query_token_counts(pipe.unet, lambda: generate(pipe, steps=2))
    assert counts["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == [256 - 179] * 2
    assert counts["down_blocks.1.attentions.0.transformer_blocks.0.attn1"] == [64] * 2


def test_bad_ratio_and_bad_target_raise_clear_errors(sd):
    with pytest.raises(ValueError, match=r"allowed 0 <= ratio <= 0.75"):
        imptome.apply_patch(sd, ratio=0.9)
    with pytest.raises(ValueError, match=r"method="):
        imptome.apply_patch(sd, method="random")
    with pytest.raises(TypeError, match="cannot patch Linear objects: .*UNet2DConditionModel"):
        imptome.apply_patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot patch the AutoencoderKL of this Pipe: supported .*PixArt"):
        imptome.apply_patch(type("Pipe", (), {"transformer": sd.vae})())  # e.g. Flux's transformer
    with pytest.raises(TypeError, match="cannot unpatch Linear objects"):
        imptome.remove_patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cannot inspect AutoencoderKL objects"):
        imptome.importance_map(sd.vae)
    assert not imptome.is_patched(sd.vae) and not imptome.is_patched("a string")
    imptome.apply_patch(sd.unet)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 77, sd.unet.config.cross_attention_dim)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'timestep'"):
        sd.unet(sample, encoder_hidden_states=text)  # diffusers' own error, not one from imptome's hook
    imptome.remove_patch(sd.unet)
    for look_up in (imptome.importance_map, imptome.merge_plan):  # forgot to patch: say so
        with pytest.raises(ValueError, match="this StableDiffusionPipeline is not patched.*apply_patch"):
            look_up(sd)
    with pytest.raises(TypeError, match="unknown MergeConfig option"):
        imptome.apply_patch(sd, rato=0.5)
    with pytest.raises(TypeError, match=r"config must be an imptome.MergeConfig, got dict; pass options as"):
        imptome.apply_patch(sd, {"ratio": 0.5})
    with pytest.raises(ValueError, match=r"seed=-1 must be a non-negative int"):
        imptome.apply_patch(sd, seed=-1)
    assert not imptome.is_patched(sd)


@pytest.mark.parametrize("dst_selection", ["random", "topk"])
def test_the_largest_allowed_ratio_runs_through_warm_up_and_fallback(sd, dst_selection):
    """max_ratio bounds every partition of a generation: the warm-up step and calls without CFG use ToMeSD's
    cells whatever dst_selection says (0.6.5 allowed 0.8 with dst_fraction=0.2 and failed in step 0)."""
    config = imptome.MergeConfig(dst_selection=dst_selection, dst_fraction=0.2, fallback="tome")
    imptome.apply_patch(sd, config.replace(ratio=config.max_ratio))
    top = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "imptome: this denoiser call has no classifier-free guidance")
        for guidance in (7.5, 1.0):
            run = functools.partial(generate, sd, steps=3, guidance_scale=guidance)
            counts = query_token_counts(sd.unet, run)
            assert counts[top] == [256 - math.floor(256 * config.max_ratio)] * 3  # 64 of 256 at 0.75
            assert np.isfinite(run()).all()


def test_an_image_whose_prompt_is_its_negative_prompt_merges_with_a_random_map(sd):
    """Equal conditional and unconditional predictions make a zero map, whose ranks are ties that topk broke
    by position (0.7.0 kept every independent token in the bottom half of the image): a random map stands
    in for that image's, with a warning, and the other images of the batch keep theirs. The image's plans
    are the same alone as next to a prompted image."""
    imptome.apply_patch(sd, ratio=0.5)

    def roles_of(prompts: list[str]) -> list[torch.Tensor]:
        """Roles [B, 16, 16] of every call, with negative prompt "" for every image."""
        calls = []
        handle = sd.unet.register_forward_hook(lambda *_: calls.append(imptome.merge_plan(sd)[0].roles))
        generators = [torch.Generator().manual_seed(seed) for seed in range(len(prompts))]
        try:
            sd(
                prompts,
                negative_prompt=[""] * len(prompts),
                num_inference_steps=5,
                generator=generators,
                output_type="latent",
            )
        finally:
            handle.remove()
        return calls

    with pytest.warns(UserWarning, match="for 1 of 2 image.s. the conditional and unconditional predictions"):
        batch = roles_of(["", PROMPT])
    imptome.apply_patch(sd, ratio=0.5)  # a new patch warns again (once per patch)
    with pytest.warns(UserWarning, match="for 1 of 1 image"):
        alone = roles_of([""])
    assert imptome.importance_map(sd).abs().max() == 0
    for step, (both, one) in enumerate(zip(batch, alone, strict=True)):
        assert torch.equal(both[0], one[0]) and torch.equal(both[2], one[1]), f"step {step}"  # both halves
        independent = both[0] == INDEPENDENT
        assert independent[:8].any() and independent[8:].any(), f"step {step}: kept tokens piled up"
    assert not torch.equal(batch[-1][1], batch[-1][0])  # the prompted image has its own plan
    imptome.apply_patch(sd, ratio=0.5, method="tome")  # no map ranks tome's tokens: nothing to check or say
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome: for .* the conditional and unconditional")
        roles_of([""])


def test_ranking_keys_order_as_the_map_does():
    """In a batch where some images' maps are zero, the others' maps rank tokens as int64 keys beside the
    random map's draws (no float64, which Apple GPUs lack): the keys order exactly as the floats, ties
    included (0.0 and -0.0 too), so topk picks the same tokens."""
    values = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-30, 30, 4000)
    values[::7], values[::11], values[::13] = 0.0, -0.0, 2.5  # ties
    values[:4] = torch.tensor([float("inf"), float("-inf"), 1e-45, -1e-45])  # extremes and subnormals
    keys = _ranking_keys(values)
    assert keys.dtype == torch.int64
    assert torch.equal(keys.sort(stable=True).indices, values.sort(stable=True).indices)
    assert torch.equal(keys.topk(1500).indices, values.topk(1500).indices)


def test_unet_without_transformer_blocks_is_refused_at_patch_time():
    """DeepFloyd IF / Kandinsky-style UNets attend in SimpleCrossAttn blocks: nothing imptome can merge. Such
    a patch used to be accepted and fail at the first call with an error about torch.compile."""
    unet = tiny_sd_unet(
        down_block_types=("SimpleCrossAttnDownBlock2D",) * 2,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 2,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    )
    with pytest.raises(
        ValueError,
        match="no transformer blocks over the image tokens that imptome knows \\(its attention sits in "
        "SimpleCrossAttnDownBlock2D, SimpleCrossAttnUpBlock2D, UNetMidBlock2DSimpleCrossAttn\\)",
    ):
        imptome.apply_patch(unet)
    assert not imptome.is_patched(unet)


def generate_with_cfg_cut_off(pipe, steps: int, on_step=None) -> np.ndarray:
    """`generate` with diffusers' documented CFG cut-off: the unconditional half is dropped after step 2.
    `on_step(pipe)` runs at the end of every step, before the cut."""

    def cut_cfg_after_step_2(pipe, step, timestep, callback_kwargs):
        if on_step is not None:
            on_step(pipe)
        if step == 2:
            pipe._guidance_scale = 0.0
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
        return callback_kwargs

    return generate(
        pipe,
        steps=steps,
        callback_on_step_end=cut_cfg_after_step_2,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )


def test_cfg_cut_off_merges_the_unguided_steps_without_a_map(sd):
    imptome.apply_patch(sd, ratio=0.7, importance_start_step=1)
    records = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generate_with_cfg_cut_off(sd, 5, on_step=lambda pipe: records.append(imptome.merge_plan(pipe)[0]))
    assert [r.roles.shape[0] for r in records] == [2, 2, 2, 1, 1]
    assert [r.importance is not None for r in records] == [False, True, True, False, False]


def test_split_cfg_pairs_make_the_map_and_later_passes_do_not():
    """Split CFG by hand: conditional and unconditional passes as separate calls on the same latents, then
    a third pass at the same timestep (as perturbed-attention guidance adds). The first two calls of a step
    are the pair: the map is |cond - uncond| of their outputs, and the third pass merges with it without
    replacing it. A repeated timestep with other latents (Zero123++'s reference pass) is no pair."""
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    cond, uncond, perturbed = torch.randn(3, 1, 77, TEXT_HIDDEN, generator=generator)
    records = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome")
        for t in (900, 700, 500, 300):
            eps_cond = unet(latent, t, encoder_hidden_states=cond).sample
            eps_uncond = unet(latent, t, encoder_hidden_states=uncond).sample
            eps_perturbed = unet(latent, t, encoder_hidden_states=perturbed).sample
            records.append(imptome.merge_plan(unet))
            latent = latent - 0.1 * (eps_uncond + 3 * (eps_cond - eps_uncond) + eps_perturbed)
    expected = (eps_cond - eps_uncond).abs().mean(dim=1)
    torch.testing.assert_close(imptome.importance_map(unet), expected)
    (third_pass,) = records[-1]
    assert third_pass.importance is not None and not third_pass.pruned

    other = torch.randn(1, 4, 16, 16, generator=generator)
    with torch.inference_mode(), pytest.warns(UserWarning, match="no classifier-free guidance"):
        for t in (900, 700, 500, 300):  # a new generation: same timestep, other latents, so no pairs
            unet(latent, t, encoder_hidden_states=cond)
            unet(other, t, encoder_hidden_states=uncond)
    assert imptome.importance_map(unet) is None


def split_cfg_case():
    """A tiny UNet patched at ratio 0.5, its patch state, a latent [1, 4, 16, 16] and two text embeddings
    [1, 77, D] for split CFG by hand."""
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    cond, uncond = torch.randn(2, 1, 77, TEXT_HIDDEN, generator=generator)
    return unet, patch_state(unet), latent, cond, uncond


def test_split_cfg_pair_of_one_tensor_is_found_without_comparing(monkeypatch):
    """Two passes on the same latent tensor are a pair without comparing values (which waits for the GPU),
    unless the tensor was written between them; equal values in another tensor are compared."""
    unet, state, latent, cond, uncond = split_cfg_case()
    compared = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(a.shape) or equal(a, b))
    with torch.no_grad():
        unet(latent, 900, encoder_hidden_states=cond)
        unet(latent, 900, encoder_hidden_states=uncond)
        assert state.paired and compared == []
        unet(latent, 700, encoder_hidden_states=cond)
        unet(latent.clone(), 700, encoder_hidden_states=uncond)
        assert state.paired and len(compared) == 1
        unet(latent, 500, encoder_hidden_states=cond)
        latent.mul_(0.5)  # written in place: not the sample of the first pass any more
        unet(latent, 500, encoder_hidden_states=uncond)
        assert not state.paired and len(compared) == 1


def test_split_cfg_passes_without_tensor_arguments_still_pair(monkeypatch):
    """The very same conditioning tensors make a second call a repeat, not a pair (Attend-and-Excite); a
    call whose conditioning is not among its tensor arguments (only in a dict, e.g. `added_cond_kwargs`)
    gives nothing to tell by, and its passes pair as they did before that rule."""
    unet, state, latent, cond, _ = split_cfg_case()
    with torch.no_grad():
        unet(latent, 900, encoder_hidden_states=cond)
        unet(latent, 900, encoder_hidden_states=cond)
        assert not state.paired
        begin_call = state.begin_call  # the hook then finds no other tensor argument
        monkeypatch.setattr(
            state, "begin_call", lambda sample, timestep, conditioning: begin_call(sample, timestep)
        )
        unet(latent, 700, encoder_hidden_states=cond)
        unet(latent, 700, encoder_hidden_states=cond)
        assert state.paired


@pytest.mark.parametrize("made_per_call", [False, True], ids=["schedule-view", "tensor-per-evaluation"])
def test_split_cfg_with_heun_pairs_both_evaluations_of_a_timestep(made_per_call):
    """Heun evaluates every timestep after the first twice, at two samples: with split CFG that is two
    pairs at one timestep. The second pass of each pair reuses its first pass's plans, each pair makes the
    map from its own outputs, and each merges with the map its own evaluation (first or second) made at the
    timestep before."""
    unet, state, latent, cond, uncond = split_cfg_case()
    scheduler = HeunDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    latent = latent * scheduler.init_noise_sigma
    paired, pair_steps, merged_with_map = [], [], 0
    made = {}  # (step, evaluation at its timestep) -> the map its pair made
    timesteps = scheduler.timesteps.tolist()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            sample = scheduler.scale_model_input(latent, t)
            timestep = torch.full((1,), float(t)) if made_per_call else t
            first = unet(sample, timestep, encoder_hidden_states=cond).sample
            first_plans = [(r.roles, r.source) for r in imptome.merge_plan(unet)]
            step, evaluation = state.step, timesteps[:i].count(timesteps[i])
            finest = imptome.merge_plan(unet)[0]
            if finest.importance is not None:
                assert torch.equal(finest.importance, made[(step - 1, evaluation)])
                merged_with_map += 1
            second = unet(sample, timestep, encoder_hidden_states=uncond).sample
            paired.append(state.paired)
            pair_steps.append(state.step)
            for (roles, source), record in zip(first_plans, imptome.merge_plan(unet), strict=True):
                assert torch.equal(roles, record.roles) and torch.equal(source, record.source)
            made[(step, evaluation)] = imptome.importance_map(unet)
            torch.testing.assert_close(made[(step, evaluation)], (first - second).abs().mean(dim=1))
            latent = scheduler.step(second + 3 * (first - second), t, latent).prev_sample
    assert len(scheduler.timesteps) == 7 and all(paired)
    assert pair_steps == [0, 1, 1, 2, 2, 3, 3]
    assert merged_with_map == 4  # steps 2 and 3 (the warm-up ends at importance_start_step 2), both pairs


def test_split_cfg_pair_survives_its_first_pass_memory_being_reused():
    """Under CUDA graphs (torch.compile(mode="reduce-overhead")) the second pass of a split-CFG pair replays
    into the memory of the first pass's output and of the plans built in it. Simulated by overwriting both
    as the second pass's first layer starts: the pair must give the same outputs and plan records as
    without the overwrite, and the map must be |first - second| of the outputs as they were returned."""
    unet, state, start, cond, uncond = split_cfg_case()

    def pairs(overwrite: bool) -> list[torch.Tensor]:
        results, latent = [], start
        for t in (900, 700, 500, 300):
            first = unet(latent, t, encoder_hidden_states=cond).sample
            returned = first.clone()
            first_plans = list(state.plans.values())

            def reuse_memory(*_, first=first, first_plans=first_plans):
                first.fill_(float("nan"))
                for built in first_plans:
                    plan = built.plan
                    for f in dataclasses.fields(plan):  # every stored tensor (`slot` is made on request)
                        tensor = getattr(plan, f.name)
                        if isinstance(tensor, torch.Tensor):  # bag_order: None while the warm-up prunes
                            tensor.zero_()
                    if built.importance is not None:
                        built.importance.fill_(float("nan"))

            handle = unet.conv_in.register_forward_pre_hook(reuse_memory) if overwrite else None
            second = unet(latent, t, encoder_hidden_states=uncond).sample
            if handle is not None:
                handle.remove()
            expected_map = (returned - second).abs().mean(dim=1)
            torch.testing.assert_close(imptome.importance_map(unet), expected_map)
            (record,) = imptome.merge_plan(unet)
            results += [returned, second.clone(), record.roles, record.source]
            if record.importance is not None:
                results.append(record.importance)
            latent = latent - 0.1 * (second + 3 * (returned - second))
        return results

    with torch.inference_mode():
        clean = pairs(overwrite=False)
        reused = pairs(overwrite=True)
    for call, (got, want) in enumerate(zip(reused, clean, strict=True)):
        assert torch.equal(got, want), f"call {call}"


def test_cfg_layout_is_compared_until_two_calls_agree(sd, monkeypatch):
    """Comparing the CFG halves waits for the GPU, so each input shape's layout is compared only until two
    calls in a row agree, then kept for the generation: 2 comparisons for a CFG generation, 2 more after a
    CFG cut-off (a new batch shape), and 3 for two images without CFG that start from equal noise (taken
    for a CFG batch at their first step, as always, and told apart from their second)."""
    imptome.apply_patch(sd, ratio=0.5)
    state = patch_state(sd.unet)
    compared = []
    compare = type(state)._compare_chunks
    monkeypatch.setattr(
        type(state),
        "_compare_chunks",
        lambda self, sample: compared.append(sample.shape[0]) or compare(self, sample),
    )
    generate(sd, steps=5)
    assert compared == [2, 2] and state.copies == 2

    compared.clear()
    with pytest.warns(UserWarning, match="no classifier-free guidance"):
        generate_with_cfg_cut_off(sd, 6)
    assert compared == [2, 2, 1, 1] and state.copies == 1

    compared.clear()
    same_noise = [torch.Generator().manual_seed(0) for _ in range(2)]
    prompts = ["a red circle", "a blue square"]
    sd(prompts, num_inference_steps=5, guidance_scale=1.0, generator=same_noise, output_type="latent")
    assert compared == [2, 2, 2]
    assert state.layouts[torch.Size([2, 4, 16, 16])] == ((1, 0, None), True)


def _variant_pipeline(sd, variant: str):
    """The tiny SD pipeline's parts as another pipeline of the SD family, with its call arguments."""
    from diffusers import (
        HeunDiscreteScheduler,
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    image = torch.rand(1, 3, 128, 128)
    if variant == "img2img":
        images = image.repeat(2, 1, 1, 1)  # one per prompt; strength 0.75 runs 3 steps, the third guided
        return StableDiffusionImg2ImgPipeline(**sd.components), dict(image=images, strength=0.75)
    if variant == "inpaint":  # 9 input channels: latents, mask, masked image (equal in both CFG halves)
        mask = torch.zeros(1, 1, 128, 128)
        mask[..., 32:96, 32:96] = 1
        pipe = StableDiffusionInpaintPipeline(**dict(sd.components, unet=tiny_sd_unet(in_channels=9, seed=3)))
        return pipe, dict(image=image, mask_image=mask)
    if variant == "heun":  # second order: two calls per timestep after the first, with different latents
        scheduler = HeunDiscreteScheduler.from_config(sd.scheduler.config)
        return StableDiffusionPipeline(**dict(sd.components, scheduler=scheduler)), {}
    # LCM: guidance embedded in the UNet (time_cond_proj_dim), so the batch has no CFG copies
    scheduler = LCMScheduler.from_config(sd.scheduler.config)
    unet = tiny_sd_unet(time_cond_proj_dim=32, seed=4)
    return StableDiffusionPipeline(**dict(sd.components, unet=unet, scheduler=scheduler)), {}


@pytest.mark.parametrize("variant", ["img2img", "inpaint", "heun", "lcm"])
def test_img2img_inpainting_second_order_and_lcm_pipelines(sd, variant):
    """Pipelines of the SD family with other inputs or schedules: every call merges, the CFG batch is found
    (LCM has none: warned, fallback map), the same seed gives the same images, and a second-order
    scheduler's two calls at one timestep count as one step of the warm-up schedule."""
    pipe, kwargs = _variant_pipeline(sd, variant)
    imptome.apply_patch(pipe, ratio=0.5)
    calls = []

    def run():
        generator = torch.Generator().manual_seed(0)
        out = pipe(["a", "b"], num_inference_steps=4, generator=generator, output_type="latent", **kwargs)
        return out.images

    guided = variant != "lcm"
    handle = pipe.unet.register_forward_hook(lambda *_: calls.append(imptome.merge_plan(pipe)[0]))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = query_token_counts(pipe.unet, run)
            calls.clear()
            first = run()
        torch.testing.assert_close(run(), first, rtol=0, atol=0)
    finally:
        handle.remove()
    assert guided != any("no classifier-free guidance" in str(w.message) for w in caught)
    assert set(tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]) == {128}
    assert all(record.roles.shape[0] == (4 if guided else 2) for record in calls)
    assert (calls[-1].importance is not None) == guided
    if variant == "heun":  # timesteps t0, t1, t1, t2, t2, t3, t3: warm-up (pruning) is steps 0-1
        assert [record.pruned for record in calls[:7]] == [True] * 3 + [False] * 4


def test_panorama_crops_merge_with_the_map_of_their_own_crop():
    """MultiDiffusion (StableDiffusionPanoramaPipeline) calls the denoiser once per crop of the panorama at
    every timestep. Each crop's call merges with the map its own crop made in the step before; 0.6.7 used
    the map of the call before it, which belongs to another crop."""
    from diffusers import StableDiffusionPanoramaPipeline

    pipe = StableDiffusionPanoramaPipeline(**tiny_sd_pipeline().components)
    imptome.apply_patch(pipe, ratio=0.5, importance_start_step=1)  # maps from step 1 on
    made, used, keys = [], [], []

    def record(*_):
        made.append(imptome.importance_map(pipe))
        keys.append(int(patch_state(pipe).call_key))
        finest = max(imptome.merge_plan(pipe), key=lambda record: record.grid[0] * record.grid[1])
        used.append(finest.importance)

    pipe.unet.register_forward_hook(record)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome")
        # latent 16 x 80: three crops of 16 x 64 (the window), 8 latent columns apart
        pipe("a", height=128, width=640, num_inference_steps=5, output_type="latent")
    crops = 3
    assert len(made) == 5 * crops and all(m.shape == (1, 16, 64) for m in made)
    assert all(u is None for u in used[:crops])  # step 0: no map yet
    assert len(set(keys)) == len(keys)  # one generation: each call its own draws, step 0's crops included
    for call in range(crops, len(used)):
        same_crop_step_before, call_before = made[call - crops], made[call - 1]
        assert not torch.equal(same_crop_step_before, call_before)  # the two candidates differ
        assert torch.equal(used[call], same_crop_step_before)


def test_calls_repeated_at_one_timestep_keep_a_bounded_number_of_maps(monkeypatch):
    """Maps are kept per call position within a step; a loop of calls at one timestep (as benchmarks run)
    keeps at most _POSITIONS_KEPT of them, and its later calls merge with the latest map."""
    from imptome.patch import state as state_module

    monkeypatch.setattr(state_module, "_POSITIONS_KEPT", 3)
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5, importance_start_step=1)
    state = patch_state(unet)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    with torch.no_grad():
        unet(latent, 900, encoder_hidden_states=text)
        for _ in range(8):
            latest = imptome.importance_map(unet)
            unet(latent, 700, encoder_hidden_states=text)
            assert torch.equal(imptome.merge_plan(unet)[0].importance, latest)
    assert state.position == 7 and sorted(state.maps_now) == [0, 1, 2]


def test_sega_pipeline_is_refused_with_importance_and_merges_with_tome():
    """SEGA sends [uncond, cond, edit 1, ..., edit n] copies: with two editing prompts the four copies pass
    for a CFG batch of two images, and 0.6.7 made the map from the wrong copies without a word."""
    from diffusers import SemanticStableDiffusionPipeline

    parts = tiny_sd_pipeline().components
    pipe = SemanticStableDiffusionPipeline(**{name: parts[name] for name in parts if name != "image_encoder"})
    with pytest.raises(
        ValueError, match="SemanticStableDiffusionPipeline: SEGA sends 2 \\+ n copies.*'tome'"
    ):
        imptome.apply_patch(pipe, ratio=0.5)
    assert patch_state(pipe) is None
    imptome.apply_patch(pipe, ratio=0.5, method="tome")
    tokens = query_token_counts(
        pipe.unet, lambda: pipe("a", editing_prompt=["x", "y"], num_inference_steps=2, output_type="latent")
    )
    assert set(tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]) == {128}


def _instruct_pix2pix_pipeline(family: str):
    """A tiny InstructPix2Pix pipeline of SD or SDXL: its UNet takes 8 channels, the latents and the input
    image's latents."""
    from diffusers import (
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionXLInstructPix2PixPipeline,
        UNet2DConditionModel,
    )

    if family == "sd":
        base = tiny_sd_pipeline()
        unet = tiny_sd_unet(in_channels=8, seed=2)
        return StableDiffusionInstructPix2PixPipeline(**dict(base.components, unet=unet))
    parts = tiny_sdxl_pipeline().components
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config(dict(parts["unet"].config, in_channels=8)).eval()
    kept = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    pipe = StableDiffusionXLInstructPix2PixPipeline(
        **{name: parts[name] for name in kept}, unet=unet, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_instruct_pix2pix_batch_of_three_copies_shares_one_plan_per_image_and_makes_the_map(family):
    """InstructPix2Pix sends [instruction + image, image only, neither] copies of every image (0.6.6 found
    no CFG there, warned so, and planned each copy apart): the copies share their image's plan and the map
    is |first - last| of the denoiser's output."""
    pipe = _instruct_pix2pix_pipeline(family)
    unet = pipe.unet
    imptome.apply_patch(pipe, ratio=0.5)
    outputs = []
    unet.register_forward_hook(lambda module, args, output: outputs.append(output[0]))  # return_dict=False
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    layouts = []
    pipe.unet.register_forward_hook(
        lambda *_: layouts.append((patch_state(pipe).copies, patch_state(pipe).cond_copy))
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome")
        pipe(
            ["make it red", "make it blue"],
            image=images,
            num_inference_steps=4,
            generator=[torch.Generator().manual_seed(0) for _ in range(2)],  # equal noise: six equal latents
            output_type="latent",
        )
    assert layouts == [(3, 0)] * 4  # from the first step on, though the batch also splits in two equal halves
    instructed, _, unconditional = outputs[-1].chunk(3)
    torch.testing.assert_close(imptome.importance_map(pipe), (instructed - unconditional).abs().mean(dim=1))
    (record,) = imptome.merge_plan(pipe)
    assert record.importance is not None and not record.pruned
    roles = record.roles.view(3, 2, 16, 16)  # [copy, image, h, w]
    assert torch.equal(roles[0], roles[1]) and torch.equal(roles[0], roles[2])
    assert not torch.equal(roles[0, 0], roles[0, 1])  # each image its own plan


def test_three_equal_copies_without_image_channels_are_no_instruct_pix2pix_batch():
    """Safe latent diffusion and SEGA send [uncond, text, concept] to a plain 4-channel UNet, and three
    prompts without CFG seeded alike are three equal latents too: neither is InstructPix2Pix's layout, whose
    copies carry the input image's latents as extra channels (zeros in the third)."""
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5, importance_start_step=0)  # the first call would use a map
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator).repeat(3, 1, 1, 1)
    text = torch.randn(3, 77, TEXT_HIDDEN, generator=generator)
    with torch.no_grad(), pytest.warns(UserWarning, match="no classifier-free guidance"):
        unet(latents, 900, encoder_hidden_states=text)
    assert patch_state(unet).copies == 1 and imptome.importance_map(unet) is None


def test_controlnet_pipeline_merges_the_unet_only():
    """With a ControlNet the UNet is merged as usual (importance from the CFG batch, guess mode too); the
    ControlNet, a separate module, runs unmerged; removing the patch restores the output exactly."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny_sd_pipeline()
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 16, 32, 32))
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    control = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))

    def run(**kwargs) -> np.ndarray:
        return generate(pipe, image=control, **kwargs)

    unmerged = run()
    controlnet_tokens = token_shapes(pipe.controlnet, run)
    imptome.apply_patch(pipe, ratio=0.5)
    assert token_shapes(pipe.controlnet, run) == controlnet_tokens  # the ControlNet is not merged
    for guess_mode in (False, True):
        run(guess_mode=guess_mode)
        (record,) = imptome.merge_plan(pipe)
        assert record.importance is not None and record.roles.shape[0] == 2
    assert not np.array_equal(run(), unmerged)
    imptome.remove_patch(pipe)
    assert np.array_equal(run(), unmerged)


def test_ip_adapter_processors_keep_working_on_merged_layers():
    """IP-Adapter's processors (here on every cross-attention, random weights in place of a checkpoint)
    stay where they are; with cross-attention merged too they attend from the merged queries. The image
    prompt changes the output, merged or not, and removing the patch restores it exactly."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    torch.manual_seed(0)
    processors = {}
    for name in unet.attn_processors:
        attention = unet.get_submodule(name.removesuffix(".processor"))
        if attention.is_cross_attention:
            hidden = attention.to_out[0].out_features
            processors[name] = IPAdapterAttnProcessor2_0(hidden, TEXT_HIDDEN, num_tokens=(4,))
        else:
            processors[name] = AttnProcessor2_0()
    unet.set_attn_processor(processors)
    projection = ImageProjection(image_embed_dim=16, cross_attention_dim=TEXT_HIDDEN, num_image_text_embeds=4)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    image_embeds = torch.randn(2, 1, 16)  # [negative, positive] image embeddings, as CFG wants them

    def run(embeds: torch.Tensor) -> np.ndarray:
        return generate(pipe, ip_adapter_image_embeds=[embeds])

    unmerged = run(image_embeds)
    for options in ({}, {"merge_crossattn": True}):
        imptome.apply_patch(pipe, ratio=0.5, **options)
        merged = run(image_embeds)
        assert isinstance(unet.get_submodule(TOP_CROSS_ATTENTION).processor, IPAdapterAttnProcessor2_0)
        assert not np.array_equal(merged, unmerged) and not np.array_equal(merged, run(image_embeds * 2))

    # Regional IP-Adapter masks are resized to the query count read as a grid, so a cross-attention that
    # uses them keeps all its queries; self-attention (whose processor ignores the masks) still merges.
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., :8] = 1.0
    regional = {
        "ip_adapter_image_embeds": [image_embeds],
        "cross_attention_kwargs": {"ip_adapter_masks": [masks]},
    }
    seen = token_shapes(unet, lambda: generate(pipe, **regional))
    assert {tokens for _, tokens in seen[TOP_CROSS_ATTENTION]} == {256}
    assert {tokens for _, tokens in seen[TOP_CROSS_ATTENTION.replace("attn2", "attn1")]} == {128}
    imptome.remove_patch(pipe)
    assert np.array_equal(run(image_embeds), unmerged)


def test_split_cfg_plans_like_the_cfg_batch_on_the_bundled_model():
    """The same generation on the bundled (trained) model twice: by the pipeline with its CFG batch, and by
    hand with the conditional and unconditional passes as separate calls (as diffusers' guiders do). Every
    step gets the same plan, and the final latents agree to float rounding."""
    from imptome.loading import load_pipeline

    pipe = load_pipeline()
    prompt, steps, guidance = "a red circle on the left", 8, 5.0
    start = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    imptome.apply_patch(pipe, ratio=0.5)
    batched_plans = []

    def keep_plans(pipe, step, timestep, kwargs):
        batched_plans.append(imptome.merge_plan(pipe)[0].roles[0])
        return kwargs

    batched = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, latents=start.clone(),
                   output_type="latent", callback_on_step_end=keep_plans).images  # fmt: skip
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    latents, split_plans = start * scheduler.init_noise_sigma, []
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            eps_cond = pipe.unet(model_input, t, encoder_hidden_states=cond).sample
            eps_uncond = pipe.unet(model_input, t, encoder_hidden_states=uncond).sample
            split_plans.append(imptome.merge_plan(pipe)[0].roles[0])
            latents = scheduler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, latents).prev_sample
    assert all(torch.equal(a, b) for a, b in zip(batched_plans, split_plans, strict=True))
    torch.testing.assert_close(latents, batched, rtol=0, atol=1e-4)


def interrupted_generation(pipe, **kwargs) -> None:
    """A generation stopped by Ctrl-C in its first call, inside the first merged layer (after the merge)."""
    attention = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")

    def interrupt(module, args):
        raise KeyboardInterrupt

    handle = attention.to_q.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(pipe, **kwargs)
    finally:
        handle.remove()


def test_a_call_interrupted_inside_a_merged_layer_leaves_no_plan_behind(sd):
    """A call that stops between a merged layer's input and its output (Ctrl-C, out of memory) never reaches
    the unmerge. The plan it was merging with must not be applied to that layer's output in a later call
    that does not merge there (here: a self-attention mask, which keeps a layer unmerged); that would move
    attention results onto the wrong tokens without an error."""
    attention = sd.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    imptome.apply_patch(sd, ratio=0.7)
    interrupted_generation(sd, steps=2)
    stacks = patch_state(sd).unmerge_stacks
    assert [len(stack) for stack in stacks] == [1] + [0] * (len(stacks) - 1)  # the interrupted layer's plan
    tokens = torch.randn(2, 256, attention.query_dim)  # the layer's tokens in `generate`: a 16 x 16 grid
    mask = torch.zeros(2, 1, 256)  # an additive self-attention mask that changes nothing
    with torch.no_grad():
        patched = attention(tokens, attention_mask=mask)
    generate(sd, steps=2)  # the next denoiser call lets go of the plan left behind
    assert all(not stack for stack in stacks)
    imptome.remove_patch(sd)
    with torch.no_grad():
        assert torch.equal(patched, attention(tokens, attention_mask=mask))


@pytest.mark.filterwarnings("ignore:imptome. this denoiser call has no classifier-free guidance")
@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["no-cfg", "cfg"])
def test_a_generation_rerun_after_an_interrupted_one_is_the_uninterrupted_one(sd, guidance_scale):
    """Cancel a generation in its first call and run it again with the same seed: the same latents as if it
    had never been cancelled. Without CFG the rerun's first call has the cancelled call's sample at the same
    timestep, and was once taken for the second pass of a split-CFG pair and failed on the missing output."""
    imptome.apply_patch(sd, ratio=0.7)
    uninterrupted = generate(sd, steps=3, guidance_scale=guidance_scale)
    interrupted_generation(sd, steps=3, guidance_scale=guidance_scale)
    assert np.array_equal(generate(sd, steps=3, guidance_scale=guidance_scale), uninterrupted)


def stop_after_first_step(pipe, step, timestep, callback_kwargs):
    """A callback_on_step_end that stops the generation (diffusers' `_interrupt`) after its first step."""
    pipe._interrupt = True
    return callback_kwargs


def test_image_to_image_after_an_interrupted_generation_starts_afresh(sd):
    """Stopping a generation and then running image-to-image, whose first timestep is lower than where the
    stopped one ended: once taken for that generation's next step, with its map, step count and draws. The
    new scheduler timesteps (set_timesteps makes them anew) tell the new generation."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    imptome.apply_patch(sd, ratio=0.7, importance_start_step=1, merge_start_step=1)
    fresh = generate(img2img, image=image, strength=0.5)  # timesteps 501, 251 of 4 steps (DDIM)
    generate(sd, callback_on_step_end=stop_after_first_step)  # stops after t = 751
    assert np.array_equal(generate(img2img, image=image, strength=0.5), fresh)


@pytest.mark.filterwarnings("ignore:imptome. this denoiser call has no classifier-free guidance")
def test_back_to_back_one_step_generations_do_not_depend_on_each_other(sd):
    """One-step generations without CFG (turbo models), the same seed: the second call, at the same timestep
    with the same latents, was taken for the second pass of a split-CFG pair and reused the plans matched
    on the first prompt's features; with another batch shape, it counted as another call of the first
    generation's step. Each generation's one-element schedule is new memory, which a pair never has."""
    imptome.apply_patch(sd, ratio=0.7, plan_scope="layer", importance_start_step=0, merge_start_step=0)
    one_step = dict(steps=1, guidance_scale=1.0)
    fresh_blue = generate(sd, prompt="a blue square", **one_step)
    fresh_pair = generate(sd, prompt=["a blue square", "a red circle"], **one_step)
    generate(sd, **one_step)
    assert np.array_equal(generate(sd, prompt="a blue square", **one_step), fresh_blue)
    assert np.array_equal(generate(sd, prompt=["a blue square", "a red circle"], **one_step), fresh_pair)


def test_generations_taking_turns_on_one_denoiser_are_warned_about(sd):
    """Two generations, each with its own scheduler, taking turns step by step on one patched UNet (a server
    interleaving requests): every call's timestep lives in the other scheduler's memory, so every call starts
    a new generation and none merges by importance. imptome cannot keep two generations apart, but says so
    once three generations in a row stopped after one call in schedules that went on. The same generations
    one after another, and generations stopped after their first step now and then, are not warned about."""
    from diffusers import DDIMScheduler

    imptome.apply_patch(sd, ratio=0.5)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=torch.Generator().manual_seed(0))
    latents = [torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    schedules = []
    for _ in latents:
        scheduler = DDIMScheduler.from_config(sd.scheduler.config)
        scheduler.set_timesteps(4)
        schedules.append(scheduler.timesteps)

    def call(latent, t):
        with torch.no_grad():
            sd.unet(latent.repeat(2, 1, 1, 1), t, encoder_hidden_states=text)  # a CFG batch [x, x]

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome: the last generations on this denoiser")
        for latent, schedule in zip(latents, schedules, strict=True):  # one after another
            for t in schedule:
                call(latent, t)
        for _ in range(3):
            generate(sd, callback_on_step_end=stop_after_first_step)  # one schedule, stopped each time
            generate(sd)

    def take_turns():
        for turn in zip(*schedules, strict=True):
            for latent, t in zip(latents, turn, strict=True):
                call(latent, t)
                assert patch_state(sd).step == 0

    with pytest.warns(UserWarning, match="If generations take turns on it .* none merges by importance"):
        take_turns()
    imptome.apply_patch(sd, ratio=0.5, method="tome")  # merges the same at every step: nothing to say
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="imptome: the last generations on this denoiser")
        take_turns()


@pytest.mark.parametrize("made_per_step", [True, False], ids=["tensor-per-step", "schedule-view"])
def test_split_cfg_by_hand_steps_through_the_generation(made_per_step):
    """Split CFG in a hand-written loop: a timestep tensor made for each step and passed to both passes
    (e.g. t.expand(n).to(dtype)) is not taken for a new schedule at every step, and views of one schedule
    are one generation."""
    unet, state, latent, cond, uncond = split_cfg_case()
    schedule = torch.tensor([900, 700, 500, 300])
    with torch.no_grad():
        for step, t in enumerate(schedule):
            timestep = torch.full((1,), float(t)) if made_per_step else t.expand(1)
            first = unet(latent, timestep, encoder_hidden_states=cond).sample
            second = unet(latent, timestep, encoder_hidden_states=uncond).sample
            assert state.step == step and state.paired
            latent = latent - 0.1 * (second + 3 * (first - second))
    assert state.calls == len(schedule) - 1  # one draw key per pair


def test_a_schedule_after_a_one_step_generation_at_its_timestep_starts_afresh(sd):
    """A one-step generation (trailing spacing: timesteps [999]) and then a 4-step one whose schedule also
    starts at 999 (999, 749, 499, 249): its first call, at the last call's timestep but in a new schedule of
    several, starts a new generation; it is not another call of the one-step generation's step."""
    from diffusers import DDIMScheduler

    trailing = DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(**dict(sd.components, scheduler=trailing))  # sd's UNet, patched below
    imptome.apply_patch(pipe, ratio=0.7)
    fresh = generate(pipe, steps=4)
    generate(pipe, steps=1)
    assert np.array_equal(generate(pipe, steps=4), fresh)


def test_two_passes_after_a_split_cfg_pair_make_no_second_pair():
    """Split CFG and then two more passes at the same sample and timestep (e.g. two extra guidance terms):
    only the first two calls of each step are a pair; the fourth call is no second pair with the third, and
    the map stays |cond - uncond| of the pair."""
    unet, state, latent, cond, uncond = split_cfg_case()
    extra = torch.randn(2, 1, 77, TEXT_HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in torch.tensor([900, 700, 500]):  # views of one schedule (int timesteps would make the
            # third call at the first timestep a new one-step generation)
            eps_cond = unet(latent, t, encoder_hidden_states=cond).sample
            eps_uncond = unet(latent, t, encoder_hidden_states=uncond).sample
            paired = [state.paired]
            for text in extra:
                unet(latent, t, encoder_hidden_states=text)
                paired.append(state.paired)
            assert paired == [True, False, False]
            torch.testing.assert_close(
                imptome.importance_map(unet), (eps_cond - eps_uncond).abs().mean(dim=1)
            )
            latent = latent - 0.1 * eps_uncond


@pytest.mark.filterwarnings("ignore:imptome. this denoiser call has no classifier-free guidance")
def test_a_one_step_generation_of_another_batch_size_after_one_starts_afresh(sd):
    """One-step generations back to back, the second with another batch size: its timestep lives in a new
    one-element schedule, so it starts a new generation (same images as when it runs first)."""
    imptome.apply_patch(sd, ratio=0.7, plan_scope="layer", importance_start_step=0, merge_start_step=0)
    one_step = dict(steps=1, guidance_scale=1.0)
    pair = ["a blue square", "a red circle"]
    fresh_pair = generate(sd, prompt=pair, **one_step)  # the first generation since patching
    generate(sd, prompt="a blue square", **one_step)
    assert np.array_equal(generate(sd, prompt=pair, **one_step), fresh_pair)


def test_panorama_after_a_one_step_panorama_at_its_timestep_merges_each_crop_with_its_own_map():
    """A one-step panorama (trailing spacing: timestep 999) and then a 4-step one that starts at 999 too: the
    second is a new generation whose crops count their positions from 0, so from step 1 on each crop merges
    with the map its own crop made in the step before."""
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

    parts = tiny_sd_pipeline().components
    trailing = DDIMScheduler.from_config(parts["scheduler"].config, timestep_spacing="trailing")
    pipe = StableDiffusionPanoramaPipeline(**dict(parts, scheduler=trailing))
    imptome.apply_patch(pipe, ratio=0.5, importance_start_step=1)
    made, used = [], []

    def record(*_):
        made.append(imptome.importance_map(pipe))
        finest = max(imptome.merge_plan(pipe), key=lambda record: record.grid[0] * record.grid[1])
        used.append(finest.importance)

    pipe("a", height=128, width=640, num_inference_steps=1, output_type="latent")
    pipe.unet.register_forward_hook(record)
    pipe("a", height=128, width=640, num_inference_steps=4, output_type="latent")
    crops = 3
    assert len(made) == 4 * crops and all(u is None for u in used[:crops])
    for call in range(crops, len(used)):
        assert torch.equal(used[call], made[call - crops])


@pytest.mark.filterwarnings("ignore:imptome. this denoiser call has no classifier-free guidance")
def test_a_generation_whose_first_step_has_no_cfg_merges_with_no_map_of_the_generation_before():
    """A guided generation, then one whose first step runs without CFG (guidance from step 1 on): its first
    guided call has no map of its own generation, and must not take the last generation's."""
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5, importance_start_step=0)
    generator = torch.Generator().manual_seed(0)
    latent, other = torch.randn(2, 1, 4, 16, 16, generator=generator)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    with torch.no_grad():
        for t in (900, 700):
            unet(latent.repeat(2, 1, 1, 1), t, encoder_hidden_states=text)
        unet(other, 950, encoder_hidden_states=text[:1])  # timestep up: a new generation, without CFG
        unet(other.repeat(2, 1, 1, 1), 750, encoder_hidden_states=text)
    assert imptome.merge_plan(unet)[0].importance is None


def test_a_call_without_a_call_at_its_position_in_the_step_before_merges_with_the_latest_map():
    """Steps of 3, 2 and 3 guided calls (views of one schedule): the last call has no call at its position
    in the step before, so it merges with the latest map, not with the map of its position two steps back."""
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5, importance_start_step=0)
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    schedule = torch.tensor([900, 800, 700])
    with torch.no_grad():
        for t, calls in zip(schedule, (3, 2, 3), strict=True):
            for _ in range(calls):
                latest = imptome.importance_map(unet)
                latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
                unet(latent, t, encoder_hidden_states=text)
    assert torch.equal(imptome.merge_plan(unet)[0].importance, latest)


@pytest.mark.parametrize("case", ["inpaint-cfg", "third-zero-only"])
def test_equal_latents_with_image_channels_unlike_instruct_pix2pix_are_no_such_batch(case):
    """InstructPix2Pix's copies carry the image latents in the first two and zeros in the third. Inpainting
    with CFG and three prompts seeded alike (six equal latents, mask and masked image equal in every copy)
    is a CFG batch; three rows whose image channels differ in the first two are no copies at all."""
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    if case == "inpaint-cfg":
        unet, rows = tiny_sd_unet(in_channels=9, seed=3), 6
        image = torch.rand(1, 5, 16, 16, generator=generator).repeat(rows, 1, 1, 1)
        expected = (2, 1, 0)  # [uncond, cond]
    else:
        unet, rows = tiny_sd_unet(in_channels=8, seed=2), 3
        image = torch.cat([torch.rand(2, 4, 16, 16, generator=generator), torch.zeros(1, 4, 16, 16)])
        expected = (1, 0, None)
    imptome.apply_patch(unet, ratio=0.5, importance_start_step=1)
    sample = torch.cat([latent.repeat(rows, 1, 1, 1), image], dim=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet(sample, 900, encoder_hidden_states=torch.randn(rows, 77, TEXT_HIDDEN, generator=generator))
    state = patch_state(unet)
    assert (state.copies, state.cond_copy, state.uncond_copy) == expected


def test_a_subclass_of_the_sega_pipeline_is_refused_with_importance_too():
    from diffusers import SemanticStableDiffusionPipeline

    class CustomSega(SemanticStableDiffusionPipeline):  # e.g. a community pipeline built on SEGA
        pass

    parts = tiny_sd_pipeline().components
    pipe = CustomSega(**{name: parts[name] for name in parts if name != "image_encoder"})
    with pytest.raises(ValueError, match="does not work with SemanticStableDiffusionPipeline: SEGA"):
        imptome.apply_patch(pipe, ratio=0.5)
    assert patch_state(pipe) is None


def test_editing_the_returned_importance_map_leaves_the_patch_maps_as_they_are():
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    with torch.no_grad():
        unet(latent, 900, encoder_hidden_states=text)
    returned = imptome.importance_map(unet)
    kept = returned.clone()
    returned.zero_()
    assert torch.equal(imptome.importance_map(unet), kept) and kept.any()


def test_a_map_is_not_overwritten_by_a_later_call_that_merges_with_another_map():
    """Step 0: a CFG batch, a pass without CFG (merges with the latest map), a second CFG batch and a second
    pass without CFG; step 1's first call merges with the map of the first CFG batch of step 0, unchanged."""
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5, importance_start_step=0)
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    schedule = torch.tensor([900, 800])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = []
        for copies in (2, 1, 2, 1):
            latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(copies, 1, 1, 1)
            unet(latent, schedule[0], encoder_hidden_states=text[:copies])
            maps.append(imptome.importance_map(unet))
        unet(latent.repeat(2, 1, 1, 1), schedule[1], encoder_hidden_states=text)
    assert torch.equal(imptome.merge_plan(unet)[0].importance, maps[0])
    assert not torch.equal(maps[0], maps[2])


@pytest.mark.parametrize("timestep_kind", ["tensor made per step", "python number"])
def test_a_pass_after_a_split_cfg_pair_at_the_first_step_stays_in_its_generation(timestep_kind):
    """Split CFG and a third pass (PAG or skip-layer guidance with guiders) in a hand-written loop whose
    timesteps are no views of one schedule: the third pass at the first timestep is another pass of step 0,
    not a new one-step generation (0.6.8 restarted there, dropping the pair's map and reusing its draws)."""
    unet, state, latent, cond, uncond = split_cfg_case()
    perturbed = torch.randn(1, 77, TEXT_HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for step, t in enumerate((900, 700, 500)):
            timestep = torch.full((1,), float(t)) if timestep_kind == "tensor made per step" else t
            eps_cond = unet(latent, timestep, encoder_hidden_states=cond).sample
            eps_uncond = unet(latent, timestep, encoder_hidden_states=uncond).sample
            unet(latent, timestep, encoder_hidden_states=perturbed)
            assert (state.step, state.position, state.paired) == (step, 2, False)
            assert state.calls == 2 * step + 1  # one draw key for the pair, one for the third pass
            torch.testing.assert_close(
                imptome.importance_map(unet), (eps_cond - eps_uncond).abs().mean(dim=1)
            )
            latent = latent - 0.1 * eps_uncond


@pytest.mark.parametrize("case", ["number then schedule", "inversion then number"])
def test_a_pair_of_passes_that_starts_a_new_generation_is_no_split_cfg_pair(case):
    """A second pass on the last call's sample at its timestep that starts a new generation (a view of a
    schedule after a number; a number after an inversion's walk up a schedule) was taken for the second pass
    of a split-CFG pair too, whose output the new generation had just forgotten: "AttributeError: 'NoneType'
    object has no attribute 'clone'". It is the new generation's first call."""
    unet, state, latent, cond, uncond = split_cfg_case()
    schedule = torch.tensor([100.0, 500.0, 900.0])
    with torch.no_grad():
        if case == "number then schedule":
            unet(latent, 500, encoder_hidden_states=cond)
            unet(latent, schedule[1], encoder_hidden_states=uncond)
        else:
            unet(latent, schedule[0], encoder_hidden_states=cond)
            unet(latent, schedule[1], encoder_hidden_states=cond)  # walks up: an inversion's next step
            assert state.inverting and state.step == 1
            unet(latent, 500, encoder_hidden_states=uncond)
    assert (state.step, state.calls, state.paired, state.inverting) == (0, 0, False, False)
    assert imptome.importance_map(unet) is None


def test_a_pipeline_made_with_from_pipe_shares_the_patch_and_can_remove_it(sd):
    """The README's promise: the patch lives on the UNet, so an image-to-image pipeline made from a patched
    one merges too, and removing the patch through it removes it for both."""
    from diffusers import StableDiffusionImg2ImgPipeline

    unpatched = generate(sd)
    imptome.apply_patch(sd, ratio=0.7)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(sd)
    assert img2img.unet is sd.unet and imptome.is_patched(img2img)
    generate(img2img, image=torch.rand(1, 3, 128, 128), strength=0.75)
    assert imptome.merge_plan(img2img)  # it merged
    imptome.remove_patch(img2img)
    assert not imptome.is_patched(sd)
    assert np.array_equal(generate(sd), unpatched)


@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_ledits_pipeline_is_refused_with_importance_and_merges_with_tome(xl):
    """LEDITS++ sends [uncond, edit 1, ..., edit n] copies: with three editing prompts the four copies passed
    for a CFG batch of two images, and the maps compared edits with each other, without a word."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        LEditsPPPipelineStableDiffusion,
        LEditsPPPipelineStableDiffusionXL,
    )

    cls, base = (
        (LEditsPPPipelineStableDiffusionXL, tiny_sdxl_pipeline())
        if xl
        else (
            LEditsPPPipelineStableDiffusion,
            tiny_sd_pipeline(),
        )
    )
    parameters = inspect.signature(cls.__init__).parameters
    parts = {name: part for name, part in base.components.items() if name in parameters}
    parts["scheduler"] = DPMSolverMultistepScheduler.from_config(
        base.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    pipe = cls(**parts)
    with pytest.raises(ValueError, match=f"{cls.__name__}: LEDITS\\+\\+ sends 1 \\+ n copies.*'tome'"):
        imptome.apply_patch(pipe, ratio=0.5)
    assert patch_state(pipe) is None
    if xl:
        return
    imptome.apply_patch(pipe, ratio=0.5, method="tome")
    pipe.invert(image=torch.rand(1, 3, 128, 128), source_prompt="a", num_inversion_steps=2, skip=0.0)
    masks_off = dict(use_cross_attn_mask=False, use_intersect_mask=False)  # fail on this UNet, unpatched too
    tokens = query_token_counts(
        pipe.unet, lambda: pipe(editing_prompt=["x", "y", "z"], output_type="latent", **masks_off)
    )
    assert set(tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]) == {128}


@pytest.mark.parametrize(
    ("pipeline", "options", "call", "processor"),
    [
        ("StableDiffusionSAGPipeline", dict(max_downsample=2), {}, "CrossAttnStoreProcessor"),
        (
            "StableDiffusionAttendAndExcitePipeline",
            dict(merge_crossattn=True),
            dict(token_indices=[1], max_iter_to_alter=1),
            "AttendExciteAttnProcessor",
        ),
    ],
    ids=["sag", "attend-and-excite"],
)
def test_processors_that_store_a_merged_layers_attention_maps_are_refused(pipeline, options, call, processor):
    """SAG stores the mid block's self-attention maps and Attend-and-Excite cross-attention maps, both set in
    the pipeline's call, and read them over every token: on a merged layer they failed deep in diffusers."""
    import diffusers

    cls = getattr(diffusers, pipeline)
    parts = tiny_sd_pipeline().components
    pipe = cls(**{name: part for name, part in parts.items() if name in inspect.signature(cls).parameters})
    imptome.apply_patch(pipe, ratio=0.5, **options)
    with pytest.raises(ValueError, match=f"merges the tokens entering .*, and {processor} .*Leave the layer"):
        pipe("a red circle", num_inference_steps=2, output_type="latent", **call)


def test_self_attention_guidance_runs_with_the_default_levels():
    """SAG stores the mid block's self-attention maps. The default max_downsample merges the finest level
    only, so the mid block stays unmerged and SAG runs (it was refused whatever max_downsample said: the
    check read every self-attention hooked, not the levels merged)."""
    from diffusers import StableDiffusionSAGPipeline

    parts = tiny_sd_pipeline().components
    parts["unet"] = tiny_sd_unet(attention_head_dim=[2, 4])  # SAG reads head counts from a list only
    parameters = inspect.signature(StableDiffusionSAGPipeline).parameters
    pipe = StableDiffusionSAGPipeline(**{name: part for name, part in parts.items() if name in parameters})
    imptome.apply_patch(pipe, ratio=0.5)
    tokens = query_token_counts(
        pipe.unet, lambda: pipe("a red circle", num_inference_steps=3, output_type="latent", sag_scale=0.75)
    )
    assert min(tokens["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]) == 128  # merged, 256 -> 128
    assert set(tokens["mid_block.attentions.0.transformer_blocks.0.attn1"]) == {64}  # unmerged


def test_an_inversion_is_one_generation_that_merges_by_importance(sd):
    """DDIM inversion walks up one timesteps tensor, one element per call. Each call was taken for a new
    generation: never past the warm-up, never merged by importance, and warned about as generations taking
    turns. Walking the tensor again from its start, or leaving it for Python numbers, starts a new
    generation; walking an ascending tensor backwards is a generation going down, as a DDPM loop's."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    inverse = DDIMInverseScheduler.from_config(sd.scheduler.config)
    inverse.set_timesteps(6)
    forward = DDIMScheduler.from_config(sd.scheduler.config)
    forward.set_timesteps(6)
    text = torch.randn(2, 8, TEXT_HIDDEN)
    latents = torch.randn(1, 4, 16, 16)
    state = None
    steps = []

    def run(scheduler, timesteps):
        x = latents
        for t in timesteps:
            uncond, cond = sd.unet(torch.cat([x, x]), t, encoder_hidden_states=text).sample.chunk(2)
            steps.append(state.step)
            x = scheduler.step(uncond + 5 * (cond - uncond), t, x).prev_sample
        return x

    def invert():
        return run(inverse, inverse.timesteps)  # views of one tensor, going up

    imptome.apply_patch(sd, ratio=0.5)
    state = patch_state(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about generations taking turns
        first = invert()
        assert inverse.timesteps[0] < inverse.timesteps[-1] and steps == [0, 1, 2, 3, 4, 5]
        (record,) = imptome.merge_plan(sd)
        assert record.importance is not None and not record.pruned
        assert torch.equal(invert(), first)  # walked again from its start: a new generation, the same draws
        numbers = run(forward, [int(t) for t in forward.timesteps])  # starts where the inversion ended
        ascending = inverse.timesteps
        walked_back = run(forward, [ascending[i] for i in reversed(range(6))])
        assert torch.equal(run(forward, [int(t) for t in forward.timesteps]), numbers)
        assert torch.equal(invert(), first)  # after Python numbers
        assert torch.equal(run(forward, [int(t) for t in forward.timesteps]), numbers)  # after an inversion
        assert torch.equal(run(forward, [ascending[i] for i in reversed(range(6))]), walked_back)
    assert steps == [0, 1, 2, 3, 4, 5] * 8


@pytest.mark.filterwarnings("ignore:imptome. this denoiser call has no classifier-free guidance")
def test_marigold_ensemble_members_are_not_taken_for_cfg_copies():
    """Marigold puts the image's latents before the noisy ones ([image, prediction] channels, no guidance):
    read as leading channels, the members of an ensemble always compared equal, so they passed for the two
    halves of a CFG batch: one shared plan, and a "CFG" map made of two members' difference."""
    from diffusers import DDIMScheduler, MarigoldDepthPipeline, UNet2DConditionModel

    base = tiny_sd_pipeline()
    unet = UNet2DConditionModel(**tiny_sd_unet_config(in_channels=8)).eval()
    pipe = MarigoldDepthPipeline(
        unet=unet,
        vae=base.vae,
        scheduler=DDIMScheduler.from_config(base.scheduler.config, timestep_spacing="trailing"),
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        prediction_type="depth",
        default_denoising_steps=2,
        default_processing_resolution=128,
    )
    pipe.set_progress_bar_config(disable=True)
    imptome.apply_patch(pipe, ratio=0.5)
    image = torch.rand(1, 3, 128, 128)
    pipe(image, ensemble_size=2, batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    state = patch_state(pipe)
    assert state.copies == 1 and imptome.importance_map(pipe) is None
    (record,) = imptome.merge_plan(pipe)
    assert record.roles.shape[0] == 2 and record.importance is None


def test_pix2pix_zero_cross_attention_store_is_refused_on_merged_layers():
    """Pix2Pix-Zero compares a reference pass's cross-attention maps with a later pass's: merged, the two
    covered different kept tokens and the loss compared unrelated tokens, without a word."""
    from diffusers import DDIMInverseScheduler, StableDiffusionPix2PixZeroPipeline

    sd = tiny_sd_pipeline()
    pipe = StableDiffusionPix2PixZeroPipeline(
        **{name: sd.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        caption_generator=None,
        caption_processor=None,
        inverse_scheduler=DDIMInverseScheduler.from_config(sd.scheduler.config),
    )
    imptome.apply_patch(pipe, merge_crossattn=True)
    embeds = torch.randn(2, 8, TEXT_HIDDEN)
    with pytest.raises(ValueError, match="Pix2PixZeroAttnProcessor \\(Pix2Pix-Zero\\) stores"):
        pipe("a", source_embeds=embeds, target_embeds=embeds, num_inference_steps=2, output_type="latent")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "pipeline", ["StableDiffusionAttendAndExcitePipeline", "StableDiffusionPix2PixZeroPipeline"]
)
def test_cross_attention_stores_on_self_attention_do_not_refuse_merging_it(pipeline):
    """Attend-and-Excite and Pix2Pix-Zero put their processor on every attention of the UNet, and store the
    maps of cross-attention only: with the default options (self-attention merged, cross-attention not) both
    were refused, with the advice to set merge_crossattn=False, which was set already."""
    import diffusers

    cls = getattr(diffusers, pipeline)
    sd = tiny_sd_pipeline()
    parts = {name: part for name, part in sd.components.items() if name in inspect.signature(cls).parameters}
    if pipeline == "StableDiffusionPix2PixZeroPipeline":
        inverse = diffusers.DDIMInverseScheduler.from_config(sd.scheduler.config)
        pipe = cls(**parts, caption_generator=None, caption_processor=None, inverse_scheduler=inverse)
        embeds = torch.randn(2, 77, TEXT_HIDDEN, generator=torch.Generator().manual_seed(0))
        call = dict(source_embeds=embeds, target_embeds=embeds)
    else:
        pipe = cls(**parts)
        call = dict(token_indices=[1], max_iter_to_alter=1)
    imptome.apply_patch(pipe)
    counts = query_token_counts(pipe.unet, lambda: generate(pipe, steps=3, **call))
    assert counts["down_blocks.0.attentions.0.transformer_blocks.0.attn1"][-1] == 256 - 128
    assert set(counts[TOP_CROSS_ATTENTION]) == {256}  # the stored maps cover every token


def test_attend_and_excite_refinement_pass_is_no_split_cfg_pair():
    """Attend-and-Excite runs the prompt alone before each CFG batch and, at its refinement steps, runs that
    pass again with the same latents and text: the repeat passed for the second pass of split CFG, its map
    (the difference of two equal predictions) was zero, and imptome warned that the prompt is the negative
    prompt and merged the image with a random map for the whole generation. A repeat given the same
    conditioning is no pair: those passes merge as calls without CFG, the CFG batches by importance."""
    from diffusers import StableDiffusionAttendAndExcitePipeline

    parts = tiny_sd_pipeline().components
    parameters = inspect.signature(StableDiffusionAttendAndExcitePipeline).parameters
    pipe = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in parts.items() if k in parameters})
    imptome.apply_patch(pipe)
    cfg_batches = []

    def record(module, args, output):
        if args[0].shape[0] == 2:  # the CFG batch, after the passes of the prompt alone
            cfg_batches.append(imptome.merge_plan(pipe)[0].importance is not None)

    pipe.unet.register_forward_hook(record)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(pipe, steps=4, token_indices=[1], max_iter_to_alter=2)  # refinement at step 0
    messages = [str(w.message) for w in caught if "imptome" in str(w.message)]
    assert len(messages) == 1 and "no classifier-free guidance" in messages[0]
    assert cfg_batches == [False, False, True, True]  # by importance after the warm-up


def test_diffedit_mask_pass_is_no_cfg_batch_and_warns_of_nothing(sd):
    """DiffEdit's generate_mask sends one batch of noised latents per prompt, [source, negative, target,
    negative]; its halves passed for the CFG copies of twice as many images, half of whose "map" (negative
    against negative) was zero, so imptome warned that the prompt is the negative prompt, and that warning was
    used up. The pass is no CFG batch: the copies of a latent share one plan, no map is made, nothing is
    warned of (neither that nor, merging by importance from step 0, the missing guidance); the inversion
    and the edit merge by importance as before, and a prompt equal to its negative prompt is still warned
    about."""
    from diffusers import DDIMInverseScheduler, StableDiffusionDiffEditPipeline

    pipe = StableDiffusionDiffEditPipeline(
        **{name: sd.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        inverse_scheduler=DDIMInverseScheduler.from_config(sd.scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    steps = dict(num_inference_steps=4, inpaint_strength=0.8)
    imptome.apply_patch(pipe, ratio=0.5, importance_start_step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prompts = dict(source_prompt="a cat", target_prompt="a dog")
        mask = pipe.generate_mask(image=image, num_maps_per_mask=3, **prompts)
        state = patch_state(pipe)
        assert (state.copies, state.uncond_copy) == (4, None) and imptome.importance_map(pipe) is None
        (record,) = imptome.merge_plan(pipe)
        assert record.importance is None and record.roles.shape[0] == 4 * 3
        first, *others = record.roles.view(4, 3, -1)  # [copy, noised latent, token]
        assert all(torch.equal(first, other) for other in others)
        latents = pipe.invert(image=image, prompt="a cat", **steps).latents
        (record,) = imptome.merge_plan(pipe)
        assert record.importance is not None and not record.pruned
        pipe("a dog", mask_image=mask, image_latents=latents, output_type="latent", **steps)
        (record,) = imptome.merge_plan(pipe)
        assert record.importance is not None and not record.pruned
    with pytest.warns(UserWarning, match="is the prompt the negative prompt"):
        call = dict(mask_image=mask, image_latents=latents, output_type="latent", **steps)
        pipe("a dog", negative_prompt="a dog", **call)


def test_diffedit_caller_is_looked_for_only_once_diffusers_has_loaded_the_pipeline(monkeypatch):
    """Every denoiser call asks whether DiffEdit's mask pass made it, and reading the callers' frames costs
    microseconds a call (about 7 on a CPU core, begin_call's 53 -> 61 us): no frame is read before diffusers
    has imported the module defining StableDiffusionDiffEditPipeline, where no such pipeline exists."""
    import types

    from diffusers import StableDiffusionDiffEditPipeline

    from imptome.patch import state as state_module

    walks = []

    def getframe(depth: int = 0) -> types.FrameType:
        walks.append(depth)
        return sys._getframe(depth + 1)

    fake_sys = types.SimpleNamespace(modules={}, _getframe=getframe)
    monkeypatch.setattr(state_module, "sys", fake_sys)
    assert not state_module._called_by_diffedit_mask() and walks == []
    fake_sys.modules = {StableDiffusionDiffEditPipeline.__module__: None}
    assert not state_module._called_by_diffedit_mask() and walks == [1]
    assert StableDiffusionDiffEditPipeline.__module__ in state_module._DIFFEDIT_MODULES  # looked for there


def test_proportional_attention_is_refused_with_text2video_zeros_cross_frame_attention():
    """Text2Video-Zero makes every frame attend to the first frame's keys, which each frame's mask of its own
    kept tokens does not describe: wrong weights, without a word."""
    from diffusers import TextToVideoZeroPipeline

    sd = tiny_sd_pipeline()
    pipe = TextToVideoZeroPipeline(
        **{name: sd.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    video = dict(video_length=3, num_inference_steps=4, t0=1, t1=2, output_type="latent")
    imptome.apply_patch(pipe, proportional_attention=True)
    with pytest.raises(ValueError, match="CrossFrameAttnProcessor2_0 \\(Text2Video-Zero\\) makes every"):
        pipe("a", **video)
    imptome.apply_patch(pipe)  # without proportional attention it merges
    pipe("a", **video)
    assert imptome.merge_plan(pipe)


def test_a_further_pass_whose_batch_does_not_fit_its_steps_map_is_warned_about(sd):
    """A pass without CFG after the step's CFG batch merges with that batch's map; with other images in it
    (Pix2Pix-Zero's passes after an edit step) the map does not fit and the fallback merged it silently."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(sd.scheduler.config)
    scheduler.set_timesteps(4)
    text = torch.randn(2, 8, TEXT_HIDDEN)
    x = torch.randn(1, 4, 16, 16)
    imptome.apply_patch(sd, ratio=0.5)
    with pytest.warns(UserWarning, match="has no CFG batch and follows one in its step, but its batch \\(2"):
        for t in scheduler.timesteps:
            sd.unet(torch.cat([x, x]), t, encoder_hidden_states=text)  # the CFG batch: the step's map
            sd.unet(torch.cat([x, x + 1]), t, encoder_hidden_states=text)  # two other images
    assert patch_state(sd).copies == 1 and imptome.merge_plan(sd)[0].importance is None
