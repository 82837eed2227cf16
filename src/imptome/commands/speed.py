"""`imptome bench speed`: its arguments (the job: `imptome.bench.speed`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from imptome.bench.archs import ARCHS
from imptome.cli import DTYPE_NAMES

VARIANTS = ("none", "tome", "importance", "importance-per-layer", "importance-prop", "tomesd")
MEMORY_FORMATS = ("contiguous", "channels_last")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", nargs="+", help=f"architectures: {', '.join(ARCHS)} (default: all; 'a,b' or 'a b')"
    )
    parser.add_argument(
        "--res", nargs="+", help="image sizes in px, e.g. 512 768 (default: each architecture's own list)"
    )
    parser.add_argument("--ratios", nargs="+", help="merge ratios (default: 0.5 0.7)")
    parser.add_argument("--variants", nargs="+", help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the weights")
    parser.add_argument(
        "--attention",
        default="sdpa",
        choices=("sdpa", "math"),
        help="attention processor: torch scaled_dot_product_attention, or diffusers' explicit bmm + softmax",
    )
    parser.add_argument(
        "--memory-format",
        default="contiguous",
        choices=MEMORY_FORMATS,
        help="layout of the denoiser's convolution weights and of the latent (channels_last: NHWC, which "
        "cuDNN convolutions use natively, so no layout conversions around them)",
    )
    parser.add_argument("--frames", type=int, help="video frames for animatediff and svd (default: 16, 14)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per call; CFG doubles it (default 1)")
    parser.add_argument(
        "--generation-steps",
        type=int,
        default=0,
        help="also time whole generations of this many steps with imptome, DeepCache and both "
        "(sd15 / sd2 only; 0: off, else at least 4 so that DeepCache reuses its cache)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument(
        "--json", type=Path, default=Path("speed.json"), help="results JSON (default speed.json)"
    )
    parser.add_argument("--markdown", type=Path, help="results table (default: the JSON path with .md)")
