"""imptome under torch.compile: denoiser step time, eager and compiled, unmerged and merged.

    python scripts/compile_speed.py --arch sd2 --res 1024 --device cuda --dtype float16 --json out.json

For each variant (--variants: unmerged, tome and importance at --ratio) a copy of the denoiser is patched
and compiled with `torch.compile` (--mode: the default mode makes Inductor kernels without CUDA graphs,
reduce-overhead replays CUDA graphs) and warmed up; then --calls rounds time one synchronised call of every
variant, eager and compiled, alternating, so that drift in the machine's speed hits all variants alike.
Since imptome 0.2.0 planning, merge and unmerge are traced into the denoiser's graph and only the two
denoiser hooks run outside it. Reports the compile time (first call), medians and speedups vs the unmerged
step of the same mode. On a GPU the eager step is bound by the host issuing kernels; compiling removes
much of that work, which is what this measures.

Each round also times --back-to-back compiled calls with one synchronisation at the end (the time per
call), as a pipeline runs its steps: the host may then run ahead of the GPU, except where it has to wait
for it. Up to imptome 0.6.3 the denoiser hook waited in every call (it read the timestep and compared the
CFG halves on the host), since 0.6.4 only in a generation's first two; what such a wait costs shows here
and not in the synchronised calls. The inputs are made outside torch.inference_mode, as a pipeline's are,
so the timestep has a version counter and is read from a host copy.

With --profile-calls N, after the rounds each compiled variant runs N more calls under torch.profiler, and
the kernels are summed by name. Kernels inside CUDA graphs have no profiler ranges, so imptome's own work
cannot be attributed by function there; instead a merged variant's kernels whose names the unmerged model
never runs (planning's sorts and top-k, the merge, kernels into which Inductor fused the unmerge gather) are
summed as an upper bound on its own work: a fused kernel counts whole, model work in it included. Those
among them named for no model operation (`MODEL_OPERATION`) are imptome's alone: a lower bound. It leaves out
the unmerge, which Inductor fuses into the model's residual-add and norm kernels; the growth of Inductor's
other kernels (named `triton_*`) over the unmerged model's is printed beside it, and counting that growth as
imptome's gives an estimate of its own work with the unmerge.

The variant importance-embedding-bag is importance with `merge_kernel="embedding_bag"`: the compiled step
averages with ATen's embedding_bag instead of imptome's Triton kernel, which the default ("auto") uses where
triton imports (the eager steps are the same). Up to imptome 0.7 embedding_bag was the default and the
variant importance-triton chose the Triton kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from tqdm.auto import tqdm

from imptome.bench.speed import Variant, _denoiser_call
from imptome.bench.timing import quartiles, round_order, synchronize
from imptome.config import MergeConfig

from denoiser_case import add_case_arguments, back_to_back, build_case
from profile_step import kernel_times


def timed_calls(call, device: torch.device, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# Kernel names that show a model operation: a kernel not in the unmerged model but named so is one that
# Inductor fused differently around the merge (or a matrix product at the merged shape), not imptome's alone.
# "split": the chunks of a DiT block's modulation (its gated residual add can take in the unmerge gather).
MODEL_OPERATION = re.compile(
    r"convolution|layer_norm|group_norm|gelu|silu|nvjet|xmma|cudnn|scaled_dot|add_(div_)?view|split"
)


@dataclass(frozen=True)
class CompiledVariant(Variant):
    """A bench variant, or importance-embedding-bag: importance with merge_kernel="embedding_bag"."""

    def config(self, family: str) -> MergeConfig:
        if self.name == "importance-embedding-bag":
            return replace(self, name="importance").config(family).replace(merge_kernel="embedding_bag")
        return super().config(family)


def inductor_model_kernels_us(kernel_us: dict[str, float], imptome_only: set[str]) -> float:
    """Time in the kernels Inductor generated (named triton_*) other than `imptome_only`: the model's
    elementwise and norm kernels, into which Inductor fuses the unmerge of a merged model."""
    inductor = (kernel for kernel in kernel_us if kernel.startswith("triton_") and kernel not in imptome_only)
    return sum(kernel_us[kernel] for kernel in inductor)


def kernels_not_in(unmerged: dict[str, float], merged: dict[str, float]) -> dict[str, float]:
    """The merged variant's kernels whose names the unmerged model never runs, most time first."""
    new = {kernel: us for kernel, us in merged.items() if kernel not in unmerged}
    return dict(sorted(new.items(), key=lambda item: -item[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, calls=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager': a dry run)")
    parser.add_argument(
        "--mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="Inductor mode; reduce-overhead replays CUDA graphs, which removes the launch cost that bounds "
        "an eager merged step on a GPU",
    )
    names = ["none", "tome", "importance", "importance-embedding-bag"]
    parser.add_argument("--variants", nargs="+", default=names, choices=names)
    parser.add_argument("--back-to-back", type=int, default=5, help="calls in a row per round (0: none)")
    parser.add_argument(
        "--profile-calls", type=int, default=0, help="profiled compiled calls per variant after the rounds"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    case = build_case(args)
    device = case.device
    variants = [CompiledVariant(name, 0.0 if name == "none" else args.ratio) for name in args.variants]
    # One copy of the model per variant, made before any is patched, so that the rounds can alternate. The
    # copies share their classes' compiled code, and Dynamo by default does not guard on module hooks, so a
    # graph traced for one copy could run for another: turn the hook guards on (for every variant alike).
    models = [case.model] + [copy.deepcopy(case.model) for _ in variants[1:]]
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    torch._dynamo.reset()
    counters.clear()
    rows, steps = [], []
    with contextlib.ExitStack() as patches, torch.inference_mode():
        for variant, model in zip(variants, models, strict=True):
            patches.enter_context(variant.applied(model, case.importance, case.timestep))
        for variant, model in zip(variants, models, strict=True):
            eager = _denoiser_call(model, case.inputs)
            compiled = _denoiser_call(torch.compile(model, backend=args.backend, mode=args.mode), case.inputs)
            before = counters["stats"]["unique_graphs"]
            compile_s = timed_calls(compiled, device, 1)[0]
            timed_calls(compiled, device, 2)
            timed_calls(eager, device, 2)
            graphs = counters["stats"]["unique_graphs"] - before
            print(f"{variant.label}: compiled in {compile_s:.0f} s, {graphs} graph(s)", flush=True)
            row = dict(variant=variant.label, compile_s=compile_s, graphs=graphs, eager=[], compiled=[])
            row["back_to_back"] = []
            rows.append(row)
            steps.append((eager, compiled))
        graphs = counters["stats"]["unique_graphs"]
        cases = list(zip(rows, steps, strict=True))
        for round_index in tqdm(range(args.calls), desc="rounds (every variant, eager and compiled)"):
            for row, (eager, compiled) in round_order(cases, round_index):
                row["eager"] += timed_calls(eager, device, 1)
                row["compiled"] += timed_calls(compiled, device, 1)
                if args.back_to_back:
                    row["back_to_back"].append(back_to_back(compiled, device, args.back_to_back))
        graphs_while_timed = counters["stats"]["unique_graphs"] - graphs
        if args.profile_calls:
            for row, (_, compiled) in zip(rows, steps, strict=True):
                row["kernel_us"] = kernel_times(compiled, device, args.profile_calls)
    kinds = ("eager", "compiled", "back_to_back") if args.back_to_back else ("eager", "compiled")
    for row in rows:
        for kind in kinds:
            row[f"{kind}_s"] = statistics.median(row[kind])
            row[f"{kind}_quartiles_s"] = quartiles(row[kind])
        row["graphs_while_timed"] = graphs_while_timed
    base = rows[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mode = args.mode or "default"
    print(f"\n{args.arch} {args.res}px, {args.dtype}, {name}, mode {mode}, medians of {args.calls} rounds\n")
    columns = ["graphs", "eager ms (IQR)", "speedup", "compiled ms (IQR)", "speedup", "vs eager none"]
    if args.back_to_back:
        columns += [f"{args.back_to_back} in a row, ms per call (IQR)", "speedup"]
    columns.append("compile s")
    print("| variant | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))

    def cell(row: dict, kind: str) -> str:
        low, high = row[f"{kind}_quartiles_s"]
        return f"{row[f'{kind}_s'] * 1e3:.1f} ({(high - low) * 1e3:.1f})"

    for row in rows:
        print(
            f"| {row['variant']} | {row['graphs']} "
            f"| {cell(row, 'eager')} | {base['eager_s'] / row['eager_s']:.2f}x "
            f"| {cell(row, 'compiled')} | {base['compiled_s'] / row['compiled_s']:.2f}x "
            f"| {base['eager_s'] / row['compiled_s']:.2f}x "
            + (
                f"| {cell(row, 'back_to_back')} | {base['back_to_back_s'] / row['back_to_back_s']:.2f}x "
                if args.back_to_back
                else ""
            )
            + f"| {row['compile_s']:.0f} |"
        )
    print(f"graphs compiled while timing: {graphs_while_timed}")
    if args.profile_calls and base["variant"] == "none":
        unmerged_us = sum(base["kernel_us"].values())
        unmerged_inductor_us = inductor_model_kernels_us(base["kernel_us"], set())
        print(f"\nkernel time per compiled call, {args.profile_calls} profiled calls per variant")
        for row in rows[1:]:
            new = kernels_not_in(base["kernel_us"], row["kernel_us"])
            total, own = sum(row["kernel_us"].values()), sum(new.values())
            imptome_only = {kernel for kernel in new if not MODEL_OPERATION.search(kernel)}
            alone = sum(new[kernel] for kernel in imptome_only)
            growth = inductor_model_kernels_us(row["kernel_us"], imptome_only) - unmerged_inductor_us
            row["kernel_total_us"], row["new_kernel_us"], row["imptome_only_kernel_us"] = total, own, alone
            row["inductor_model_kernel_growth_us"] = growth
            print(
                f"{row['variant']}: kernels {total / 1e3:.2f} ms (unmerged {unmerged_us / 1e3:.2f} ms), "
                f"not in the unmerged model {own / 1e3:.3f} ms, {own / total:.1%} (own work, at most); "
                f"of these, named for no model operation {alone / 1e3:.3f} ms, {alone / total:.1%} "
                f"(own work, at least); Inductor's model kernels {growth / 1e3:+.3f} ms against the unmerged "
                f"model's (the fused unmerge), with which own work is about {(alone + growth) / total:.1%}"
            )
            for kernel, us in list(new.items())[:12]:
                print(f"  {us:8.1f} us  {kernel[:120]}")
    cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    if args.mode == "reduce-overhead":  # why, when not 0: run with TORCH_LOGS=perf_hints
        print(f"graphs that Inductor did not capture as CUDA graphs: {cudagraph_skips}")
    if args.json:
        meta = dict(
            mode=mode,
            arch=args.arch,
            res=args.res,
            dtype=args.dtype,
            device=name,
            calls=args.calls,
            back_to_back=args.back_to_back,
            torch=torch.__version__,
            cudagraph_skips=cudagraph_skips,
        )
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
