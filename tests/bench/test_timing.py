"""The benchmarks' timers: own work counted once per function, and imptome's hooks timed and put back."""

from __future__ import annotations

import torch

import imptome
from imptome.bench import timing
from imptome.patch.hooks import DenoiserHooks, LayerHooks
from tests.factories import tiny_sd_unet


class FakeClock:
    """perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_function_called_by_another_counts_in_its_own_kind_only(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    timer = timing.WorkTimer(torch.device("cpu"))

    def inner() -> None:
        clock.now += 2.0

    timed_inner = timer.wrap("planning", inner)

    def outer() -> None:
        clock.now += 1.0
        timed_inner()
        timed_inner()
        clock.now += 0.5

    timer.wrap("hooks", outer)()
    timer.wrap("planning", inner)()  # at the top level again
    assert dict(timer.seconds) == {"hooks": 1.5, "planning": 6.0}


def hook_owners(model: torch.nn.Module) -> list[type]:
    return [
        type(getattr(hook, "__self__", None))
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
    ]


def test_imptome_hooks_are_timed_and_put_back():
    unet = tiny_sd_unet()
    imptome.apply_patch(unet, ratio=0.5)
    before = hook_owners(unet)
    assert before.count(DenoiserHooks) == 2 and before.count(LayerHooks) > 0
    timer = timing.WorkTimer(torch.device("cpu"), synced=False)
    sample = torch.randn(2, 4, 16, 16)
    with torch.inference_mode(), timer.imptome(unet):
        assert not any(owner in (DenoiserHooks, LayerHooks) for owner in hook_owners(unet))  # wrapped
        unet(sample, 500, encoder_hidden_states=torch.randn(2, 77, 32))
    assert hook_owners(unet) == before
    assert timer.seconds["hooks"] > 0 and timer.seconds["importance"] > 0
