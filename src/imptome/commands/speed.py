"""`imptome bench speed`: its arguments and input checks (the job: `imptome.bench.speed`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from imptome.bench.archs import ARCHS
from imptome.cli import (
    MAX_RATIO,
    CliError,
    add_dtype_argument,
    check_output_files,
    output_beside_json,
    refuse_repeats,
    tomesd_installed,
)

VARIANTS = ("none", "tome", "importance", "importance-per-layer", "importance-prop", "tomesd")
MEMORY_FORMATS = ("contiguous", "channels_last")
DEFAULT_RATIOS = (0.5, 0.7)
DEEPCACHE_INTERVAL = 3  # the whole-generation timings' DeepCache setting (its own example's)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch", nargs="+", help=f"architectures: {', '.join(ARCHS)} (default: all; 'a,b' or 'a b')"
    )
    parser.add_argument(
        "--res", nargs="+", help="image sizes in px, e.g. 512 768 (default: each architecture's own list)"
    )
    parser.add_argument(
        "--ratios", nargs="+", help=f"merge ratios, each above 0 and at most {MAX_RATIO:g} (default: 0.5 0.7)"
    )
    parser.add_argument("--variants", nargs="+", help=f"of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds after the warm-up (default: %(default)s)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), help="(default: cuda when available)")
    add_dtype_argument(parser)
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
    parser.add_argument(
        "--batch", type=int, default=1, help="prompts per call; CFG doubles it (default: %(default)s)"
    )
    parser.add_argument(
        "--generation-steps",
        type=int,
        default=0,
        help="also time whole generations of this many steps with imptome, DeepCache and both (sd15 / sd2 "
        f"only; 0: off, else at least {DEEPCACHE_INTERVAL + 1} so that DeepCache reuses its cache)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads, torch.set_num_threads, at most the CPUs here (default: PyTorch's, all cores)",
    )
    parser.add_argument(
        "--json", type=Path, default=Path("speed.json"), help="results JSON (default: %(default)s)"
    )
    parser.add_argument("--markdown", type=Path, help="results table (default: next to --json, with .md)")


def check(args: argparse.Namespace) -> None:
    """Everything checkable without torch. Sets `args.arch_list`, `args.resolution_lists` (px per
    architecture), `args.ratio_list`, `args.variant_names` (the default list leaves out tomesd when it is
    not installed) and the `args.markdown` default."""
    for flag in ("arch", "res", "ratios", "variants"):
        values = getattr(args, flag)
        if values is not None and not _split(values):
            raise CliError(
                f"--{flag} {' '.join(values)}: no value given (leave --{flag} out for its default)"
            )
    archs = [name.lower() for name in _split(args.arch)] or list(ARCHS)
    unknown = [name for name in archs if name not in ARCHS]
    if unknown:
        raise CliError(f"unknown --arch {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    try:
        res_list = [int(value) for value in _split(args.res)]
        ratios = [float(value) for value in _split(args.ratios)] or list(DEFAULT_RATIOS)
    except ValueError as error:
        raise CliError(f"--res takes integers (px) and --ratios numbers: {error}") from None
    resolutions = {name: res_list or list(ARCHS[name].resolutions) for name in archs}
    for name, values in resolutions.items():
        for res in values:
            _check_res(name, res)
    joint = [name for name in archs if ARCHS[name].model_kind == "sd3"]
    if joint and args.attention == "math":
        raise CliError(f"--attention math: {', '.join(joint)} has SDPA joint attention only; use sdpa")
    names = [name.lower() for name in _split(args.variants)] or list(VARIANTS)
    bad = [name for name in names if name not in VARIANTS]
    if bad:
        raise CliError(f"unknown --variants {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if "tomesd" in names and not tomesd_installed():
        if args.variants:
            raise CliError("--variants tomesd needs the tomesd package: pip install 'imptome[bench]'")
        names.remove("tomesd")  # the default list: run the rest
    # a repeat would run the same case or variant twice: rows are one per (arch, res, variant, ratio)
    for flag, values in (("--arch", archs), ("--res", res_list), ("--ratios", ratios), ("--variants", names)):
        refuse_repeats(flag, values)
    for ratio in ratios:
        if not 0 < ratio <= MAX_RATIO:
            raise CliError(
                f"--ratios {ratio:g}: allowed 0 < ratio <= {MAX_RATIO:g} (at most N - D tokens can go)"
            )
    if args.rounds < 1:
        raise CliError(f"--rounds {args.rounds}: need at least 1")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads {args.threads}: need at least 1")
    cpus = os.cpu_count() or 1  # more threads only time their contention; thousands fail deep in torch
    if args.threads is not None and args.threads > cpus:
        raise CliError(f"--threads {args.threads}: this machine has {cpus} CPUs; give at most {cpus}")
    if args.batch < 1 or (args.frames is not None and args.frames < 1):
        raise CliError("--batch and --frames must be at least 1")
    video = [name for name in ARCHS if ARCHS[name].num_frames]
    if args.frames is not None and not any(name in video for name in archs):
        raise CliError(
            f"--frames {args.frames}: only the video denoisers ({', '.join(video)}) take frames, not "
            f"{', '.join(archs)}; add one of those to --arch or leave --frames out"
        )
    if args.generation_steps < 0 or 0 < args.generation_steps < DEEPCACHE_INTERVAL + 1:
        raise CliError(
            f"--generation-steps {args.generation_steps}: 0 (off) or at least {DEEPCACHE_INTERVAL + 1}, so "
            "that DeepCache reuses its cache at least once"
        )
    if args.generation_steps and all(ARCHS[name].model_kind != "sd" for name in archs):
        sd_unets = [name for name in ARCHS if ARCHS[name].model_kind == "sd"]
        raise CliError(
            f"--generation-steps: whole generations are timed on {', '.join(sd_unets)} only (DeepCache's "
            f"Stable Diffusion helper), not on {', '.join(archs)}; add one of those to --arch"
        )
    markdown_flag, markdown = output_beside_json(args, "markdown", ".md")
    check_output_files({"--json": args.json, markdown_flag: markdown})
    args.arch_list, args.resolution_lists, args.ratio_list, args.variant_names = (
        archs,
        resolutions,
        ratios,
        names,
    )


def _check_res(name: str, res: int) -> None:
    """A CliError unless `name` runs at `res` px: a positive multiple of the VAE's factor, and for the patch
    transformers (PixArt, SD3) of the factor times the patch size (a latent side that is not a multiple of the
    patch is cut to fewer tokens, so the step would be timed at a smaller image than the row names, or fail
    in the patch embedding), within SD3's position-embedding table."""
    spec = ARCHS[name]
    step = spec.vae_scale_factor * spec.patch_size
    if res <= 0 or res % step:
        raise CliError(f"--res {res}: image sizes for {name} must be positive multiples of {step} px")
    max_patches = spec.config.get("pos_embed_max_size") if spec.model_kind == "sd3" else None
    if max_patches is not None and res > max_patches * step:
        raise CliError(f"--res {res}: {name} takes at most {max_patches * step} px (its position embeddings)")


def _split(values: list[str] | None) -> list[str]:
    """`--x a b` and `--x a,b` alike."""
    return [item for value in values or [] for item in value.split(",") if item]
