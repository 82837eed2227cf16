"""`imptome demo`: its arguments (the job: `imptome.demo`)."""

from __future__ import annotations

import argparse

from imptome.cli import DTYPE_NAMES, add_set_argument
from imptome.miniature import GUIDANCE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="pipeline folder or hub id (default: the bundled miniature model)")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for more (default: 4 held-out)")
    parser.add_argument("--ratio", type=float, default=0.7, help="merge ratio of the merged variants")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="CFG scale (1 or less: no CFG)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (then +1 per prompt)")
    parser.add_argument("--out", default="imptome-demo.png", help="figure to write (.png when no suffix)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPE_NAMES), help="dtype of the weights"
    )
    add_set_argument(parser)
