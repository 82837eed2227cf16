"""`imptome generate`: its arguments and input checks (the job: `imptome.generate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from imptome.cli import (
    MAX_RATIO,
    CliError,
    add_dtype_argument,
    add_model_argument,
    add_set_argument,
    check_guidance,
    check_model,
    check_seed,
    default_guidance,
    merge_options,
    read_prompts,
)

METHODS = ("none", "tome", "importance")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prompts", required=True, help="text file, one prompt per line (blank lines skipped)"
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing; re-runs resume)")
    add_model_argument(parser)
    parser.add_argument(
        "--method", default="importance", choices=METHODS, help="token merging method (default: %(default)s)"
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.5,
        help=f"merge ratio, 0 to {MAX_RATIO:g} with 2x2 cells (default: %(default)s; ignored with --method "
        "none)",
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
    add_dtype_argument(parser)
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile the denoiser in this mode after patching; reduce-overhead replays CUDA graphs, "
        "the fastest way to merge on a GPU (default: no compiling). The first images wait for compiling",
    )
    add_set_argument(parser, "--set proportional_attention=true --set fallback=tome")


def check(args: argparse.Namespace) -> None:
    """Everything checkable without torch or the model. Sets `args.options` (the --set options), the
    `args.guidance` default, `args.prompt_list` (the prompts of --prompts), `args.model_source` (the model's
    absolute folder, or its hub id) and `args.out_folder` (absolute; the job makes it once the device is
    checked, so that a refused run leaves no folder behind)."""
    if args.method == "none" and args.set:
        raise CliError("--set configures merging; it cannot be used with --method none")
    args.options = {} if args.method == "none" else merge_options(args.set, args.ratio, args.method)
    for name in ("steps", "seeds", "batch_size"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    check_seed(args.seed, args.seeds)
    if args.guidance is None:
        args.guidance = default_guidance(args.model)
    check_guidance(args.guidance)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise CliError(f"--{name} {value}: must be a positive multiple of 8")
    args.prompt_list = read_prompts(args.prompts)
    source = check_model(args.model)
    if Path(source).is_dir():
        source = str(Path(source).resolve())  # the same folder gives the same metadata from any working dir
    args.model_source = source
    args.out_folder = Path(args.out).expanduser().resolve()
