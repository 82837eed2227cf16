"""What planning costs in an eager step, and what it would cost replayed from a CUDA graph.

    python scripts/planning_graph.py --arch sd2 --res 1024 --device cuda --dtype float16 --json out.json

In eager mode a merged step on a GPU is bound by the host issuing kernels, and planning is about 50 small
operators per token grid and call. This measures, for the first plan of each grid of one importance-merged
call (built again alone, as `scripts/profile_step.py` does):

- eager: the host time to issue one plan build (no synchronisation), and the time per build when --calls
  builds run back to back (CUDA events: the GPU's time, or the host's when the host is slower);
- graph (CUDA only): the same plan build captured once in a `torch.cuda.CUDAGraph`, then per build the copy
  of the layer's tokens into the captured input plus one replay, timed the same two ways; and whether the
  replayed plan equals the eager one.

With the merged step's time (synchronised, median of --calls) this bounds what a planner replayed from a
CUDA graph could save in eager mode before building one into imptome. On the CPU only the eager rows run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from imptome.bench.speed import Variant
from imptome.bench.timing import synchronize
from imptome.merge.plan import MergePlan

from denoiser_case import add_case_arguments, back_to_back, build_case, build_plan_again, first_plan_builds


def host_and_back_to_back_us(
    build: Callable[[], object], device: torch.device, calls: int
) -> tuple[float, float]:
    """(median host time to issue one build, time per build of `calls` builds back to back), microseconds."""
    host = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        build()
        host.append(time.perf_counter() - start)
    return statistics.median(host) * 1e6, back_to_back(build, device, calls) * 1e6


def same_plan(a: MergePlan, b: MergePlan) -> bool:
    values = [(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(MergePlan)]
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in values)


def graphed_build(state, args: tuple) -> tuple[Callable[[], MergePlan], MergePlan]:
    """Capture one plan build in a CUDA graph; returns (copy the tokens in and replay, the captured plan)."""
    block, block_index, grid, tokens = args
    static_tokens = tokens.clone()
    static_args = (block, block_index, grid, static_tokens)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graphs asks
        for _ in range(3):
            build_plan_again(state, static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan = build_plan_again(state, static_args)

    def replay() -> MergePlan:
        static_tokens.copy_(tokens)
        graph.replay()
        return plan

    return replay, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, calls=50)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    case = build_case(args)
    device = case.device
    rows = []
    with case.patched(Variant("importance", args.ratio)), torch.inference_mode():
        for _ in range(3):
            case.call()
        synchronize(device)
        step = []
        for _ in range(args.calls):
            start = time.perf_counter()
            case.call()
            synchronize(device)
            step.append(time.perf_counter() - start)
        step_us = statistics.median(step) * 1e6
        for grid, (state, build_args) in first_plan_builds(case.call).items():
            eager = build_plan_again(state, build_args)
            row = dict(grid=list(grid), tokens=list(build_args[3].shape), step_us=step_us)
            row["eager_host_us"], row["eager_us"] = host_and_back_to_back_us(
                lambda state=state, build_args=build_args: build_plan_again(state, build_args),
                device,
                args.calls,
            )
            if device.type == "cuda":
                replay, plan = graphed_build(state, build_args)
                row["graph_host_us"], row["graph_us"] = host_and_back_to_back_us(replay, device, args.calls)
                replay()
                synchronize(device)
                row["graph_equals_eager"] = same_plan(plan, eager)
            rows.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.arch} {args.res}px, ratio {args.ratio}, {args.dtype}, {name}; step {step_us / 1e3:.2f} ms")
    print("| grid | eager host us | eager us, back to back | graph host us | graph us, back to back | same |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        graph = [f"{row[key]:.0f}" if key in row else "-" for key in ("graph_host_us", "graph_us")]
        print(
            f"| {row['grid'][0]}x{row['grid'][1]} | {row['eager_host_us']:.0f} | {row['eager_us']:.0f} | "
            f"{graph[0]} | {graph[1]} | {row.get('graph_equals_eager', '-')} |"
        )
    if args.json:
        meta = dict(vars(args), json=None, device_name=name, torch=torch.__version__)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
