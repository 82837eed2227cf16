"""Checks that need a CUDA device (skipped elsewhere; scripts/gpu_bench.sh runs them on a lent GPU):
no host synchronisation in the per-layer path, model CPU offload to a real GPU, fp16, torch.compile with
Inductor."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch._dynamo.utils import counters

import imptome
from imptome.merge.plan import MergePlan
from imptome.patch.state import PatchState
from tests.factories import tiny_sd_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT = "a red circle on the left"


def generate(pipe, steps: int = 4, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs)
    return out.images.float().cpu()


@contextlib.contextmanager
def sync_is_an_error(owner: type, name: str):
    """Make any host-device synchronisation inside `owner.name` raise."""
    original = getattr(owner, name)

    def strict(*args, **kwargs):
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
    """Planning, merge, unmerge and the importance map never wait for the GPU (begin_call reads the timestep
    and compares the CFG halves once per denoiser call; that is allowed)."""
    pipe = tiny_sd_pipeline().to("cuda")
    imptome.apply_patch(pipe, ratio=0.7, plan_scope=plan_scope)
    with contextlib.ExitStack() as stack:
        for owner, name in ((PatchState, "plan_for"), (PatchState, "end_call"), (MergePlan, "merge")):
            stack.enter_context(sync_is_an_error(owner, name))
        stack.enter_context(sync_is_an_error(MergePlan, "unmerge"))
        generate(pipe, steps=4)  # steps 0-1 random cells and pruning, 2-3 importance merging
    assert not imptome.merge_plan(pipe)[0].pruned


def test_model_cpu_offload_to_the_gpu():
    reference = tiny_sd_pipeline().to("cuda")
    imptome.apply_patch(reference, ratio=0.7)
    expected = generate(reference)
    pipe = tiny_sd_pipeline()
    imptome.apply_patch(pipe, ratio=0.7)
    pipe.enable_model_cpu_offload()
    torch.testing.assert_close(generate(pipe), expected)
    assert pipe.unet.device.type == "cpu"  # offloaded again after the call
    imptome.remove_patch(pipe)


def test_fp16_pipeline_on_the_gpu():
    pipe = tiny_sd_pipeline().to("cuda", torch.float16)
    base = generate(pipe)
    imptome.apply_patch(pipe, ratio=0.7)
    merged = generate(pipe)
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    imptome.remove_patch(pipe)
    torch.testing.assert_close(generate(pipe), base, atol=1e-3, rtol=0)


def test_inductor_compile_matches_eager_without_recompiling():
    pipe = tiny_sd_pipeline().to("cuda")
    imptome.apply_patch(pipe, ratio=0.7)
    eager = generate(pipe, steps=6)
    torch._dynamo.reset()
    counters.clear()
    pipe.unet = torch.compile(pipe.unet)
    try:
        first = generate(pipe, steps=6)
        graphs = counters["stats"]["unique_graphs"]
        second = generate(pipe, steps=6)
        assert counters["stats"]["unique_graphs"] == graphs > 0
        torch.testing.assert_close(first, eager, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(second, eager, atol=1e-3, rtol=1e-3)
        (record,) = imptome.merge_plan(pipe)
        assert not record.pruned and int((record.roles[0] == 0).sum()) == math.floor(256 * 0.7)
    finally:
        torch._dynamo.reset()
