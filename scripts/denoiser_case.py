"""What the per-step GPU scripts (profile_step.py, compile_speed.py) share: their case arguments and the
set-up of one real-size denoiser call with the importance map of an unmerged call."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from imptome.bench.archs import ARCHS
from imptome.bench.denoisers import build_denoiser, example_inputs
from imptome.bench.speed import DTYPES, Variant, _denoiser_call, _set_attention, step_importance
from imptome.bench.timing import synchronize
from imptome.patch.families import denoiser_info
from imptome.patch.state import PatchState


def add_case_arguments(parser: argparse.ArgumentParser, calls: int) -> None:
    parser.add_argument("--arch", default="sd2")
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--calls", type=int, default=calls)


@dataclass
class DenoiserCase:
    """A random-weight denoiser with SDPA attention, its CFG inputs and `call` (one denoiser call with the
    latent passed positionally, as pipelines do), the inputs' timestep, and the importance map [U, H, W] of
    one unmerged call (what a patch holds mid-generation)."""

    device: torch.device
    model: torch.nn.Module
    inputs: dict[str, Any]
    call: Callable[[], Any]
    timestep: float
    importance: torch.Tensor

    def patched(self, variant: Variant) -> AbstractContextManager[None]:
        """`variant` patched into the model, in the state of a mid-generation step."""
        return variant.applied(self.model, self.importance, self.timestep)


def build_case(args: argparse.Namespace) -> DenoiserCase:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model = build_denoiser(args.arch, dtype=dtype, device=device)
    _set_attention(model, ARCHS[args.arch], "sdpa")
    inputs = example_inputs(args.arch, args.res, dtype=dtype, device=device)
    call = _denoiser_call(model, inputs)
    info = denoiser_info(model)
    with torch.inference_mode():
        importance = step_importance(call()[0], info)
    timestep = float(inputs["timestep"].flatten()[0])
    return DenoiserCase(device, model, inputs, call, timestep, importance)


def first_plan_builds(call: Callable[[], Any]) -> dict[tuple[int, int], tuple[PatchState, tuple]]:
    """Run `call` once on a patched model and keep the arguments of the first `PatchState.plan_for` of each
    token grid: (state, (block, block_index, grid, tokens)), to build those plans again alone."""
    first: dict[tuple[int, int], tuple[PatchState, tuple]] = {}
    original = PatchState.plan_for

    def capture(state: PatchState, *args: Any) -> Any:
        first.setdefault(args[2], (state, args))
        return original(state, *args)

    PatchState.plan_for = capture
    try:
        call()
    finally:
        PatchState.plan_for = original
    return first


def build_plan_again(state: PatchState, args: tuple) -> Any:
    """Build one plan as its denoiser call would: `plan_for` with the call's plan cache emptied."""
    state.plans = {}
    return PatchState.plan_for(state, *args)


def back_to_back(call: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Seconds per call of `calls` calls in a row, synchronised only before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls
