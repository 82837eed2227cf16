"""`imptome demo`: no merging vs ToMeSD-style vs importance merging (without and with proportional
attention), side by side, on the same seeds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import imptome
from imptome.bench.measure import DenoiserTimer
from imptome.bench.timing import busy_machine_note
from imptome.cli import (
    CliError,
    apply_patch_or_fail,
    check_output_files,
    check_seed,
    uses_bundled_model,
    warn_outside_grammar,
)
from imptome.loading import check_device, load_pipeline
from imptome.patch.api import find_denoiser
from imptome.visualize import comparison_grid, figure_path

# variant -> (MergeConfig.method, options added to --set's); "none" is the unpatched pipeline
VARIANTS = {
    "none": (None, {}),
    "tome": ("tome", {}),
    "importance": ("importance", {}),
    "importance+prop": ("importance", {"proportional_attention": True}),
}


# Prompts for a model given with --model (a text-to-image model of general images)
GENERAL_PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "a red fox in a snowy forest, detailed fur",
    "a bowl of fruit on a wooden table, studio lighting",
    "a lighthouse on a cliff at sunset, oil painting",
]


def default_prompts(model: str | None, count: int = 4) -> list[str]:
    """Held-out prompts of the bundled model (attribute combinations it never saw in training), or general
    ones for another model."""
    if not uses_bundled_model(model):
        return GENERAL_PROMPTS[:count]
    from imptome.miniature.data import held_out_prompts, prompt_for

    return [prompt_for(objects) for objects in held_out_prompts()[:count]]


@dataclass
class _Result:
    images: list
    step_seconds: float
    importance: torch.Tensor | None = None  # [U, h, w] the map the shown plan was built from
    roles: torch.Tensor | None = None  # [B, h, w] token roles of the shown plan
    step: int | None = None  # the step of the shown plan


def _generate(pipe, prompts, args, variant: str, progress: tqdm) -> _Result:
    denoiser = find_denoiser(pipe)
    method, extra = VARIANTS[variant]
    if method is None:
        imptome.remove_patch(pipe)
    else:
        apply_patch_or_fail(pipe, ratio=args.ratio, method=method, **{**args.options, **extra})
    middle = args.steps // 2
    captured: dict[str, Any] = {}  # the _Result fields importance, roles and step

    def on_step_end(pipeline, step: int, timestep, kwargs: dict) -> dict:
        # the plan of the middle step; for importance, of the first step from there whose plan used the map
        # (a short generation may reach the map only after its middle step, or never)
        wanted = method is not None and step >= middle and captured.get("importance") is None
        if wanted and (step == middle or method == "importance"):
            plans = imptome.merge_plan(pipeline)
            finest = max(plans, key=lambda p: p.grid[0] * p.grid[1], default=None)
            if finest is not None:
                captured["roles"], captured["step"] = finest.roles.cpu(), step
                captured["importance"] = None if finest.importance is None else finest.importance.cpu()
        progress.update(1)
        return kwargs

    generators = [torch.Generator(pipe.device).manual_seed(args.seed + i) for i in range(len(prompts))]
    try:
        with DenoiserTimer().attach(denoiser) as timer:
            images = pipe(
                prompts,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=generators,
                callback_on_step_end=on_step_end,
            ).images
    finally:
        imptome.remove_patch(pipe)
    return _Result(
        images, timer.median, captured.get("importance"), captured.get("roles"), captured.get("step")
    )


def _check_figure_format(args: argparse.Namespace) -> None:
    """A CliError unless matplotlib writes figures in the format of `args.figure`'s suffix (checked before any
    image is generated)."""
    try:
        figure_path(args.figure)
    except ValueError as error:
        raise CliError(f"--out {args.out}: {error}") from None


def run(args: argparse.Namespace) -> int:
    _check_figure_format(args)  # the other checks ran before torch was imported (imptome.commands.demo)
    prompts = args.prompt or default_prompts(args.model)
    check_seed(args.seed, len(prompts))  # one seed per prompt
    out = args.figure
    check_device(args.device)
    check_output_files({"--out": out})  # its folder is made for the figure: a failed run leaves none behind
    warn_outside_grammar(prompts, args.model)

    pipe = load_pipeline(args.model, args.device, args.dtype)
    pipe("warm-up", num_inference_steps=1, generator=torch.Generator(pipe.device).manual_seed(0))
    results: dict[str, _Result] = {}
    with tqdm(total=len(VARIANTS) * args.steps, desc="demo", unit="step") as progress:
        for variant in VARIANTS:
            progress.set_postfix_str(variant)
            results[variant] = _generate(pipe, prompts, args, variant, progress)

    n = len(prompts)
    columns = [("no merging", results["none"].images, "image")]
    for variant in ("tome", "importance"):
        result = results[variant]
        columns.append((f"{variant} {args.ratio:g}", result.images, "image"))
        if variant == "importance":
            title = f"importance {args.ratio:g} + prop. attention"
            columns.append((title, results["importance+prop"].images, "image"))
        if result.roles is not None:
            cond_rows = result.roles[-n:]  # the plan is shared by both CFG halves
            columns.append((f"{variant}: kept tokens, step {result.step}", list(cond_rows), "roles"))
    guided = results["importance"]
    if guided.importance is not None:
        columns.append((f"CFG importance used at step {guided.step}", list(guided.importance[:n]), "heatmap"))
    title = f"{args.model or 'bundled miniature model'}: {args.steps} steps, guidance {args.guidance:g}"
    title += "".join(f", {key}={value}" for key, value in args.options.items())
    out.parent.mkdir(parents=True, exist_ok=True)
    comparison_grid(out, prompts, columns, title=title)

    cfg = args.guidance > 1
    batch = f"batch {2 * n} with CFG" if cfg else f"batch {n} without CFG"
    table = Table(title=f"denoiser time per step ({pipe.device}, {batch})")
    for name in ("variant", "ratio", "median s/step", "speedup"):
        table.add_column(name, justify="right" if name != "variant" else "left")
    base = results["none"].step_seconds
    for variant, result in results.items():
        ratio = "0" if variant == "none" else f"{args.ratio:g}"
        table.add_row(variant, ratio, f"{result.step_seconds:.4f}", f"{base / result.step_seconds:.2f}x")
    console = Console()
    console.print(table)
    if uses_bundled_model(args.model):
        console.print(
            "(the bundled model is tiny, with a 16x16 latent: these times say nothing about speed at real "
            "sizes; see `imptome bench speed` and the README's results)"
        )
    note = busy_machine_note()
    if note is not None:
        console.print(note)
    if guided.importance is None:
        console.print(
            "No step of the importance variants used the CFG map: "
            + ("it needs guidance above 1." if not cfg else "it is used from a later step; add --steps.")
        )
    console.print(f"wrote {out}")
    return 0
