"""imptome together with other speed-ups: torch.compile (whole model and regional), DeepCache, diffusers'
caches, model CPU offload, half precision, channels_last."""

from __future__ import annotations

import copy
import functools
import math
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

import imptome
from imptome.merge import DESTINATION
from imptome.patch.api import patch_state
from imptome.patch.hooks import RECOMPILE_LIMIT
from tests.factories import TEXT_HIDDEN, tiny_pixart_pipeline, tiny_sd_pipeline, tiny_sd_unet
from tests.versions import has_accelerator, needs_diffusers

PROMPT = "a red circle on the left"
TOP_SELF_ATTENTION = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
LAST_SELF_ATTENTION = (
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1"  # runs on DeepCache's cached steps
)
N = 256  # top-level tokens of the tiny UNet (16 x 16 latent)


def generate(pipe, steps: int = 4, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs).images


def top_level_token_counts(unet, run, attention: str = TOP_SELF_ATTENTION) -> list[int]:
    """Tokens seen by a top-level self-attention's query projection, one entry per call."""
    seen: list[int] = []
    module = unet.get_submodule(attention).to_q
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_torch_compile_matches_eager_with_one_graph_per_phase(guidance_scale):
    """Dynamo traces planning, merge and unmerge inside the denoiser's graph, and the two denoiser hooks
    (begin_call / end_call, once per call) run outside it: the model compiles whole with fullgraph=True
    (no graph break), and one graph is made per phase of the schedule (warm-up with random cells, then
    importance merging, or without CFG the random-map fallback), then reused: a second generation compiles
    nothing. The "eager" backend keeps the test fast: graphs and recompilation are Dynamo's decisions,
    whatever the backend."""
    pipe = tiny_sd_pipeline()
    pipe.unet = tiny_sd_unet(layers_per_block=1)  # fewer modules to trace
    steps = 6
    run = functools.partial(generate, guidance_scale=guidance_scale)
    unmerged = run(pipe, steps=steps)
    imptome.apply_patch(pipe, ratio=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-CFG warning
        eager = run(pipe, steps=steps)
    assert not torch.equal(eager, unmerged)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend="eager")
    graphs_after_step: list[int] = []

    def count(pipe, step, timestep, kwargs):
        graphs_after_step.append(counters["stats"]["unique_graphs"])
        return kwargs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = run(pipe, steps=steps, callback_on_step_end=count)
            second = run(pipe, steps=steps, callback_on_step_end=count)
        warm_up = imptome.PRESETS["unet"].merge_start_step
        assert graphs_after_step == [1] * warm_up + [2] * (2 * steps - warm_up)
        assert not counters["graph_break"]
        torch.testing.assert_close(first, eager)
        torch.testing.assert_close(second, eager)
        (record,) = imptome.merge_plan(pipe)  # the plan was built inside the compiled graph
        assert not record.pruned and (record.importance is not None) == (guidance_scale > 1)
    finally:
        torch._dynamo.reset()


def test_torch_compile_with_split_cfg():
    """Guidance as two calls per step (diffusers' guiders): the second call of each pair reuses the first
    call's plans inside the compiled graph. Outputs equal eager, and a second generation compiles nothing."""
    unet = tiny_sd_unet(layers_per_block=1)
    imptome.apply_patch(unet, ratio=0.7)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator)
    cond, uncond = torch.randn(2, 1, 77, TEXT_HIDDEN, generator=generator)

    def generation(model) -> list[torch.Tensor]:
        outputs = []
        with torch.inference_mode():
            for t in (900, 750, 600, 450, 300, 150):
                outputs += [model(latent, t, encoder_hidden_states=text).sample for text in (cond, uncond)]
        return outputs

    eager = generation(unet)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(unet, backend="eager")
        first = generation(compiled)
        graphs = counters["stats"]["unique_graphs"]
        second = generation(compiled)
        assert counters["stats"]["unique_graphs"] == graphs
        for a, b, c in zip(eager, first, second, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c)
        (record,) = imptome.merge_plan(unet)
        assert record.importance is not None
    finally:
        torch._dynamo.reset()


def test_static_graph_inputs_keep_their_addresses():
    """Dynamo treats the patch's tensors that the layer hooks read (the call's key, the map it merges with) as
    static inputs, since it reaches them through the model's modules. CUDA graphs (mode="reduce-overhead")
    bake static addresses in and re-record the whole model when one moves: on an H100 a compiled merged SD2
    step took 66 ms (median) against 26 ms compiled unmerged while the map was a new tensor every step. So
    the patch overwrites them in place: after two generations it still holds the very tensors the graphs
    were traced with."""
    unet = tiny_sd_unet(layers_per_block=1)
    imptome.apply_patch(unet, ratio=0.7)
    state = patch_state(unet)
    traced_with: dict[str, torch.Tensor] = {}  # attribute of the patch state -> tensor seen when traced

    def backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        for node in graph_module.graph.find_nodes(op="placeholder"):
            graph_arg = node.meta["grapharg"]
            name = graph_arg.source.name
            if ".state." in name:
                traced_with[name.rpartition(".")[2]] = graph_arg.example
        return graph_module.forward

    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(unet, backend=backend)
        maps = []
        with torch.inference_mode():
            for _ in range(2):
                for timestep in (900, 800, 700, 600, 500):
                    compiled(latent, timestep, encoder_hidden_states=text)
                    maps.append(imptome.importance_map(unet))
    finally:
        torch._dynamo.reset()
    assert "call_key" in traced_with and "call_map_buffer" in traced_with
    for name, tensor in traced_with.items():
        assert getattr(state, name) is tensor, f"state.{name} is another tensor than the one traced"
    assert not torch.equal(maps[-1], maps[-2])  # overwritten with each step's map, not frozen
    (record,) = imptome.merge_plan(unet)  # built from the map the previous call left, kept as it was
    assert torch.equal(record.importance, maps[-2])


def test_patch_state_tensors_outlive_inference_mode():
    """A generation inside torch.inference_mode, then one outside it: the tensors kept from the first are
    inference tensors, which cannot be overwritten outside that mode, so the patch replaces them."""
    unet = tiny_sd_unet(layers_per_block=1)
    imptome.apply_patch(unet, ratio=0.7)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    outputs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            outputs.append([unet(latent, t, encoder_hidden_states=text).sample for t in (900, 800, 700)])
    for later in outputs[1:]:
        for got, want in zip(later, outputs[0], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("upcast_proportional", [False, True], ids=["default", "upcast-proportional"])
def test_regional_compilation_with_fullgraph(upcast_proportional):
    """diffusers' regional compilation (`compile_repeated_blocks`, each transformer block compiled on its
    own) with fullgraph=True: the layer hooks, planning included, trace without a graph break, the result
    equals eager, and a second generation compiles nothing. Also with proportional attention on a UNet that
    upcasts its attention (SD 2.1's), whose mask dtype is decided outside the trace (0.6.7 first decided it
    inside, and Dynamo broke the graph there)."""
    pipe = tiny_sd_pipeline()
    if upcast_proportional:
        pipe.unet = tiny_sd_unet(upcast_attention=True)
    imptome.apply_patch(pipe, ratio=0.7, proportional_attention=upcast_proportional)
    eager = generate(pipe, steps=4)
    torch._dynamo.reset()
    counters.clear()
    try:
        pipe.unet.compile_repeated_blocks(fullgraph=True, backend="eager")
        first = generate(pipe, steps=4)
        graphs = counters["stats"]["unique_graphs"]
        second = generate(pipe, steps=4)
        assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
        assert torch.equal(first, eager) and torch.equal(second, eager)
        assert not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def _in_a_new_thread(run: Callable[[], None]) -> None:
    """Run `run` in a thread of its own, re-raising what it raises. Dynamo keeps its settings per thread (a
    context variable): a new thread starts from the defaults, whatever earlier tests' patches raised."""
    raised = []

    def target():
        try:
            run()
        except BaseException as error:  # noqa: BLE001 (re-raised in the test's thread)
            raised.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if raised:
        raise raised[0]


def test_regional_compilation_at_several_image_and_batch_sizes():
    """A patched model compiles graphs per image size and batch size (the layer hooks read the latent grid
    and the batch's rows from the patch), 5 per size for the transformer blocks' forward under regional
    compilation. With Dynamo's default limit of 8 graphs per function the second image size failed with
    FailOnRecompileLimitHit (fullgraph=True); each patched denoiser call raises the limit unless the user set
    it, in the thread that calls it (patched here, generated in another thread, as a web server would)."""
    pipe = tiny_sd_pipeline()
    imptome.apply_patch(pipe, ratio=0.7)
    sizes = [(128, 1), (96, 1), (96, 2)]  # (px, images)

    def run(size, images):
        generator = torch.Generator().manual_seed(0)
        prompts = [PROMPT] * images
        kwargs = {"height": size, "width": size, "output_type": "latent"}
        return pipe(prompts, num_inference_steps=3, generator=generator, **kwargs).images

    eager = [run(*size) for size in sizes]

    def compiled_generations():
        assert torch._dynamo.config.recompile_limit == 8  # the default, in this thread
        torch._dynamo.reset()
        counters.clear()
        try:
            pipe.unet.compile_repeated_blocks(fullgraph=True, backend="eager")
            for size, expected in zip(sizes, eager, strict=True):
                assert torch.equal(run(*size), expected), size
            assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
            graphs = counters["stats"]["unique_graphs"]
            for size, expected in zip(sizes, eager, strict=True):  # each size's graphs are reused
                assert torch.equal(run(*size), expected), size
            assert counters["stats"]["unique_graphs"] == graphs
        finally:
            torch._dynamo.reset()

    _in_a_new_thread(compiled_generations)


def test_a_recompile_limit_set_by_the_user_is_kept():
    unet = imptome.apply_patch(tiny_sd_unet(layers_per_block=1))

    def call_with_limit():
        torch._dynamo.config.recompile_limit = 4
        _unet_call(unet)
        assert torch._dynamo.config.recompile_limit == 4

    _in_a_new_thread(call_with_limit)


def _unet_call(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator)
    with torch.inference_mode():
        return unet(latent, 900, encoder_hidden_states=text).sample


def test_patching_and_unpatching_an_already_compiled_model_take_effect():
    """Dynamo does not guard on module hooks, so a graph compiled before patching would keep running without
    them; apply_patch and remove_patch drop the compiled code of the model's classes."""
    unet = tiny_sd_unet(layers_per_block=1)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(unet, backend="eager")
        base = _unet_call(compiled)
        imptome.apply_patch(unet, ratio=0.7, method="tome")
        merged = _unet_call(compiled)
        assert not torch.equal(merged, base) and imptome.merge_plan(unet)
        imptome.remove_patch(unet)
        assert torch.equal(_unet_call(compiled), base)
    finally:
        torch._dynamo.reset()


def test_a_graph_without_the_patch_running_for_a_patched_copy_is_an_error():
    """A graph traced for an unpatched copy of the same class passes Dynamo's guards for the patched copy
    (no hook guards); instead of silently not merging, the first call after patching raises."""
    unet = tiny_sd_unet(layers_per_block=1)
    patched = copy.deepcopy(unet)
    imptome.apply_patch(patched, ratio=0.7)
    torch._dynamo.reset()
    try:
        _unet_call(torch.compile(unet, backend="eager"))
        with pytest.raises(RuntimeError, match="none of the patched layers ran"):
            _unet_call(torch.compile(patched, backend="eager"))
    finally:
        torch._dynamo.reset()


def test_deepcache_and_imptome_stack_and_undo(sd):
    from DeepCache import DeepCacheSDHelper

    base = generate(sd, steps=6)
    imptome.apply_patch(sd, ratio=0.7)
    merged = generate(sd, steps=6)
    imptome.remove_patch(sd)
    helper = DeepCacheSDHelper(pipe=sd)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        cached = generate(sd, steps=6)
        imptome.apply_patch(sd, ratio=0.7)
        first = top_level_token_counts(sd.unet, lambda: generate(sd, steps=6))
        last = top_level_token_counts(sd.unet, lambda: generate(sd, steps=6), LAST_SELF_ATTENTION)
        both = generate(sd, steps=6)
    finally:
        helper.disable()
    # DeepCache skips all but the last top-level layer on two of every three steps; imptome merges whatever
    # runs at the top level.
    kept = N - math.floor(N * 0.7)
    assert (first, last) == ([kept] * 2, [kept] * 6)
    for other in (base, merged, cached):
        assert not torch.equal(both, other)
    assert torch.isfinite(both).all()
    assert torch.equal(generate(sd, steps=6), merged)  # DeepCache off: imptome alone
    imptome.remove_patch(sd)
    assert torch.equal(generate(sd, steps=6), base)


def pyramid_attention_broadcast(denoiser, spatial: bool, cross: bool) -> None:
    """diffusers' Pyramid Attention Broadcast reusing every other attention output, at every timestep."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2 if spatial else None,
        spatial_attention_timestep_skip_range=(-1, 1001),
        cross_attention_block_skip_range=2 if cross else None,
        cross_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500,
    )
    apply_pyramid_attention_broadcast(denoiser, config)


def test_attention_output_caches_on_merged_layers_are_refused():
    """A cached output of a merged layer is in an earlier call's merged token order: unmerging it with the
    current plan would put attention results on the wrong tokens without any error, so imptome refuses,
    whether the cache came first or was added to a patched model."""
    message = "PyramidAttentionBroadcastHook on down_blocks.0.attentions.0.transformer_blocks.0.attn1 reuses"
    cached_first = tiny_sd_pipeline()
    pyramid_attention_broadcast(cached_first.unet, spatial=True, cross=False)
    with pytest.raises(ValueError, match=message):
        imptome.apply_patch(cached_first, ratio=0.7)
    assert not imptome.is_patched(cached_first)

    patched_first = tiny_sd_pipeline()
    imptome.apply_patch(patched_first, ratio=0.7)
    generate(patched_first, steps=2)
    pyramid_attention_broadcast(patched_first.unet, spatial=True, cross=False)
    with pytest.raises(ValueError, match=message):
        generate(patched_first, steps=2)


@pytest.mark.parametrize(
    "cache", ["FasterCache", pytest.param("TaylorSeer", marks=needs_diffusers("0.36", "TaylorSeer's cache"))]
)
def test_other_attention_caches_on_merged_layers_are_refused(cache):
    """The same rule for diffusers' other caches that hook attention modules: FasterCache's attention hook,
    and TaylorSeer once its patterns name a merged layer (its default patterns name modules called `attn`,
    which the supported models do not have)."""
    pipe = tiny_pixart_pipeline()
    if cache == "FasterCache":
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        config = FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            current_timestep_callback=lambda: 500,
            attention_weight_callback=lambda module: 0.5,
        )
        apply_faster_cache(pipe.transformer, config)
    else:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        patterns = [r"transformer_blocks\.\d+\.attn1"]
        apply_taylorseer_cache(pipe.transformer, TaylorSeerCacheConfig(cache_identifiers=patterns))
    with pytest.raises(ValueError, match=f"{cache}\\w*Hook on transformer_blocks.0.attn1 reuses"):
        imptome.apply_patch(pipe, block_range=None)


def test_attention_cache_off_the_merged_layers_stacks():
    """Pyramid Attention Broadcast on cross-attention only (not merged by default) works with imptome; once
    cross-attention is merged too, the combination is refused."""
    pipe = tiny_sd_pipeline()
    pyramid_attention_broadcast(pipe.unet, spatial=False, cross=True)
    imptome.apply_patch(pipe, ratio=0.7)
    steps = 4
    cross_attention = TOP_SELF_ATTENTION.replace("attn1", "attn2")
    self_counts = top_level_token_counts(pipe.unet, lambda: generate(pipe, steps=steps))
    cross_counts = top_level_token_counts(pipe.unet, lambda: generate(pipe, steps=steps), cross_attention)
    assert self_counts == [N - math.floor(N * 0.7)] * steps
    assert cross_counts == [N] * (steps // 2)  # every other cross-attention output is reused
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastHook on .*attn2"):
        imptome.apply_patch(pipe, ratio=0.7, merge_crossattn=True)


def chunk_feed_forward(model, chunk_size: int | None, dim: int) -> None:
    for module in model.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size, dim)


@pytest.mark.parametrize(("chunk_size", "dim"), [(64, 1), (1, 0)], ids=["tokens", "batch"])
def test_feed_forward_chunking_on_a_merged_feed_forward_is_refused(chunk_size, dim):
    """Chunked, a feed-forward runs on slices of the tokens or of the batch. With merge_mlp=True those slices
    would be merged: 64 tokens of the 16 x 16 level were taken for the 8 x 8 grid and merged with its plan,
    a wrong image without an error. Refused whether chunking came before or after patching; without
    merge_mlp chunking stacks."""
    pipe = tiny_sd_pipeline()
    message = r"merges the tokens entering .*transformer_blocks.0.ff \(merge_mlp=True\).* is chunked"
    chunk_feed_forward(pipe.unet, chunk_size, dim)  # enable_forward_chunking() on models that have it
    with pytest.raises(ValueError, match=message):
        imptome.apply_patch(pipe, ratio=0.5, merge_mlp=True)
    imptome.apply_patch(pipe, ratio=0.5)
    chunked = generate(pipe, steps=2)
    chunk_feed_forward(pipe.unet, None, 0)
    assert torch.equal(generate(pipe, steps=2), chunked)
    imptome.apply_patch(pipe, ratio=0.5, merge_mlp=True)
    generate(pipe, steps=2)
    chunk_feed_forward(pipe.unet, chunk_size, dim)
    with pytest.raises(ValueError, match=message):
        generate(pipe, steps=2)


# diffusers before 0.41 asks torch.accelerator for a device when group offloading, and fails without one
OFFLOAD_WITHOUT_ACCELERATOR = needs_diffusers("0.41", "group offloading without a GPU", not has_accelerator())


@pytest.mark.parametrize(
    "feature", ["layerwise-casting", pytest.param("group-offload", marks=OFFLOAD_WITHOUT_ACCELERATOR)]
)
def test_stateless_diffusers_hooks_inside_merged_layers_are_accepted(feature):
    """diffusers' memory savers hook the linear layers inside the merged attention (to_q, ...) without
    keeping outputs between calls: accepted, merging as usual. fp8 storage plans as fp32 does (the same
    draws, nearly the same matches);
    group offloading (to and from the CPU here) changes nothing."""
    pipe = tiny_sd_pipeline()
    imptome.apply_patch(pipe, ratio=0.7)
    roles = top_level_roles(pipe, lambda: generate(pipe, steps=3))
    merged = generate(pipe, steps=3)
    cpu = torch.device("cpu")
    if feature == "layerwise-casting":
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    else:
        pipe.unet.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    assert hasattr(pipe.unet.get_submodule(TOP_SELF_ATTENTION).to_q, "_diffusers_hook")
    imptome.apply_patch(pipe, ratio=0.7)  # checked again, from scratch
    calls = top_level_token_counts(pipe.unet, lambda: generate(pipe, steps=3))
    roles_both = top_level_roles(pipe, lambda: generate(pipe, steps=3))
    both = generate(pipe, steps=3)
    assert calls == [N - math.floor(N * 0.7)] * 3
    if feature == "group-offload":
        assert torch.equal(both, merged)
    else:  # the same draws; fp8 weights change some matches
        assert not torch.equal(both, merged)
        for call, call_both in zip(roles, roles_both, strict=True):
            assert torch.equal(call == DESTINATION, call_both == DESTINATION)
            assert (call == call_both).float().mean() > 0.95  # measured: 0.984


@needs_diffusers("0.37", "MagCache")
def test_magcache_and_imptome_stack():
    """MagCache skips whole transformer blocks and reuses their unmerged residual; the blocks that run
    merge as usual."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    pipe = tiny_pixart_pipeline()
    steps = 6

    def run():
        generator = torch.Generator().manual_seed(0)
        kwargs = {"use_resolution_binning": False, "clean_caption": False, "output_type": "latent"}
        return pipe(PROMPT, num_inference_steps=steps, generator=generator, **kwargs).images

    imptome.apply_patch(pipe, ratio=0.5, block_range=None)
    merged = run()
    apply_mag_cache(pipe.transformer, MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps))
    seen = []
    query = pipe.transformer.transformer_blocks[1].attn1.to_q
    handle = query.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        both = run()
    finally:
        handle.remove()
    tokens = 64  # 16 x 16 latent, patch 2
    assert 0 < len(seen) < steps  # MagCache skipped the block on some steps
    assert seen == [tokens - tokens // 2] * len(seen)
    assert torch.isfinite(both).all() and not torch.equal(both, merged)


@pytest.mark.parametrize("patch_first", [True, False], ids=["patch-then-offload", "offload-then-patch"])
def test_model_cpu_offload(patch_first):
    """accelerate's offload hooks wrap the denoiser's forward; imptome's module hooks keep working.
    This machine has no GPU, so the offload device is the CPU: the hooks run, no weights move."""
    pipe = tiny_sd_pipeline()
    base = generate(pipe)
    imptome.apply_patch(pipe, ratio=0.7)
    merged = generate(pipe)
    imptome.remove_patch(pipe)
    if patch_first:
        imptome.apply_patch(pipe, ratio=0.7)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.unet, "_hf_hook")
    if not patch_first:
        imptome.apply_patch(pipe, ratio=0.7)
    assert torch.equal(generate(pipe), merged)
    imptome.remove_patch(pipe)
    assert torch.equal(generate(pipe), base)


def top_level_roles(pipe, run) -> list[torch.Tensor]:
    """The top-level plan's roles [B, h, w] of every denoiser call in `run()`."""
    roles: list[torch.Tensor] = []
    handle = pipe.unet.register_forward_hook(lambda *_: roles.append(imptome.merge_plan(pipe)[0].roles))
    try:
        run()
    finally:
        handle.remove()
    return roles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_pipeline_plans_as_float32_does(sd, dtype):
    """The same draws as float32 (every destination in place) and, rounding aside, the same plans: in fp16
    the same result, closer to float32's merged latents than the merge moves them (bf16 rounding alone
    moves these latents more than merging does, so there only the plans are compared)."""
    pipe = tiny_sd_pipeline().to(dtype)
    base = generate(pipe)
    imptome.apply_patch(pipe, ratio=0.7)
    calls = top_level_token_counts(pipe.unet, lambda: generate(pipe, steps=3))
    roles = top_level_roles(pipe, lambda: generate(pipe))
    merged = generate(pipe)
    assert calls == [N - math.floor(N * 0.7)] * 3
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    assert not torch.equal(merged, base)
    unmerged_full = generate(sd)
    imptome.apply_patch(sd, ratio=0.7)
    roles_full = top_level_roles(sd, lambda: generate(sd))
    full = generate(sd)
    assert len(roles) == len(roles_full) == 4
    for half_call, full_call in zip(roles, roles_full, strict=True):
        assert torch.equal(half_call == DESTINATION, full_call == DESTINATION)
        assert (half_call == full_call).float().mean() > 0.95  # measured: fp16 1.0, bf16 0.977-1.0
    if dtype == torch.float16:  # measured: 0.38 against 2.12
        assert (merged.float() - full).norm() < 0.5 * (full - unmerged_full).norm()
    imptome.remove_patch(pipe)
    assert torch.equal(generate(pipe), base)


@pytest.mark.parametrize("proportional", [False, True], ids=["plain", "proportional"])
@pytest.mark.parametrize("speed_up", ["attention_slicing", "fused_qkv"])
def test_attention_slicing_and_fused_projections_merge_as_sdpa_does(speed_up, proportional):
    """diffusers' attention slicing (another processor, a loop over slices of batch x heads) and fused QKV
    projections (one to_qkv instead of to_q, to_k, to_v) both run the merged tokens, with proportional
    attention's mask too, and give the SDPA result up to float rounding; removing the patch restores
    the sped-up pipeline's own output."""
    reference = tiny_sd_pipeline()
    imptome.apply_patch(reference, ratio=0.7, proportional_attention=proportional)
    expected = generate(reference)
    pipe = tiny_sd_pipeline()
    if speed_up == "attention_slicing":
        pipe.enable_attention_slicing(1)
    else:
        pipe.fuse_qkv_projections()
    base = generate(pipe)
    imptome.apply_patch(pipe, ratio=0.7, proportional_attention=proportional)
    projection = "to_q" if speed_up == "attention_slicing" else "to_qkv"
    seen: list[int] = []
    module = getattr(pipe.unet.get_submodule(TOP_SELF_ATTENTION), projection)
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        merged = generate(pipe)
    finally:
        handle.remove()
    assert seen == [N - math.floor(N * 0.7)] * 4
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    imptome.remove_patch(pipe)
    assert torch.equal(generate(pipe), base)


def test_channels_last_unet(sd):
    """A UNet in channels_last memory format (a common GPU speed-up) hands its transformer blocks tokens
    with another stride pattern; merging follows the contiguous-format result up to float rounding."""
    imptome.apply_patch(sd, ratio=0.7)
    contiguous = generate(sd)
    sd.unet.to(memory_format=torch.channels_last)
    try:
        calls = top_level_token_counts(sd.unet, lambda: generate(sd, steps=3))
        channels_last = generate(sd)
    finally:
        sd.unet.to(memory_format=torch.contiguous_format)
    assert calls == [N - math.floor(N * 0.7)] * 3
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-4)


def test_patch_survives_moving_the_pipeline_between_dtypes(sd):
    """The plan cache and importance map are per call, so a patched model cast mid-life keeps working."""
    pipe = tiny_sd_pipeline()
    imptome.apply_patch(pipe, ratio=0.7)
    generate(pipe, steps=3)
    pipe.to(torch.bfloat16)
    assert torch.isfinite(generate(pipe, steps=3)).all()
    assert imptome.importance_map(pipe).dtype == torch.float32
    plans = defaultdict(int)
    for record in imptome.merge_plan(pipe):
        plans[record.grid] += 1
    assert dict(plans) == {(16, 16): 1}
