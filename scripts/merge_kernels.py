"""Ways to compute the merge (the mean of each kept slot's tokens), timed alone at real shapes.

    python scripts/merge_kernels.py --device cuda --dtype float16 --json merge_kernels.json

Eager steps merge with one `embedding_bag(mode="mean")` over the tokens in slot order (and so did compiled
steps up to imptome 0.7; since 0.8.0 they use the Triton kernel below). On an H200 that kernel took 46 us per
call for PixArt-alpha's [2, 4096, 1152] fp16 tokens, about a tenth of the memory bandwidth, and its 28 calls
made 3.6% of a 35 ms merged step; under torch.compile Inductor calls the same kernel (a fallback, not a
lowering). This script times the alternatives on the plans imptome builds (2x2 cells, ratio --ratio, feature
matching on random tokens, CFG batch 2) before any of them replaces it:

- embedding_bag: `MergePlan.merge` in eager steps;
- index_add fp32 / index_add native: zeros, `index_add_` of every token into its slot, divide by the group
  sizes (atomics; in float32, or in the tokens' dtype);
- gather + segment_reduce: the tokens in slot order (`index_select`), then `torch.segment_reduce` mean;
- sparse CSR: the averaging matrix as a CSR tensor (the plan's bag offsets and order are its row pointers
  and column indices) times the tokens;
- triton segment mean: imptome's Triton kernel (`imptome.merge.kernels`, used by compiled CUDA steps with the
  default `merge_kernel="auto"` and with "triton"), one program per (slot, block of channels), summing its
  group's rows in float32 in slot order (no atomics, so deterministic); only where Triton runs;
- unmerge: one `index_select` back to every token, for scale (it moves as many bytes);
- "compiled ..." rows: the same functions under `torch.compile` (Inductor's own kernels where it has a
  lowering; index_add becomes one atomic-add kernel fused with the division; the Triton kernel is called
  from Inductor's wrapper, as in a compiled step).

Each row: the median time of one call started on an idle GPU (CUDA events around the call, so it includes
the host's time to launch it: for the compiled rows Dynamo's guards and Inductor's wrapper as well), the
summed kernel time per call from torch.profiler (the GPU's work alone, what a CUDA graph replays), the
bandwidth that kernel time gives (bytes read and written once), and the largest difference from the
float64 mean of the same groups. A way that cannot run says why.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from sdpa_bias import median_ms

from imptome.merge.noise import stream_id
from imptome.merge.partition import cell_partition
from imptome.merge.plan import MergePlan, build_plan

from profile_step import kernel_times

try:
    from imptome.merge import kernels
except ImportError:  # no Triton (PyTorch's CPU wheels)
    kernels = None


def kernel_us(fn: Callable[[], object], iters: int) -> float:
    """Microseconds of GPU kernels (and memsets or copies) per call of `fn`, from the profiler."""
    fn()
    return sum(kernel_times(fn, torch.device("cuda"), iters).values())


CASES = {  # rows (CFG batch 2), token grid, channels at the merged level
    "sd2-1024": (2, (128, 128), 320),
    "pixart-alpha-1024": (2, (64, 64), 1152),
    "sd3-1024": (2, (64, 64), 1536),
}


def make_plan(rows: int, grid: tuple[int, int], tokens: torch.Tensor, ratio: float) -> MergePlan:
    key = torch.tensor(stream_id(0, 1), dtype=torch.int64, device=tokens.device)
    dst_idx = cell_partition(1, grid, 2, 2, key)
    num_remove = math.floor(grid[0] * grid[1] * ratio)
    return build_plan(dst_idx, num_remove, grid, rows, metric=tokens[:1])


def group_sizes(plan: MergePlan) -> torch.Tensor:
    """[B * K] tokens per slot, from the bag offsets."""
    ends = torch.cat([plan.bag_offsets[1:], plan.bag_offsets.new_tensor([plan.bag_order.numel()])])
    return ends - plan.bag_offsets


def ways(plan: MergePlan, dtype: torch.dtype) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each way: [B * N, C] tokens -> [B * K, C] slot means."""
    sizes = group_sizes(plan)
    slots = sizes.numel()
    divisor = sizes.unsqueeze(1).float()
    segment_offsets = torch.cat([plan.bag_offsets, plan.bag_offsets.new_tensor([plan.bag_order.numel()])])

    def embedding_bag(tokens):
        return F.embedding_bag(plan.bag_order, tokens, plan.bag_offsets, mode="mean")

    def index_add_fp32(tokens):
        total = tokens.new_zeros(slots, tokens.shape[1], dtype=torch.float32)
        return (total.index_add_(0, plan.flat_slot, tokens.float()) / divisor).to(dtype)

    def index_add_native(tokens):
        total = tokens.new_zeros(slots, tokens.shape[1])
        return total.index_add_(0, plan.flat_slot, tokens) / divisor.to(dtype)

    def gather_segment_reduce(tokens):
        ordered = tokens.index_select(0, plan.bag_order)
        return torch.segment_reduce(ordered, "mean", offsets=segment_offsets, axis=0)

    values = (1.0 / sizes.double()).repeat_interleave(sizes).to(dtype)
    averaging = torch.sparse_csr_tensor(
        segment_offsets, plan.bag_order, values, size=(slots, plan.flat_slot.numel())
    )

    def sparse_csr(tokens):
        return averaging @ tokens

    def triton_mean(tokens):
        if kernels is None:
            raise RuntimeError("Triton is not installed")
        return kernels.segment_mean(tokens, plan.bag_order, plan.bag_offsets)

    def unmerge(tokens):  # [B * N, C] in, so the input is the right size: gather K rows' worth back to N
        return tokens[:slots].index_select(0, plan.flat_slot)

    return {
        "embedding_bag": embedding_bag,
        "index_add fp32": index_add_fp32,
        "index_add native": index_add_native,
        "gather + segment_reduce": gather_segment_reduce,
        "sparse CSR": sparse_csr,
        "triton segment mean": triton_mean,
        "unmerge (index_select)": unmerge,
        "compiled embedding_bag": torch.compile(embedding_bag, dynamic=False),
        "compiled index_add fp32": torch.compile(index_add_fp32, dynamic=False),
        "compiled index_add native": torch.compile(index_add_native, dynamic=False),
        "compiled triton segment mean": torch.compile(triton_mean, dynamic=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = []
    for case in args.cases:
        rows, grid, channels = CASES[case]
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randn(rows, grid[0] * grid[1], channels, generator=generator).to(device, dtype)
        plan = make_plan(rows, grid, tokens, args.ratio)
        flat = tokens.reshape(-1, channels)
        reference = F.embedding_bag(plan.bag_order, flat.double(), plan.bag_offsets, mode="mean")
        moved = (flat.numel() + reference.numel()) * flat.element_size()
        print(f"\n{case}: tokens {tuple(tokens.shape)} {args.dtype}, kept {plan.num_kept} per row, {name}")
        print("| way | median us, one call | kernel us | GB/s | max abs diff vs float64 |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, way in ways(plan, dtype).items():
            row = {"case": case, "way": label, "device": name, "dtype": args.dtype, "ratio": args.ratio}
            try:
                out = way(flat)
                ms = median_ms(lambda way=way, flat=flat: way(flat), args.iters, device)
            except Exception as error:  # a way this build or device cannot run
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                print(f"| {label} | cannot run: {row['error']} | | | |")
                results.append(row)
                continue
            error = None
            if not label.startswith("unmerge"):
                error = (out.double() - reference).abs().max().item()
            gpu_us = None
            if device.type == "cuda":
                gpu_us = kernel_us(lambda way=way, flat=flat: way(flat), args.iters)
            busy_us = ms * 1e3 if gpu_us is None else gpu_us  # on the CPU the call's time is the work
            row |= {"median_us": ms * 1e3, "kernel_us": gpu_us, "gb_per_s": moved / busy_us / 1e3}
            row["max_abs_diff"] = error
            shown = "-" if error is None else f"{error:.2e}"
            kernel = "-" if gpu_us is None else f"{gpu_us:.1f}"
            print(f"| {label} | {ms * 1e3:.1f} | {kernel} | {row['gb_per_s']:.0f} | {shown} |")
            results.append(row)
        if args.json:  # after every case, so a run cut short keeps what it measured
            args.json.write_text(json.dumps({"rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
