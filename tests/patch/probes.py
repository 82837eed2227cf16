"""Probes for the end-to-end patch tests: what every attention and MLP actually computed on."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch import nn

import imptome


def token_shapes(model: nn.Module, run: Callable[[], object]) -> dict[str, list[tuple[int, int]]]:
    """(rows, tokens) seen by every attention query projection (`<attn>`), the text query projection of a
    joint attention (`<attn>.add_q_proj`, SD3) and every feed-forward input (`<block>.ff`) during `run()`,
    one entry per call, by module name."""
    shapes: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def record(name: str):
        return lambda module, args: shapes[name].append(tuple(args[0].shape[:2]))

    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "to_q"):
            handles.append(module.to_q.register_forward_pre_hook(record(name)))
            if getattr(module, "add_q_proj", None) is not None:
                handles.append(module.add_q_proj.register_forward_pre_hook(record(f"{name}.add_q_proj")))
        elif name.endswith(".ff"):
            handles.append(module.register_forward_pre_hook(record(name)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return dict(shapes)


def outputs_and_plans(denoiser: nn.Module, run: Callable[[], object]) -> list[tuple[torch.Tensor, list]]:
    """Each denoiser call's output (the first element of what it returns) and `imptome.merge_plan` records,
    read after imptome's own hook, during `run()`."""
    calls = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        calls.append((output[0], imptome.merge_plan(module)))

    handle = denoiser.register_forward_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return calls


def assert_merged_then_restored(pipe, run: Callable[[], torch.Tensor], base: torch.Tensor) -> None:
    """`run()` on the patched `pipe` is finite and differs from the unmerged `base`; after `remove_patch`
    it gives `base` again, bit for bit."""
    merged = run()
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    imptome.remove_patch(pipe)
    assert torch.equal(run(), base)
