"""imptome under torch.compile: denoiser step time, eager and compiled, unmerged and merged.

    python scripts/compile_speed.py --arch sd2 --res 1024 --device cuda --dtype float16 --json out.json

For each variant (unmerged, tome and importance at --ratio) the denoiser is patched, compiled with
`torch.compile` (default mode: Inductor kernels, no CUDA graphs; since imptome 0.2.0 planning, merge and
unmerge are traced into the denoiser's graph, and only the two denoiser hooks run outside it), warmed up,
and timed for --calls synchronised calls; the eager step is timed the same way for reference. Reports the compile time (first call), medians and speedups vs the unmerged step of the
same mode. On a GPU the eager step is bound by the host issuing kernels; compiling removes much of that
work, which is what this measures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from imptome.bench.speed import Variant, _denoiser_call
from imptome.bench.timing import synchronize

from denoiser_case import add_case_arguments, build_case


def timed_calls(call, device: torch.device, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_arguments(parser, calls=20)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend ('eager': a dry run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    case = build_case(args)
    device = case.device
    rows = []
    for variant in (Variant("none", 0.0), Variant("tome", args.ratio), Variant("importance", args.ratio)):
        torch._dynamo.reset()
        counters.clear()
        with case.patched(variant), torch.inference_mode():
            eager = case.call
            timed_calls(eager, device, 3)
            eager_s = statistics.median(timed_calls(eager, device, args.calls))
            compiled = _denoiser_call(torch.compile(case.model, backend=args.backend), case.inputs)
            compile_s = timed_calls(compiled, device, 1)[0]
            timed_calls(compiled, device, 3)
            graphs = counters["stats"]["unique_graphs"]
            compiled_s = statistics.median(timed_calls(compiled, device, args.calls))
            new_graphs = counters["stats"]["unique_graphs"] - graphs
        rows.append(
            dict(
                variant=variant.label,
                eager_s=eager_s,
                compiled_s=compiled_s,
                compile_s=compile_s,
                graphs=graphs,
                graphs_while_timed=new_graphs,
            )
        )
        print(
            f"{variant.label}: eager {eager_s * 1e3:.2f} ms, compiled {compiled_s * 1e3:.2f} ms "
            f"(first call {compile_s:.0f} s, {graphs} graphs, {new_graphs} more while timed)",
            flush=True,
        )
    base = rows[0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{args.arch} {args.res}px, {args.dtype}, {name}, median of {args.calls} calls\n")
    print("| variant | eager ms | speedup | compiled ms | speedup | vs eager unmerged | compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['eager_s'] * 1e3:.1f} | {base['eager_s'] / row['eager_s']:.2f}x "
            f"| {row['compiled_s'] * 1e3:.1f} | {base['compiled_s'] / row['compiled_s']:.2f}x "
            f"| {base['eager_s'] / row['compiled_s']:.2f}x | {row['compile_s']:.0f} |"
        )
    if args.json:
        meta = dict(
            arch=args.arch,
            res=args.res,
            dtype=args.dtype,
            device=name,
            calls=args.calls,
            torch=torch.__version__,
        )
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
