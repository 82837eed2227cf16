"""Timing helpers for the benchmarks: device sync, peak memory, the time a merging method spends in its own
work (importance map, planning, merge / unmerge) inside a denoiser call, and what a run's numbers rest on
(package versions, a busy machine).

Own work is timed by wrapping the method's functions while a call runs, and for imptome also the hooks it
registers (their own logic: reading the call's arguments, finding the layer's plan), each function's time
counted once, without the wrapped functions it calls. By default every wrapped function is
bracketed by device synchronisations, so on a GPU its kernels are counted in full (launch and execution) but
the call around it is slowed by the syncs: time instrumented calls separately from the calls whose speed you
report. Unsynced (``synced=False``), a GPU timer sees the host's time only (issuing the kernels): what the
work costs a step bound by the host issuing kernels, as eager steps of these models are. On the CPU the two
are the same; the wrappers cost about a microsecond each and the step can be timed with them in place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from imptome.merge.plan import MergePlan
from imptome.patch.hooks import DenoiserHooks, LayerHooks
from imptome.patch.state import PatchState

#: imptome's own work as (owner, function name, kind): begin_call + end_call (CFG check, importance map) as
#: "importance", plan_for (partition, matching, plan; a dictionary look-up once the grid's plan exists) as
#: "planning", MergePlan.merge / unmerge as "merge".
IMPTOME_WORK: tuple[tuple[type, str, str], ...] = (
    (PatchState, "begin_call", "importance"),
    (PatchState, "end_call", "importance"),
    (PatchState, "plan_for", "planning"),
    (MergePlan, "merge", "merge"),
    (MergePlan, "unmerge", "merge"),
)
#: imptome's hooks, by the kind of their own logic around the functions above: the denoiser's (reading the
#: call's arguments) as "importance", the merged layers' (finding the tokens and the layer's plan) as "hooks".
IMPTOME_HOOKS: tuple[tuple[type, str], ...] = ((DenoiserHooks, "importance"), (LayerHooks, "hooks"))

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself for a single sample)."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def round_order(items: list, round_index: int) -> list:
    """The order of the variants in a round: rounds come in pairs, a rotation of the list and then the same
    rotation reversed, so within each pair every variant's mean position is the middle and a steady drift in
    the machine's speed weighs on every variant alike; each pair rotates one step further, so the variants
    change neighbours."""
    shift = (round_index // 2) % len(items)
    order = items[shift:] + items[:shift]
    return order[::-1] if round_index % 2 else order


def package_versions(*names: str) -> dict[str, str | None]:
    """The installed version of each package (None: not installed), for a benchmark's record."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def busy_machine_note(remedy: str = "rerun on an idle machine") -> str | None:
    """A caution for printed timings when other work keeps the CPU busy (1-minute load average above the
    core count): stalls then land in some timed calls and not others, so ratios of a few calls mislead.
    `remedy` ends it (e.g. the command's option for more rounds)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (
        f"note: the machine is busy (load average {load:.1f} on {cores} cores): other work stalls some timed "
        f"calls, so these times and speedups are unreliable; {remedy}"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a region: CUDA `max_memory_allocated`, or on the CPU the process's peak resident set
    (Linux VmHWM after resetting it through /proc/self/clear_refs; it includes the weights and everything
    else the process holds). `read()` is None where neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                _CLEAR_REFS.write_text("5")

    def read(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            for line in _STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None


class WorkTimer:
    """Seconds spent in a merging method's own functions, by kind: "importance", "planning", "merge" (and
    imptome's "hooks"); with `synced` the device is synchronised around each function (on a GPU: launch and
    kernels), without it only the host's time is seen. A wrapped function called by another is counted in
    its own kind only, not again in its caller's."""

    def __init__(self, device: torch.device, synced: bool = True) -> None:
        self.device = device
        self.synced = synced
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per wrapped call running: the seconds of the wrapped calls it made

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    def wrap(self, kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.synced:
                synchronize(self.device)
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.synced:
                    synchronize(self.device)
                elapsed = time.perf_counter() - start
                self.seconds[kind] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    @contextlib.contextmanager
    def _patched(self, owner: object, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        try:
            yield
        finally:
            setattr(owner, name, original)

    @contextlib.contextmanager
    def imptome(self, model: torch.nn.Module) -> Iterator[WorkTimer]:
        """Time imptome's work: the functions of `IMPTOME_WORK`, and the hooks of `IMPTOME_HOOKS` registered
        on `model` (already patched: a registered hook is a bound method, which patching its class would not
        reach, so it is swapped in the module's hook dictionary)."""
        swapped = []
        for module in model.modules():
            for hooks in (module._forward_pre_hooks, module._forward_hooks):
                for key, hook in list(hooks.items()):
                    owner = getattr(hook, "__self__", None)
                    kind = next((kind for cls, kind in IMPTOME_HOOKS if isinstance(owner, cls)), None)
                    if kind is not None:
                        swapped.append((hooks, key, hook))
                        hooks[key] = self.wrap(kind, hook)
        try:
            with contextlib.ExitStack() as stack:
                for owner, name, kind in IMPTOME_WORK:
                    stack.enter_context(self._patched(owner, name, self.wrap(kind, getattr(owner, name))))
                yield self
        finally:
            for hooks, key, hook in swapped:
                hooks[key] = hook

    @contextlib.contextmanager
    def tomesd(self) -> Iterator[WorkTimer]:
        """Time the tomesd package's work: `compute_merge` (matching) as "planning", the merge / unmerge
        functions it returns as "merge"."""
        import tomesd.merge
        import tomesd.patch

        compute_merge = self.wrap("planning", tomesd.patch.compute_merge)

        def timed_compute_merge(*args: Any, **kwargs: Any) -> tuple[Callable[..., Any], ...]:
            functions = compute_merge(*args, **kwargs)
            return tuple(fn if fn is tomesd.merge.do_nothing else self.wrap("merge", fn) for fn in functions)

        with self._patched(tomesd.patch, "compute_merge", timed_compute_merge):
            yield self
