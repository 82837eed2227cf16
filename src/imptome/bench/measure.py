"""Measuring a denoiser inside a running pipeline: wall time per call and FLOPs per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from imptome.bench.flops import flop_counter
from imptome.bench.timing import synchronize


@contextmanager
def _around_calls(module: torch.nn.Module, before: Callable, after: Callable) -> Iterator[None]:
    """`before` and `after` every call of `module` for the duration, outside every other hook of it: the first
    pre-hook and the last hook, so a patch's hooks on the module count as part of the call."""
    handles = [module.register_forward_pre_hook(before, prepend=True), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class DenoiserTimer:
    """Wall time of every call of a module (its device synchronised), via forward hooks around every other
    hook of the module (a patch's included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @contextmanager
    def attach(self, module: torch.nn.Module) -> Iterator[DenoiserTimer]:
        weight = next(module.parameters(), None)
        device = torch.device("cpu") if weight is None else weight.device

        def pre(*_: object) -> None:
            synchronize(device)
            self._start = time.perf_counter()

        def post(*_: object) -> None:
            synchronize(device)
            self.seconds.append(time.perf_counter() - self._start)

        with _around_calls(module, pre, post):
            yield self

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def denoiser_flops(module: torch.nn.Module, run: Callable[[], object]) -> float:
    """Mean FLOPs per call of `module` while `run()` executes (everything the call does, hooks included;
    CPU attention counted, see `imptome.bench.flops`)."""
    per_call: list[int] = []
    with flop_counter() as counter:
        start = [0]

        def pre(*_: object) -> None:
            start[0] = counter.get_total_flops()

        def post(*_: object) -> None:
            per_call.append(counter.get_total_flops() - start[0])

        with _around_calls(module, pre, post):
            run()
    return float(sum(per_call) / len(per_call))
