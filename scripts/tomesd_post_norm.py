"""Does tomesd's similarity measure explain its gap to imptome's per-block ToMeSD without guidance?

    python scripts/tomesd_post_norm.py --compare docs/results/quality_nocfg.cache -- \
        --seeds 8 --ratios 0.3 0.5 0.7 --guidance 1 --methods none tomesd tome-per-layer \
        --json docs/results/quality_nocfg_tomesd_post_norm.json

tomesd matches tokens by the cosine similarity of the transformer block's input; imptome by that of the
attention's input, after the block's `norm1`. This runs `imptome bench quality` (arguments after `--`) with
the tomesd package changed in that one respect: its `compute_merge` receives `norm1(x)` instead of `x` (only
the matching reads it; what is merged is unchanged). In this run's tables "tomesd" means that variant. With
`--compare CACHE` (a quality cache made with the unchanged package, same settings) it then prints paired
PSNR differences per ratio: post-norm tomesd minus tomesd, and `tome-per-layer` minus each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import tomesd
import tomesd.patch
from PIL import Image
from rich.console import Console
from rich.table import Table

from imptome.bench.metrics import bootstrap_ci, psnr, to_grid
from imptome.bench.quality import RESAMPLE, report_json
from imptome.cli import main as imptome_main


def use_post_norm_similarity() -> None:
    """Make tomesd match tokens on `block.norm1(x)`: a pre-hook on each patched block names the block
    whose `compute_merge` call comes next."""
    compute_merge, apply_patch = tomesd.patch.compute_merge, tomesd.apply_patch
    running: list = []

    def compute_merge_after_norm(x, tome_info):
        return compute_merge(running[0].norm1(x), tome_info)

    def note_block(block, args) -> None:
        running[:] = [block]

    def apply_patch_with_block_hooks(model, **kwargs):
        out = apply_patch(model, **kwargs)
        for module in getattr(model, "unet", model).modules():
            if hasattr(module, "_tome_info") and hasattr(module, "norm1"):
                module.register_forward_pre_hook(note_block)
        return out

    tomesd.patch.compute_merge = compute_merge_after_norm
    tomesd.apply_patch = apply_patch_with_block_hooks


def load(cache: Path, key: str) -> np.ndarray:
    return np.stack([np.asarray(Image.open(path)) for path in sorted((cache / key).glob("*.png"))])


def prompts_and_seeds(cache: Path, key: str) -> tuple[list[str], list[str]]:
    """The prompt and seed of each image `load` returns, from the cache's names (<prompt hash>_<seed>.png)."""
    names = [path.stem.rsplit("_", 1) for path in sorted((cache / key).glob("*.png"))]
    return [prompt for prompt, _ in names], [seed for _, seed in names]


def compare(run_cache: Path, other_cache: Path, ratios: list[str]) -> list[dict]:
    """Paired PSNR differences per ratio, dB with 95% bootstrap intervals over prompts and seeds (as the
    benchmark's); printed and returned."""
    reference = load(run_cache, "none@0")
    prompts, seeds = prompts_and_seeds(run_cache, "none@0")
    if not np.array_equal(reference, load(other_cache, "none@0")):
        raise SystemExit(f"{other_cache} has other unmerged images: not the same settings")
    columns = {
        "post_norm_minus_tomesd": ("post-norm tomesd minus tomesd", 0, 1),
        "per_layer_minus_post_norm": ("tome-per-layer minus post-norm", 2, 0),
        "per_layer_minus_tomesd": ("tome-per-layer minus tomesd", 2, 1),
    }
    table = Table("ratio", *(title for title, _, _ in columns.values()))
    out = []
    for ratio in ratios:
        values = [
            psnr(load(cache, f"{method}@{ratio}"), reference)
            for cache, method in (
                (run_cache, "tomesd"),
                (other_cache, "tomesd"),
                (run_cache, "tome-per-layer"),
            )
        ]
        row: dict = {"ratio": float(ratio)}
        for key, (_, a, b) in columns.items():
            difference = values[a] - values[b]
            difference[~np.isfinite(difference)] = np.nan  # an image equal to its unmerged one: no PSNR
            ci95 = bootstrap_ci(to_grid(difference, prompts, seeds), resample=RESAMPLE)
            row[key] = {"mean_db": float(np.nanmean(difference)), "ci95": ci95}
        out.append(row)
        table.add_row(
            ratio,
            *(
                f"{row[key]['mean_db']:+.2f} [{row[key]['ci95'][0]:+.2f}, {row[key]['ci95'][1]:+.2f}] dB"
                if row[key]["ci95"]
                else f"{row[key]['mean_db']:+.2f} [-] dB"  # fewer than 2 prompts or seeds
                for key in columns
            ),
        )
    Console().print(table)
    return out


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compare", type=Path, help="quality cache made with the unchanged tomesd")
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="-- then `imptome bench quality` options"
    )
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    use_post_norm_similarity()
    code = imptome_main(["bench", "quality", *bench_args])
    if code or args.compare is None:
        raise SystemExit(code)
    report_path = Path(bench_args[bench_args.index("--json") + 1])
    report = json.loads(report_path.read_text())
    cache = report_path.with_name(report_path.stem + ".cache")  # the benchmark's default --cache
    if "--cache" in bench_args:
        cache = Path(bench_args[bench_args.index("--cache") + 1])
    ratios = sorted({f"{row['ratio']:g}" for row in report["rows"] if row["method"] == "tomesd"})
    report["command"] = "python scripts/tomesd_post_norm.py " + " ".join(sys.argv[1:])
    report["post_norm_comparison"] = {
        "against": str(args.compare),
        "rows": compare(cache, args.compare, ratios),
    }
    report_path.write_text(report_json(report))


if __name__ == "__main__":
    cli()
