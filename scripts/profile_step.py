"""Where a denoiser step's time goes, unmerged vs merged: a torch.profiler summary per variant.

    python scripts/profile_step.py --arch sd2 --res 1024 --device cuda --dtype float16 --out profile.txt

For each variant (unmerged, imptome importance at --ratio, tomesd where it runs) it reports the synchronised
step time, the host time to enqueue one call (close to the step time: the step is bound by the CPU), the
summed kernel time per call, imptome's own functions (importance map, planning, merge / unmerge; each
wrapped in a profiler range, no synchronisation added) as kernel time, GPU span and host time, and the
operators with the most kernel time, and for the importance variant the operators of planning alone.
Used to explain the GPU efficiency numbers in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from imptome.bench.speed import Variant
from imptome.bench.timing import IMPTOME_WORK, synchronize

from denoiser_case import add_case_arguments, build_case, build_plan_again, first_plan_builds


@contextlib.contextmanager
def own_work_ranges():
    """Wrap imptome's own functions in profiler ranges named imptome.<kind>."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in IMPTOME_WORK]
    for (owner, name, kind), (_, _, fn) in zip(IMPTOME_WORK, originals, strict=True):

        def ranged(*args, _fn=fn, _kind=kind, **kwargs):
            with record_function(f"imptome.{_kind}"):
                return _fn(*args, **kwargs)

        setattr(owner, name, functools.wraps(fn)(ranged))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def planning_table(call, device: torch.device, calls: int, top: int) -> str:
    """The operators inside planning alone: capture the arguments of the first plan_for of each grid in one
    call, then profile only the plan builds (partition, matching, plan) `calls` times: plan_for with the
    call's plan cache emptied, so it builds as in a real call."""
    first = first_plan_builds(call)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            for state, args in first.values():
                build_plan_again(state, args)
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    grids = ", ".join(f"{h}x{w} ({tuple(args[3].shape)})" for (h, w), (_, args) in first.items())
    table = prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
    return f"\nplanning alone, {calls} builds of each grid: {grids}\n{table}"


def device_time(event) -> float:
    """Microseconds of device time of a profiler event (the attribute's name changed across versions)."""
    return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0))


def self_device_time(event) -> float:
    return float(
        getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    )


def kernel_times(call, device: torch.device, calls: int) -> dict[str, float]:
    """Microseconds per call of each kernel name over `calls` profiled calls of `call` (on the CPU: of each
    operator); profiler ranges (user annotations, torch.compile's regions) are left out."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        synchronize(device)
    device_type = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    times: dict[str, float] = {}
    for event in prof.key_averages():
        range_ = event.is_user_annotation or event.key.startswith("Torch-Compiled Region")
        if event.device_type == device_type and not range_:
            us = self_device_time(event) if device.type == "cuda" else float(event.self_cpu_time_total)
            times[event.key] = times.get(event.key, 0.0) + us / calls
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, calls=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    case = build_case(args)
    device, call = case.device, case.call
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"{args.arch} {args.res}px, {args.dtype}, {device} ({name})"]
    for variant in (Variant("none", 0.0), Variant("importance", args.ratio), Variant("tomesd", args.ratio)):
        try:
            with case.patched(variant), torch.inference_mode():
                for _ in range(3):
                    call()
                synchronize(device)
                step, enqueue = [], []
                for _ in range(args.calls):
                    start = time.perf_counter()
                    call()
                    enqueue.append(time.perf_counter() - start)
                    synchronize(device)
                    step.append(time.perf_counter() - start)
                with own_work_ranges(), profile(activities=activities) as prof:
                    for _ in range(args.calls):
                        call()
                    synchronize(device)
        except Exception as error:  # tomesd does not run on transformers
            lines.append(f"\n{variant.label}: does not run ({type(error).__name__}: {error})")
            continue
        events = prof.key_averages()
        # Each imptome.<kind> range appears twice: on the host (its kernels' summed time, and its host time)
        # and on the GPU timeline (the span from its first kernel's start to its last one's end, gaps
        # included: the span is what the range costs when the host launches slower than the GPU runs).
        own_kernels: dict[str, float] = defaultdict(float)
        own_span: dict[str, float] = defaultdict(float)
        own_host: dict[str, float] = defaultdict(float)
        for event in events:
            if not event.key.startswith("imptome."):
                continue
            if event.device_type == DeviceType.CPU:
                own_kernels[event.key] += device_time(event)
                own_host[event.key] += float(event.cpu_time_total)
            else:
                own_span[event.key] += self_device_time(event)
        kernel_us = sum(  # kernels only: operator rows carry their kernels' time too
            self_device_time(event)
            for event in events
            if event.device_type == DeviceType.CUDA and not event.is_user_annotation
        )
        median = sorted(step)[len(step) // 2]
        lines.append(
            f"\n{variant.label}: step {median * 1e3:.2f} ms, "
            f"enqueue {sorted(enqueue)[len(enqueue) // 2] * 1e3:.2f} ms, "
            f"kernels {kernel_us / args.calls / 1e3:.2f} ms per call"
        )
        for label, times in (("kernel time", own_kernels), ("GPU span", own_span), ("host time", own_host)):
            if times:
                ms = {key: us / args.calls / 1e3 for key, us in sorted(times.items())}
                per_call = ", ".join(f"{key} {value:.3f} ms" for key, value in ms.items())
                lines.append(f"  own work, {label} per call: {per_call}")
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        lines.append(events.table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))
        if variant.name == "importance":
            with case.patched(variant), torch.inference_mode():
                lines.append(planning_table(call, device, args.calls, 2 * args.top))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
