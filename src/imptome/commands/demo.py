"""`imptome demo`: its arguments and input checks (the job: `imptome.demo`)."""

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
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--prompt",
        action="append",
        help="a prompt; repeat for more (default: 4 held-out prompts of the bundled model, which reads "
        "prompts like 'top left: red circle', see README; with --model, 4 general ones)",
    )
    parser.add_argument(
        "--ratio",
        type=float,
        default=0.7,
        help=f"merge ratio of the merged variants, above 0 and at most {MAX_RATIO:g} with 2x2 cells",
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument(
        "--guidance",
        type=float,
        help="CFG scale, 1 or less: no CFG (default: 5 for the bundled model, which suits it; 7.5, "
        "diffusers' usual, with --model)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then +1 per prompt)")
    parser.add_argument("--out", default="imptome-demo.png", help="figure to write (.png when no suffix)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    add_dtype_argument(parser)
    add_set_argument(parser, "--set dst_selection=random --set pool_factor=1.4 for the paper's partition")


def check(args: argparse.Namespace) -> None:
    """Everything checkable without torch, the model or matplotlib (which checks the figure's format). Sets
    `args.options` (the --set options of both merged variants) and `args.figure` (the figure's path)."""
    for variant in ("tome", "importance"):  # --set options apply to both merged variants
        args.options = merge_options(args.set, args.ratio, variant, method_flag=False)
    if "proportional_attention" in args.options:  # it would make two columns the same, and relabel tome
        raise CliError(
            "--set proportional_attention: the demo already shows importance with and without proportional "
            "attention; leave it out"
        )
    if args.ratio == 0:  # every column would be the unmerged images, with no plan or map to show
        raise CliError("--ratio 0: the merged variants would merge nothing; give a ratio above 0")
    if args.steps < 2:
        raise CliError(f"--steps {args.steps}: need at least 2 steps")
    check_seed(args.seed)
    if args.guidance is None:
        args.guidance = default_guidance(args.model)
    check_guidance(args.guidance)
    check_model(args.model)
    args.figure = _figure_path(args.out)


def _figure_path(name: str) -> Path:
    """The figure's path: `name`, with .png added when it has no suffix; a CliError when `name` is a folder.
    (The job checks the format and makes the folder, which needs matplotlib.)"""
    out = Path(name).expanduser()
    if out.is_dir():
        raise CliError(f"--out {name} is a folder; name a file in it, e.g. {out / 'imptome-demo.png'}")
    if not out.suffix:
        out = out.with_suffix(".png")
    return out
