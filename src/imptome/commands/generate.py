"""`imptome generate`: its arguments (the job: `imptome.generate`)."""

from __future__ import annotations

import argparse

from imptome.cli import DTYPE_NAMES, add_set_argument

METHODS = ("none", "tome", "importance")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts", required=True, help="text file, one prompt per line (blank lines skipped)"
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing; re-runs resume)")
    parser.add_argument("--model", help="pipeline folder or hub id (default: the bundled miniature model)")
    parser.add_argument(
        "--method", default="importance", choices=METHODS, help="token merging method (default: %(default)s)"
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help="merge ratio (default: %(default)s; ignored with --method none)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed (default: %(default)s); every prompt uses the same seeds",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="images per prompt, seeds SEED .. SEED+SEEDS-1 (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    parser.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale; 1 or less turns it off (default: 5 for the bundled model, "
        "which suits it; 7.5, diffusers' usual, with --model)",
    )
    parser.add_argument("--height", type=int, help="image height in px (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in px (default: the model's)")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per pipeline call (default: %(default)s)"
    )
    parser.add_argument(
        "--device", help="e.g. cuda:0 or cpu (default: the device accelerate gives the process)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="dtype of the weights"
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile the denoiser in this mode after patching; reduce-overhead replays CUDA graphs, "
        "the fastest way to merge on a GPU (default: no compiling). The first images wait for compiling",
    )
    add_set_argument(parser)
