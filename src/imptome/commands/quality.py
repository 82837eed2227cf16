"""`imptome bench quality`: its arguments and method names (the job: `imptome.bench.quality`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from imptome.cli import DTYPE_NAMES
from imptome.miniature import GUIDANCE

METHODS = ("none", "tome", "importance", "tomesd")
# Ablations (DESIGN.md section 1 and the paper's discussion): MergeConfig options on top of method
# "importance" (the default MergeConfig: cell destinations, pool factor 1.0), or "tome" for tome-* names.
ABLATIONS: dict[str, dict[str, Any]] = {
    "importance-paper": {"dst_selection": "random", "pool_factor": 1.4},  # the paper's SD partition
    "importance-random": {"dst_selection": "random"},
    "importance-topk": {"dst_selection": "topk"},
    "importance-nowarmup": {"importance_start_step": 1, "merge_start_step": 0},
    "importance-per-layer": {"plan_scope": "layer"},
    "importance-prop": {"proportional_attention": True},
    # calls without a CFG map: ToMeSD's partition (0.3.0), and a random map with proportional attention
    # (the default fallback is the other way round: random without it, ToMeSD's with it)
    "importance-tomefallback": {"fallback": "tome"},
    "importance-prop-randomfallback": {"proportional_attention": True, "fallback": "random"},
    "importance-grid": {"matching": "grid"},  # sources matched by grid distance (the authors' PixArt code)
    # ToMeSD's partition planned in every block from that block's tokens, as the tomesd package does
    # (imptome's `tome` plans once per step from the first merged layer's tokens).
    "tome-per-layer": {"plan_scope": "layer"},
    # planned per block with each CFG half matched on its own tokens (the paper's and tomesd's matching)
    "importance-per-layer-rowmatch": {"plan_scope": "layer", "match_rows": "each"},
    "tome-per-layer-rowmatch": {"plan_scope": "layer", "match_rows": "each"},
    "tome-prop": {"proportional_attention": True},
    "tome-grid": {"matching": "grid"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="pipeline folder or hub id (default: the bundled miniature model)")
    parser.add_argument("--prompts", type=Path, help="one prompt per line (default: built-in held-out set)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[8], help="N (seeds 0..N-1) or a list")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"of {', '.join(METHODS)} (default: all), or ablations: {', '.join(ABLATIONS)}, "
        "importance or an importance-* ablation with -pool<factor> appended (e.g. importance-pool1.4), "
        "and any importance variant with -shuffled appended: a control whose importance map is shuffled "
        "every step",
    )
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="merge ratios")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help=f"also run {', '.join(ABLATIONS)} (the *fallback ones only with --guidance <= 1)",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="CFG scale; 1 or less turns it off")
    parser.add_argument("--batch-size", type=int, default=36, help="prompts per pipeline call")
    parser.add_argument("--json", type=Path, default=Path("quality.json"), help="results JSON")
    parser.add_argument("--markdown", type=Path, help="results table (default: next to --json)")
    parser.add_argument("--plot", type=Path, help="metric-vs-ratio plot (default: next to --json)")
    parser.add_argument("--cache", type=Path, help="image cache for resuming (default: <json>.cache/)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="dtype of the weights"
    )
