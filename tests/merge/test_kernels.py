"""imptome's Triton merge kernel (merge_kernel="triton"), run in Triton's interpreter on the CPU.

On CUDA, tests/patch/test_cuda.py checks it against embedding_bag and inside compiled steps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from .test_plan import _importance_plan

pytest.importorskip("triton")
from imptome.merge import kernels  # noqa: E402 (needs triton)


@pytest.fixture
def interpreted(monkeypatch):
    """Triton kernels made while this runs execute on the CPU (TRITON_INTERPRET is read by triton.jit)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels._segment_mean_kernel.cache_clear()
    yield
    kernels._segment_mean_kernel.cache_clear()


def _plan(h, w, units, ratio, seed):
    """An importance plan for a CFG batch (2 * units rows)."""
    plan, *_ = _importance_plan(h, w, units, cfg=True, ratio=ratio, pool_factor=1.0, seed=seed)
    return plan


def _tokens(plan, channels, seed, dtype=torch.float32):
    return torch.randn(plan.flat_slot.numel(), channels, generator=torch.Generator().manual_seed(seed)).to(
        dtype
    )


# 600 channels take two blocks of 512, the second one partly masked; 40 and 1 take one block
@pytest.mark.parametrize("channels", [1, 40, 600])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_segment_mean_equals_embedding_bag(interpreted, channels, ratio):
    plan = _plan(8, 12, units=2, ratio=ratio, seed=3)
    tokens = _tokens(plan, channels, seed=4)
    got = kernels.segment_mean(tokens, plan.bag_order, plan.bag_offsets)
    want = F.embedding_bag(plan.bag_order, tokens, plan.bag_offsets, mode="mean")
    assert got.shape == (plan.rows * plan.num_kept, channels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_segment_mean_sums_half_precision_in_float32(interpreted):
    """fp16 tokens are summed in float32 and rounded once: exactly the float32 mean, rounded (summing in
    fp16 misses it), in fp16. (bfloat16 is not checked here: the interpreter truncates float32 to bfloat16
    where a GPU rounds to nearest.)"""
    plan = _plan(8, 8, units=1, ratio=0.7, seed=5)
    tokens = _tokens(plan, 24, seed=6, dtype=torch.float16)
    got = kernels.segment_mean(tokens, plan.bag_order, plan.bag_offsets)
    want = F.embedding_bag(plan.bag_order, tokens.float(), plan.bag_offsets, mode="mean").half()
    assert got.dtype == torch.float16
    assert torch.equal(got, want)


class _SeenAsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, to reach the branch that compiled CUDA steps take."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_the_triton_kernel_is_used_only_while_compiling_cuda_inference(monkeypatch):
    """merge(kernel="triton") calls the kernel only while torch.compile traces CUDA tokens that need no
    gradient; in eager mode, on CPU tokens or in training it is embedding_bag, whose launch costs less."""
    plan = _plan(8, 8, units=1, ratio=0.5, seed=7)
    x = torch.randn(plan.rows, 64, 16, generator=torch.Generator().manual_seed(8))
    calls = []

    def recording_segment_mean(tokens, order, offsets):
        calls.append(tokens.shape)
        return F.embedding_bag(order, tokens, offsets, mode="mean")

    monkeypatch.setattr(torch.ops.imptome, "segment_mean", recording_segment_mean)
    want = plan.merge(x)
    seen_as_cuda = x.as_subclass(_SeenAsCuda)
    torch.testing.assert_close(plan.merge(seen_as_cuda, "triton").as_subclass(torch.Tensor), want)  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    plan.merge(x, "triton")  # compiling, but CPU tokens
    plan.merge(seen_as_cuda.detach().requires_grad_(), "triton")  # compiling CUDA tokens, but training
    assert calls == []
    got = plan.merge(seen_as_cuda, "triton")  # compiling CUDA tokens for inference
    assert calls == [(x.shape[0] * x.shape[1], x.shape[2])]
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", ["triton", "embedding_bag"])
def test_merge_of_cuda_tokens_traces_to_the_chosen_kernel(kernel):
    """torch.export (Dynamo, as torch.compile traces) of a merge of CUDA tokens, with fake tensors, so no GPU
    is needed: the triton kernel traces as one `imptome.segment_mean` operator, without a graph break, with
    embedding_bag's output shape and dtype; kernel="embedding_bag" traces to ATen's."""
    plan = _plan(8, 8, units=1, ratio=0.5, seed=7)

    class Merge(torch.nn.Module):
        def __init__(self, plan):
            super().__init__()
            self.plan = plan

        def forward(self, x):
            return self.plan.merge(x, kernel)

    with FakeTensorMode():
        on_cuda = {
            f.name: torch.empty(value.shape, dtype=value.dtype, device="cuda")
            for f in dataclasses.fields(plan)
            if isinstance(value := getattr(plan, f.name), torch.Tensor)
        }
        x = torch.empty(plan.rows, 64, 16, dtype=torch.float16, device="cuda")
        graph = torch.export.export(Merge(dataclasses.replace(plan, **on_cuda)), (x,)).graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    merges = [target for target in targets if "segment_mean" in target or "embedding_bag" in target]
    assert len(merges) == 1
    assert merges[0].startswith("imptome.segment_mean" if kernel == "triton" else "aten.embedding_bag")
    (output,) = [node for node in graph.nodes if node.op == "output"][0].args[0]
    merged = output.meta["val"]
    assert merged.shape == (plan.rows, plan.num_kept, 16)
    assert merged.dtype == torch.float16 and merged.device.type == "cuda"


def test_segment_mean_traces_with_dynamic_token_counts():
    """Dynamo marks shapes dynamic when a compiled model sees a second resolution: the operator then traces
    with symbolic token and slot counts (fake CUDA tensors, no GPU needed), its output [slots, channels]."""

    class SegmentMean(torch.nn.Module):
        def forward(self, tokens, order, offsets):
            return torch.ops.imptome.segment_mean(tokens, order, offsets)

    rows, slots = torch.export.Dim("rows", min=2), torch.export.Dim("slots", min=2)
    with FakeTensorMode():
        tokens = torch.empty(96, 40, dtype=torch.float16, device="cuda")
        order = torch.empty(96, dtype=torch.long, device="cuda")
        offsets = torch.empty(30, dtype=torch.long, device="cuda")
        program = torch.export.export(
            SegmentMean(),
            (tokens, order, offsets),
            dynamic_shapes={"tokens": {0: rows}, "order": {0: rows}, "offsets": {0: slots}},
        )
    inputs = [node.meta["val"] for node in program.graph.nodes if node.op == "placeholder"]
    (output,) = [node for node in program.graph.nodes if node.op == "output"][0].args[0]
    merged = output.meta["val"]
    assert isinstance(merged.shape[0], torch.SymInt)
    assert str(merged.shape[0]) == str(inputs[2].shape[0]) != str(inputs[0].shape[0])  # the slot count
    assert merged.shape[1] == 40
