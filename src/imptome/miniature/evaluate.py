"""Evaluate the shipped miniature model on held-out prompts and write the figures to a JSON model card.

Figures (no token merging): with and without classifier-free guidance, the fraction of prompted objects
drawn with the right colour and shape (anywhere / at the prompted cell), read by the attribute classifier;
and the ratio of mean CFG importance |eps_cond - eps_uncond| (channel mean) inside prompted objects vs
background, captured with a forward hook on the UNet while the real pipeline runs.

    python -m imptome.miniature.evaluate [--steps 20] [--seeds 3] [--guidance 5 7.5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imptome.merge import cfg_importance

from . import classifier, data

CARD = Path(__file__).parent / "model_card.json"


def load_miniature_pipeline(path: str | Path | None = None) -> Any:
    """The shipped StableDiffusionPipeline (offline, safety checker off), or the one at `path`; weights are
    read from safetensors only, never unpickled."""
    from diffusers import StableDiffusionPipeline

    from . import miniature_path

    return StableDiffusionPipeline.from_pretrained(
        str(path or miniature_path()),
        use_safetensors=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


class ImportanceRecorder:
    """Forward hook on the UNet that accumulates |eps_cond - eps_uncond| (channel mean) under CFG."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.total: torch.Tensor | None = None
        self.steps = 0
        self.handle = unet.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        eps = output.sample if hasattr(output, "sample") else output[0]
        m = cfg_importance(eps, eps.shape[1])  # diffusers pipelines batch [uncond, cond]
        self.total = m if self.total is None else self.total + m
        self.steps += 1

    def mean_map(self) -> torch.Tensor:
        assert self.total is not None
        return self.total / self.steps

    def remove(self) -> None:
        self.handle.remove()


def generate(
    pipe: Any, obj_lists: list[list[data.Obj]], seeds: list[int], guidance: float, steps: int, batch: int = 36
) -> tuple[np.ndarray, list[str], list[list[data.Obj]], torch.Tensor | None]:
    """Images [n, H, W, 3] in [0, 1] for every (object list, seed); also the mean importance maps if CFG."""
    jobs = [(objs, s) for s in seeds for objs in obj_lists]
    images, maps = [], []
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        rec = ImportanceRecorder(pipe.unet) if guidance > 1 else None
        gens = [torch.Generator().manual_seed(s * 100_003 + j) for j, (_, s) in enumerate(chunk, start=i)]
        out = pipe(
            [data.prompt_for(o) for o, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        ).images
        images.append(out)
        if rec is not None:
            maps.append(rec.mean_map())
            rec.remove()
    prompts = [data.prompt_for(o) for o, _ in jobs]
    return np.concatenate(images), prompts, [o for o, _ in jobs], torch.cat(maps) if maps else None


def importance_ratio(maps: torch.Tensor, obj_lists: list[list[data.Obj]]) -> dict[str, float]:
    """Mean importance inside the given objects' masks / mean importance on background (latent grid).

    Images without any object in `obj_lists` are left out."""
    keep = [i for i, o in enumerate(obj_lists) if o]
    maps = maps[keep]
    masks = torch.from_numpy(np.stack([data.object_mask(obj_lists[i]) for i in keep]))[:, None]
    height, width = maps.shape[-2:]
    pooled = F.adaptive_avg_pool2d(masks, (height, width))[:, 0]
    inside, outside = pooled > 0.5, pooled < 0.05
    mi, mo = maps[inside].mean().item(), maps[outside].mean().item()
    per_image = [
        (m[i].mean() / m[o].mean()).item() for m, i, o in zip(maps, inside, outside, strict=True) if i.any()
    ]
    return {
        "inside": mi,
        "outside": mo,
        "ratio": mi / mo,
        "median_per_image_ratio": float(np.median(per_image)),
    }


def save_grid(images: np.ndarray, path: Path, cols: int = 12) -> None:
    """Save images [n, H, W, 3] in [0, 1] as one PNG grid."""
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.ones((rows * h, cols * w, 3), np.float32)
    for i, im in enumerate(images):
        grid[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)


def evaluate(
    model: str | Path | None = None,
    steps: int = 20,
    seeds: int = 3,
    guidance: tuple[float, ...] = (5.0, 7.5),
    threads: int = 2,
    grid_dir: Path | None = None,
) -> dict[str, Any]:
    torch.set_num_threads(threads)
    pipe = load_miniature_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    clf = classifier.load_classifier()
    obj_lists = data.held_out_prompts()
    seed_list = list(range(seeds))
    result: dict[str, Any] = {
        "prompts": "held-out: each of the 18 held-out (colour, shape, cell) triples alone and with a random "
        "second object (36 prompts)",
        "images_per_setting": len(obj_lists) * seeds,
        "steps": steps,
        "scheduler": type(pipe.scheduler).__name__,
    }
    for g in (1.0, *guidance):
        t0 = time.time()
        imgs, prompts, objs, maps = generate(pipe, obj_lists, seed_list, g, steps)
        s = classifier.score(imgs, prompts, clf)
        key = "no_cfg" if g == 1.0 else f"cfg_{g:g}"
        if grid_dir is not None:
            grid_dir.mkdir(parents=True, exist_ok=True)
            save_grid(imgs[: len(obj_lists)], grid_dir / f"samples_{key}.png")
        r = {k: v for k, v in s.items() if k != "per_image"}
        r["guidance_scale"] = g
        r["single_object_colour_shape_acc"] = float(
            np.mean([h[0][0] for h, o in zip(s["per_image"], objs, strict=True) if len(o) == 1])
        )
        if maps is not None:  # objects the classifier finds in the image, and the prompted ones
            drawn = classifier.describe(classifier.classify(imgs, clf))
            r["cfg_importance_drawn_objects"] = importance_ratio(maps, drawn)
            r["cfg_importance_prompted_cells"] = importance_ratio(maps, objs)
        r["seconds"] = round(time.time() - t0, 1)
        result[key] = r
        print(key, json.dumps(r), flush=True)
    return result


def describe_model(path: str | Path | None = None) -> dict[str, Any]:
    """Sizes and shapes of the pipeline's components."""
    pipe = load_miniature_pipeline(path)
    return {
        "unet_params": pipe.unet.num_parameters(),
        "text_encoder_params": pipe.text_encoder.num_parameters(),
        "vae_params": pipe.vae.num_parameters(),
        "image_size": data.IMAGE_SIZE,
        "latent_grid": pipe.unet.config.sample_size,
        "unet_blocks": list(pipe.unet.config.down_block_types),
        "unet_channels": list(pipe.unet.config.block_out_channels),
        "vocab_size": len(pipe.tokenizer),
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "scheduler": type(pipe.scheduler).__name__,
        "beta_schedule": pipe.scheduler.config.beta_schedule,
        "grammar": "'<row> <col>: <colour> <shape>' joined by ' and ' (1-2 objects, reading order)",
        "words": {"rows": data.ROWS, "cols": data.COLS, "colours": data.COLOUR_NAMES, "shapes": data.SHAPES},
        "held_out_triples": [
            [data.COLOUR_NAMES[c], data.SHAPES[s], data.POSITIONS[p]] for c, s, p in data.held_out_triples()
        ],
    }


def training_summary(run_dir: Path) -> dict[str, Any]:
    """Wall times, arguments, final step counts and position probes of a training run folder."""
    out: dict[str, Any] = {}
    if (run_dir / "timing.json").exists():
        t = json.loads((run_dir / "timing.json").read_text())
        out["wall_seconds"] = {**t, "total": round(sum(t.values()))}
    if (run_dir / "args.json").exists():
        out["args"] = json.loads((run_dir / "args.json").read_text())
    for name in ("vae", "unet"):
        f = run_dir / f"ckpt_{name}" / "state.json"
        if f.exists():
            out[f"{name}_steps"] = json.loads(f.read_text())["step"]
    log = run_dir / "train_log.txt"
    if log.exists():
        lines = [line.split("] ", 1)[1] for line in log.read_text().splitlines() if "] " in line]
        out["probes"] = [x for x in lines if x.startswith("probe")]
        out["stage_ends"] = [x for x in lines if "budget reached" in x or "finished at" in x]
        out["notes"] = [x for x in lines if x.startswith("NOTE")]
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse what the evaluation cannot use with a one-line usage error, before minutes of sampling."""
    for flag, value in (("--steps", a.steps), ("--seeds", a.seeds), ("--threads", a.threads)):
        if value < 1:
            ap.error(f"{flag} must be 1 or more, not {value}")
    low = [g for g in a.guidance if not g > 1]
    if low:
        ap.error(f"--guidance takes CFG scales above 1 (scale 1, no CFG, always runs), not {low[0]:g}")
    if a.model is not None and not (Path(a.model) / "model_index.json").is_file():
        ap.error(f"--model {a.model} is not a pipeline folder (no model_index.json)")
    if a.run_dir is not None and not a.run_dir.is_dir():
        ap.error(f"--run-dir {a.run_dir} is not a folder (the card's training section would be emptied)")
    if not a.out.parent.is_dir():
        ap.error(f"--out {a.out}: no folder {a.out.parent}")
    if a.out.exists():
        try:
            card = json.loads(a.out.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            ap.error(f"--out {a.out} is not a readable JSON model card ({error})")
        if not isinstance(card, dict):
            ap.error(f"--out {a.out} is not a JSON model card (not an object)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m imptome.miniature.evaluate", description=__doc__, formatter_class=_HelpFormatter
    )
    ap.add_argument("--model", default=None, help="pipeline folder (None: the shipped model)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    ap.add_argument("--guidance", type=float, nargs="+", default=[5.0, 7.5], help="CFG scales besides 1")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="training run folder whose timing, args and probes to include",
    )
    ap.add_argument("--out", type=Path, default=CARD, help="model card JSON to update")
    ap.add_argument("--grid-dir", type=Path, default=None, help="write sample grids (first seed) here")
    a = ap.parse_args(argv)
    _check_args(ap, a)
    res = evaluate(a.model, a.steps, a.seeds, tuple(a.guidance), a.threads, a.grid_dir)
    card = json.loads(a.out.read_text()) if a.out.exists() else {}
    card["model"] = describe_model(a.model)
    if a.run_dir is not None:
        card["training"] = training_summary(a.run_dir)
    card["evaluation"] = res
    a.out.write_text(json.dumps(card, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
