"""Measuring a denoiser inside a pipeline (imptome.bench.measure)."""

from __future__ import annotations

import itertools

import torch

from imptome.bench import measure


class Recorded(torch.nn.Module):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.events.append("forward")
        return x


def test_the_timer_brackets_the_hooks_already_on_the_module(monkeypatch):
    """A patch's hooks (registered before the timer, as imptome's are) run inside the timed call: its work at
    the start of a call (reading the timestep, the CFG check) counts in the quality bench's s/step."""
    events: list[str] = []
    module = Recorded(events)
    module.register_forward_pre_hook(lambda *_: events.append("patch pre"))
    module.register_forward_hook(lambda *_: events.append("patch post"))
    ticks = itertools.count()

    def clock() -> float:
        events.append("clock")
        return float(next(ticks))

    monkeypatch.setattr(measure.time, "perf_counter", clock)
    with measure.DenoiserTimer().attach(module) as timer:
        module(torch.zeros(1))
    assert events == ["clock", "patch pre", "forward", "patch post", "clock"]
    assert timer.seconds == [1.0]
