"""Measuring a denoiser inside a running pipeline: wall time per call and FLOPs per call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from imptome.bench.flops import flop_counter


class DenoiserTimer:
    """Wall time of every call of a module (CUDA-synchronised), via forward hooks around every other hook of
    the module (a patch's included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @contextmanager
    def attach(self, module: torch.nn.Module) -> Iterator[DenoiserTimer]:
        def pre(*_: object) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def post(*_: object) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self._start)

        # first of the pre-hooks and last of the hooks: the call's time includes imptome's hooks on the module
        handles = [module.register_forward_pre_hook(pre, prepend=True), module.register_forward_hook(post)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

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

        handles = [module.register_forward_pre_hook(pre, prepend=True), module.register_forward_hook(post)]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
    return float(sum(per_call) / len(per_call))
