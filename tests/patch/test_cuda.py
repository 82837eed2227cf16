"""Checks that need a CUDA device (skipped elsewhere; scripts/gpu_bench.sh runs them on a lent GPU):
no host synchronisation in the per-layer path nor, after a generation's first two calls, per call; model
CPU offload to a real GPU, fp16, torch.compile with Inductor, CUDA graphs (with the CFG batch, with
split CFG, and with the Triton merge kernel)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.cudagraph_trees import get_manager

import imptome
from imptome.merge import DESTINATION
from imptome.merge.plan import MergePlan
from imptome.patch.api import patch_state
from imptome.patch.state import PatchState
from tests.factories import TEXT_HIDDEN, tiny_sd_pipeline, tiny_sd_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Deterministic cuBLAS (read when CUDA starts, so set before any test runs); see `deterministic`.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

PROMPT = "a red circle on the left"


def generate(pipe, steps: int = 4, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs)
    return out.images.float().cpu()


@contextlib.contextmanager
def sync_is_an_error(owner: type, name: str, after_calls: int = 0):
    """Make any host-device synchronisation inside `owner.name` raise, after its first `after_calls` calls."""
    original = getattr(owner, name)
    calls = 0

    def strict(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls <= after_calls:
            return original(*args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    setattr(owner, name, strict)
    try:
        yield
    finally:
        setattr(owner, name, original)


@pytest.mark.parametrize("plan_scope", ["step", "layer"])
def test_no_host_sync_in_the_per_layer_path(plan_scope):
    """Planning, merge, unmerge and the importance map never wait for the GPU, except end_call at the
    generation's first guided call, which checks once whether any image's map is zero (begin_call: the
    next test), and planning the first time a process makes a shared index tensor of a size
    (`imptome.merge.constants`: made once, then waited for, so that any stream may read it): a first
    generation makes them."""
    pipe = tiny_sd_pipeline().to("cuda")
    imptome.apply_patch(pipe, ratio=0.7, plan_scope=plan_scope)
    generate(pipe, steps=4)
    with contextlib.ExitStack() as stack:
        for owner, name in ((PatchState, "plan_for"), (MergePlan, "merge"), (MergePlan, "unmerge")):
            stack.enter_context(sync_is_an_error(owner, name))
        stack.enter_context(sync_is_an_error(PatchState, "end_call", after_calls=1))
        generate(pipe, steps=4)  # steps 0-1 random cells and pruning, 2-3 importance merging
    assert not imptome.merge_plan(pipe)[0].pruned


def test_no_host_sync_per_call_after_a_generations_first_two():
    """From the third call of a generation begin_call does not wait for the GPU: the timestep (a view of
    the scheduler's timesteps on the GPU) is read from a host copy, and the CFG layout found by the first two
    calls is kept. The pipeline runs under no_grad, as diffusers' pipelines do (not inference_mode, whose
    tensors have no version counter)."""
    pipe = tiny_sd_pipeline().to("cuda")
    imptome.apply_patch(pipe, ratio=0.7)
    for _ in range(2):  # a second generation: a new schedule is copied again, its first two calls compare
        with sync_is_an_error(PatchState, "begin_call", after_calls=2):
            generate(pipe, steps=5)
    assert patch_state(pipe.unet).copies == 2 and not imptome.merge_plan(pipe)[0].pruned


@contextlib.contextmanager
def deterministic():
    """Deterministic CUDA kernels, so that two runs of a generation can agree bit for bit. Without them, on
    an H100, the offloaded and the on-GPU runs differed by up to 1.6e-3 (the merge then still used atomic
    index_add_)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_cpu_offload_to_the_gpu(offload):
    """accelerate's offload hooks: whole models (model) or every leaf module, attention sub-layers
    included, moved to the GPU for its call and back (sequential; not testable on the CPU, where accelerate
    cannot offload to the device it runs on)."""
    with deterministic():
        reference = tiny_sd_pipeline().to("cuda")
        imptome.apply_patch(reference, ratio=0.7)
        expected = generate(reference)
        torch.testing.assert_close(generate(reference), expected, atol=0, rtol=0)  # deterministic
        pipe = tiny_sd_pipeline()
        imptome.apply_patch(pipe, ratio=0.7)
        if offload == "model":
            pipe.enable_model_cpu_offload()
        else:
            pipe.enable_sequential_cpu_offload()
        torch.testing.assert_close(generate(pipe), expected)
        assert imptome.merge_plan(pipe)
    if offload == "model":
        assert pipe.unet.device.type == "cpu"  # offloaded again after the call
    imptome.remove_patch(pipe)


def test_fp16_pipeline_on_the_gpu_matches_tokens_as_float32_does():
    """An fp16 pipeline on the GPU draws what a float32 run draws (every destination in place), and matches
    its tokens as float32 arithmetic would: the similarities, taken in float16 after normalising in float32,
    give the plans that float32 similarities of the same tokens give, up to a near-tie or two.

    Its plans are not those of a float32 run: on an H200 the tiny random pipeline's fp16 activations differ
    enough (its importance maps by 40%) that the independent tokens of the two runs shared no more than
    chance does (on the CPU, where fp16 layers compute much in float32, 99% of the roles agreed)."""
    pipe = tiny_sd_pipeline().to("cuda", torch.float16)
    base = generate(pipe)
    imptome.apply_patch(pipe, ratio=0.7)
    builds = []
    original = PatchState._build

    def rebuilt_in_float32(state, block, grid, tokens, stream):
        built = original(state, block, grid, tokens, stream)
        as_float32 = original(state, block, grid, tokens.float(), stream)
        builds.append((built.plan.roles, as_float32.plan.roles))
        return built

    PatchState._build = rebuilt_in_float32
    try:
        merged = generate(pipe)
    finally:
        PatchState._build = original
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    assert len(builds) == 4
    for half, full in builds:
        assert torch.equal(half == DESTINATION, full == DESTINATION)
        assert (half != full).sum() <= 4, (half != full).sum()
    destinations = imptome.merge_plan(pipe)[0].roles == DESTINATION  # the last call's
    imptome.remove_patch(pipe)
    torch.testing.assert_close(generate(pipe), base, atol=1e-3, rtol=0)
    float32_run = imptome.apply_patch(tiny_sd_pipeline().to("cuda"), ratio=0.7)
    generate(float32_run)
    assert torch.equal(imptome.merge_plan(float32_run)[0].roles == DESTINATION, destinations)


TIMESTEPS = (900, 800, 700, 600, 500, 400)  # one generation: random cells, pruning, then merging


def denoiser_calls(unet, maps: list[torch.Tensor] | None = None, split_cfg: bool = False):
    """Outputs, plans (roles, sources) and importance maps of one generation's guided calls on fixed inputs:
    one call per step on the CFG batch, or with `split_cfg` two (conditional, then unconditional, as
    diffusers' guiders call the model). Outputs and plans are per call, maps per step.

    The latents are not updated between calls, so a small numerical difference is not amplified by the
    sampler. `maps` (one per step) replaces the map each step left for the next one, so that two runs rank
    tokens from the same importance: the CFG difference of a random model is small, and Inductor's rounding
    alone reorders about a seventh of its tokens (measured on the CPU).
    """
    state = patch_state(unet)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 16, 16, generator=generator).cuda()
    text = torch.randn(2, 77, TEXT_HIDDEN, generator=generator).cuda()
    batches = [(latent, text[:1]), (latent, text[1:])] if split_cfg else [(latent.repeat(2, 1, 1, 1), text)]
    outputs, plans, left = [], [], []
    with torch.inference_mode():
        for step, timestep in enumerate(TIMESTEPS):
            if maps is not None and step > 0:
                state.importance = maps[step - 1]
            for sample, hidden in batches:
                output = unet(sample, timestep, encoder_hidden_states=hidden).sample
                # a copy: with CUDA graphs the output is the graph's memory, overwritten by its next replay
                outputs.append(output.to(torch.float32, copy=True))
                (record,) = imptome.merge_plan(unet)
                plans.append((record.roles, record.source))
            left.append(imptome.importance_map(unet))  # a copy: the patch overwrites its map
    return outputs, plans, left


@pytest.fixture
def full_float32():
    """Eager cuDNN convolutions default to TF32 (about 1e-3 relative error) while Inductor's kernels do not:
    on an H100 that alone moved outputs by 1e-3 and a pruning step's result by 0.02 (one near-tie in feature
    matching). Comparing in true float32 leaves only Inductor's own rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("method", ["tome", "importance"])
def test_inductor_compile_matches_eager_without_recompiling(method, full_float32):
    """Same plans and, up to Inductor's rounding, the same outputs as eager mode in every phase of a
    generation; a second generation compiles nothing. The compiled steps average with imptome's Triton
    kernel (the default merge_kernel, "auto")."""
    unet = tiny_sd_unet().cuda()
    imptome.apply_patch(unet, ratio=0.7, method=method)
    eager, eager_plans, eager_maps = denoiser_calls(unet)
    assert imptome.merge_plan(unet)[0].pruned is False  # the last calls merged (past the warm-up)
    torch._dynamo.reset()
    counters.clear()
    compiled_unet = torch.compile(unet)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            compiled, plans, _ = denoiser_calls(compiled_unet, eager_maps)
        assert any("segment_mean" in event.name for event in profile.events()), "the Triton merge did not run"
        graphs = counters["stats"]["unique_graphs"]
        denoiser_calls(compiled_unet)  # a second generation
        assert counters["stats"]["unique_graphs"] == graphs > 0, "the second generation recompiled"
    finally:
        torch._dynamo.reset()
    for call, (got, want) in enumerate(zip(plans, eager_plans, strict=True)):
        assert torch.equal(got[0], want[0]), f"call {call}: other token roles than in eager mode"
        assert torch.equal(got[1], want[1]), f"call {call}: other merge partners than in eager mode"
    for call, (got, want) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=lambda m, c=call: f"call {c}: {m}")


def under_cuda_graphs(unet, maps: list[torch.Tensor], split_cfg: bool = False):
    """`denoiser_calls` through torch.compile(unet, mode="reduce-overhead") with the given maps, then a second
    generation with the model's own maps; checks that Inductor ran every graph as a CUDA graph and re-recorded
    none. Returns the first generation's results."""
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled_unet = torch.compile(unet, mode="reduce-overhead")
        results = denoiser_calls(compiled_unet, maps, split_cfg)
        denoiser_calls(compiled_unet, split_cfg=split_cfg)
        manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        assert manager is not None, "no CUDA graph was made"
        re_recorded = sum(count for per_node in manager.num_rerecord.values() for count in per_node.values())
        skipped = counters["inductor"]["cudagraph_skips"]
    finally:
        torch._dynamo.reset()
    assert skipped == 0, "Inductor ran a graph without CUDA graphs (TORCH_LOGS=perf_hints says why)"
    assert re_recorded == 0, f"{re_recorded} CUDA graph re-recordings"
    return results


@pytest.mark.parametrize("merge_kernel", ["embedding_bag", "auto"])
def test_cuda_graphs_replay_without_re_recording(merge_kernel, full_float32):
    """torch.compile(mode="reduce-overhead"): CUDA graphs replay in every call of two generations, none is
    re-recorded (imptome 0.6.0 made them re-record every call by replacing its importance map, a static
    input of the graph: 2.6x slower than the compiled unmerged SD2 step on an H100), and the plans equal
    eager mode's, and so do the outputs up to rounding. With merge_kernel="auto" (the default) the compiled
    steps average with imptome's Triton kernel (ATen's embedding_bag kernel no longer runs)."""
    unet = tiny_sd_unet().cuda()
    imptome.apply_patch(unet, ratio=0.7, merge_kernel=merge_kernel)
    eager, eager_plans, eager_maps = denoiser_calls(unet)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        compiled, plans, _ = under_cuda_graphs(unet, eager_maps)
    assert all(torch.isfinite(output).all() for output in compiled)
    for call, (got, want) in enumerate(zip(plans, eager_plans, strict=True)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"call {call}: other plans"
    kernel_names = {event.name for event in profile.events()}
    triton_ran = any("segment_mean" in name for name in kernel_names)
    embedding_bag_ran = any("EmbeddingBag" in name for name in kernel_names)
    assert (triton_ran, embedding_bag_ran) == (merge_kernel == "auto", merge_kernel == "embedding_bag")
    for call, (got, want) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=lambda m, c=call: f"call {c}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_mean_on_cuda_equals_embedding_bag(dtype):
    """imptome's Triton merge kernel on the GPU at the merged shapes' widths (one block of 512 channels,
    two, and PixArt-alpha's 1152): the float32 mean of each group, rounded once (up to the dtype's
    rounding; tests/merge/test_kernels.py pins the float32 sums exactly in the interpreter)."""
    from imptome.merge import kernels
    from tests.merge.test_plan import _importance_plan

    plan, *_ = _importance_plan(16, 16, 2, cfg=True, ratio=0.7, pool_factor=1.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    for channels in (40, 513, 1152):
        tokens = torch.randn(plan.flat_slot.numel(), channels, generator=generator).cuda().to(dtype)
        order, offsets = plan.bag_order.cuda(), plan.bag_offsets.cuda()
        got = kernels.segment_mean(tokens, order, offsets)
        want = torch.nn.functional.embedding_bag(order, tokens.float(), offsets, mode="mean").to(dtype)
        torch.testing.assert_close(got, want, msg=lambda m, c=channels: f"{c} channels: {m}")


def test_cuda_graphs_with_split_cfg(full_float32):
    """Split CFG under CUDA graphs: the patch keeps the first pass's output (graph memory) and makes the
    map from it after the second pass has run. The map must be |first - second| of the outputs the model
    returned, the plans must equal eager mode's, and no CUDA graph is re-recorded or skipped."""
    unet = tiny_sd_unet(layers_per_block=1).cuda()
    imptome.apply_patch(unet, ratio=0.7)
    _, eager_plans, eager_maps = denoiser_calls(unet, split_cfg=True)
    outputs, plans, maps = under_cuda_graphs(unet, eager_maps, split_cfg=True)
    for step, made in enumerate(maps):
        first, second = outputs[2 * step], outputs[2 * step + 1]
        expected = (first - second).abs().mean(dim=1)
        torch.testing.assert_close(made.float(), expected, msg=lambda m, s=step: f"step {s}: {m}")
    for call, (got, want) in enumerate(zip(plans, eager_plans, strict=True)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"call {call}: other plans"
