"""How unevenly each method's plans group tokens, next to its PSNR from the quality benchmark.

    python scripts/group_sizes.py --quality docs/results/quality.json --json docs/results/group_sizes.json

Without proportional attention, attention over the K kept tokens gives each kept token the weight of one
token, though it stands for a group of s tokens. The mass error of a plan is the total variation distance
between those two weightings of one row, 0.5 * sum over kept slots of |1/K - s/N|: 0 when every group has
the same size, near 1 when a few groups hold almost every token. This script runs the bundled model with the
quality benchmark's settings (guidance 5, 20 steps) on the held-out prompts, reads every plan of every
merging step (`imptome.merge_plan` after each step, warm-up pruning excluded) and reports per method and
ratio the mean mass error, the mean size of the largest group, and the share of tokens in groups of 5 or
more, with the PSNR of the same method and ratio from a quality JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import imptome
from imptome.bench.quality import Variant
from imptome.loading import load_pipeline
from imptome.miniature.data import held_out_prompts, prompt_for

METHODS = ("tome", "tome-per-layer", "importance", "importance-shuffled", "importance-paper")


def plan_statistics(source: torch.Tensor) -> torch.Tensor:
    """[B, 3] per row of source [B, N] (the kept token whose output each token receives): mass error,
    largest group size, share of tokens in groups of 5 or more."""
    num_tokens = source.shape[1]
    out = []
    for row in source:
        sizes = row.bincount(minlength=num_tokens)
        sizes = sizes[sizes > 0].double()
        mass_error = 0.5 * (1 / len(sizes) - sizes / num_tokens).abs().sum()
        out.append(torch.stack([mass_error, sizes.max(), sizes[sizes >= 5].sum() / num_tokens]))
    return torch.stack(out)


def measure(pipe, variant: Variant, prompts: list[str], seeds: list[int], steps: int) -> list[float]:
    rows = []

    def record(pipeline, step: int, timestep, kwargs: dict) -> dict:
        for plan in imptome.merge_plan(pipeline):
            if not plan.pruned:
                rows.append(plan_statistics(plan.source.cpu()))
        return kwargs

    with variant.applied(pipe):
        for seed in seeds:
            generators = [torch.Generator(pipe.device).manual_seed(seed) for _ in prompts]
            pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, generator=generators,
                 callback_on_step_end=record, output_type="latent")  # fmt: skip
    return torch.cat(rows).mean(dim=0).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 for every held-out prompt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quality", type=Path, help="a quality benchmark JSON to take the PSNR from")
    parser.add_argument("--json", type=Path, help="write the table as JSON")
    args = parser.parse_args()

    pipe = load_pipeline()
    prompts = [prompt_for(objects) for objects in held_out_prompts()]
    psnr = {}
    if args.quality:
        psnr = {(r["method"], r["ratio"]): r["psnr"] for r in json.loads(args.quality.read_text())["rows"]}
    results = []
    variants = [Variant(m, r) for r in args.ratios for m in args.methods]
    for variant in tqdm(variants, desc="plans", unit="variant"):
        mass_error, largest, in_large = measure(pipe, variant, prompts, list(range(args.seeds)), args.steps)
        results.append(
            {
                "method": variant.method,
                "ratio": variant.ratio,
                "mass_error": mass_error,
                "largest_group": largest,
                "share_in_groups_of_5_plus": in_large,
                "psnr": psnr.get((variant.method, variant.ratio)),
            }
        )
    table = Table(title=f"token groups, bundled model, {len(prompts)} prompts x {args.seeds} seeds")
    for name in ("method", "ratio", "mass error", "largest group", "tokens in groups >= 5", "PSNR dB"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in results:
        table.add_row(
            r["method"], f"{r['ratio']:g}", f"{r['mass_error']:.3f}", f"{r['largest_group']:.1f}",
            f"{r['share_in_groups_of_5_plus']:.1%}", "-" if r["psnr"] is None else f"{r['psnr']:.2f}",
        )  # fmt: skip
    Console().print(table)
    if args.json:
        report = {"command": "python scripts/group_sizes.py", "seeds": args.seeds, "rows": results}
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
