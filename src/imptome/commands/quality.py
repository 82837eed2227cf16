"""`imptome bench quality`: its arguments, method names and input checks (the job: imptome.bench.quality)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from imptome.cli import (
    MAX_RATIO,
    CliError,
    add_dtype_argument,
    add_model_argument,
    check_guidance,
    check_model,
    check_output_files,
    check_seed,
    output_beside_json,
    read_prompts,
    refuse_repeats,
    tomesd_installed,
)
from imptome.config import MergeConfig, Method
from imptome.miniature import GUIDANCE

METHODS = ("none", "tome", "importance", "tomesd")
# Ablations (the paper's choices and the README's defaults table): MergeConfig options on top of method
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


# A control, not a setting: "<method>-shuffled" runs the method with the importance map's positions shuffled
# before each step uses it (same values, random places). What it loses against the method is what the map's
# content buys.
SHUFFLED = "-shuffled"
_POOL = re.compile(r"(.+)-pool(\d+(?:\.\d+)?)")


def ablation_options(method: str) -> dict[str, Any] | None:
    """MergeConfig options of an ablation: `importance` or an ABLATIONS name, importance variants optionally
    followed by -pool<factor> and then by the -shuffled control; None for any other name."""
    shuffled = method.endswith(SHUFFLED)
    method = method.removesuffix(SHUFFLED)
    pool = _POOL.fullmatch(method)
    if pool is not None:
        method = pool.group(1)
    options = {} if method == "importance" else ABLATIONS.get(method)
    if options is None or (base_method(method) == "tome" and (pool is not None or shuffled)):
        return None
    return options if pool is None else {**options, "pool_factor": float(pool.group(2))}


def base_method(method: str) -> Method:
    """imptome's MergeConfig.method behind a bench method name ("tome" also stands in for tomesd)."""
    return "tome" if method.startswith("tome") else "importance"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--prompts", type=Path, help="one prompt per line (default: built-in held-out set)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[8], help="N (seeds 0..N-1) or a list")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"of {', '.join(METHODS)} (default: these four, tomesd where installed), or ablations: "
        f"{', '.join(ABLATIONS)}, "
        "importance or an importance-* ablation with -pool<factor> appended (e.g. importance-pool1.4), "
        "and any importance variant with -shuffled appended: a control whose importance map is shuffled "
        "every step",
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=[0.3, 0.5, 0.7],
        help=f"merge ratios, each 0 to {MAX_RATIO:g}",
    )
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
    parser.add_argument(
        "--cache", type=Path, help="image cache for resuming (default: --json with .cache for its suffix)"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    add_dtype_argument(parser)


def check(args: argparse.Namespace) -> None:
    """Everything checkable without torch or the model. Sets `args.prompt_list` (the prompts of --prompts or
    the built-in held-out set), `args.seed_list`, `args.method_list` (see `_methods`), `args.model_source`
    (the model's folder or hub id), and the output paths' defaults."""
    check_guidance(args.guidance)
    args.prompt_list = _read_prompts(args.prompts)
    args.seed_list = _seeds(args.seeds)
    args.method_list = _methods(args)
    if args.steps < 2:
        raise CliError(f"--steps {args.steps}: must be at least 2")
    if args.batch_size < 1:
        raise CliError(f"--batch-size {args.batch_size}: must be at least 1")
    args.model_source = check_model(args.model)
    _output_paths(args)


def _output_paths(args: argparse.Namespace) -> None:
    """Fill in the defaults of --markdown, --plot and --cache (next to --json) and check all four paths
    before any image is made."""
    outputs = {"--json": args.json}
    for name, suffix in (("markdown", ".md"), ("plot", ".png")):
        flag, path = output_beside_json(args, name, suffix)
        outputs[flag] = path
    cache_flag = "--cache" if args.cache else "--cache (default: --json with .cache)"
    args.cache = args.cache or args.json.with_name(args.json.stem + ".cache")
    if args.cache.exists() and not args.cache.is_dir():
        raise CliError(f"--cache {args.cache} is a file; the image cache is a folder")
    check_output_files(outputs, folders={cache_flag: args.cache})


def _read_prompts(path: Path | None) -> list[str]:
    if path is None:
        from imptome.miniature.data import held_out_prompts, prompt_for

        return [prompt_for(objects) for objects in held_out_prompts()]
    return read_prompts(str(path))


def _seeds(values: list[int]) -> list[int]:
    """`--seeds N` (seeds 0 .. N-1) or a list of distinct seeds (repeats would count images twice)."""
    if len(values) == 1:
        if values[0] < 1:
            raise CliError(f"--seeds {values[0]}: give a count >= 1 or a list of seeds")
        return list(range(values[0]))
    refuse_repeats("--seeds", values)
    for seed in values:
        check_seed(seed, flag="--seeds")
    return values


def _methods(args: argparse.Namespace) -> list[str]:
    """The methods to run at each ratio: --methods (default: every method) and the --ablations, without
    `none` (the job runs it once, unmerged); a CliError for an unknown one, or a ratio one does not allow."""
    refuse_repeats("--methods", args.methods or [])
    refuse_repeats("--ratios", args.ratios)
    methods = args.methods or [m for m in METHODS if m != "tomesd" or tomesd_installed()]
    unknown = [m for m in methods if m not in METHODS and ablation_options(m) is None]
    if unknown:
        choices = ", ".join(METHODS + tuple(ABLATIONS))
        raise CliError(
            f"unknown method(s) {unknown}; choose from {choices}, or importance or an importance-* ablation "
            "followed by -pool<factor> and/or -shuffled (e.g. importance-pool1.4, importance-paper-shuffled)"
        )
    if "tomesd" in methods and not tomesd_installed():
        raise CliError("method tomesd needs the tomesd package: pip install tomesd")
    if args.ablations:  # the fallback ablations make the same images as their base method with guidance
        ablations = [m for m in ABLATIONS if args.guidance <= 1 or "fallback" not in ABLATIONS[m]]
        methods = list(methods) + [m for m in ablations if m not in methods]
    methods = [method for method in methods if method != "none"]
    for ratio in args.ratios:
        for method in methods:
            try:
                MergeConfig(ratio=ratio, method=base_method(method), **(ablation_options(method) or {}))
            except ValueError as error:
                raise CliError(f"--ratios {ratio:g} for method {method}: {error}") from None
    return methods
