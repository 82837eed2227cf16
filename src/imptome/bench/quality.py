"""`imptome bench quality`: does importance merging beat random merging at the same ratio?

Every method runs in one process on the same prompts and seeds. Images are cached as PNGs under
`--cache` as they are made, so an interrupted run resumes where it stopped. Metrics:

- accuracy: prompted objects drawn with the right colour and shape (read by the bundled classifier);
  position_accuracy: also in the prompted cell; both with 95% bootstrap intervals that resample prompts
  and seeds (RESAMPLE; so do those of PSNR, SSIM and the paired differences); prompts outside the bundled
  model's grammar are not scored (a warning names them);
- frechet: Frechet distance between classifier features of the generated images and of real procedural
  images of the same prompts (the FID analogue);
- psnr / ssim: each merged image against the unmerged image of the same prompt and seed;
- step_seconds: median denoiser call time at the benchmark's batch size; flops_per_step: FLOPs of one
  denoiser call for one prompt (batch 2 with CFG, 1 with --guidance <= 1), averaged over the schedule,
  merge overhead included.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

import imptome
from imptome.bench.baseline import seed_tomesd, tomesd_patched
from imptome.bench.measure import DenoiserTimer, denoiser_flops
from imptome.bench.metrics import bootstrap_ci, frechet_distance, psnr, ssim, to_grid
from imptome.bench.timing import busy_machine_note, package_versions
from imptome.cli import CliError
from imptome.commands.quality import SHUFFLED, ablation_options, base_method
from imptome.files import write_atomically
from imptome.loading import check_device, load_pipeline, model_fingerprint
from imptome.miniature.data import grammar, parse_prompts, quote_some
from imptome.patch.api import find_denoiser, patch_state
from imptome.visualize import figure_path, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# "<ablation>-rowmatch" is that ablation with each CFG half matched on its own tokens; it is paired with it.
ROW_MATCH = "-rowmatch"


@dataclass(frozen=True)
class Variant:
    method: str  # a METHODS entry or an ablation (see ablation_options)
    ratio: float

    @property
    def key(self) -> str:
        return f"{self.method}@{self.ratio:g}"

    @contextmanager
    def applied(self, pipe: Any) -> Iterator[None]:
        """The method patched into `pipe` for the duration (nothing for `none`)."""
        imptome.remove_patch(pipe)
        if self.method == "tomesd":
            with tomesd_patched(pipe, self.ratio):
                yield
            return
        handles = []
        if self.method != "none":
            options = ablation_options(self.method) or {}
            imptome.apply_patch(pipe, ratio=self.ratio, method=base_method(self.method), **options)
            if self.method.endswith(SHUFFLED):
                handles.append(_shuffle_importance(pipe))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            imptome.remove_patch(pipe)


def _shuffle_importance(pipe: Any) -> RemovableHandle:
    """After each denoiser call (after imptome's own hook), permute the positions of the stored importance
    map [U, H, W]: one permutation per step, seeded by the step, so reruns and resumed runs agree."""
    state = patch_state(pipe)
    assert state is not None  # patched by the caller

    def shuffle(module: torch.nn.Module, args: tuple, output: Any) -> None:
        importance = state.importance
        if importance is not None:
            generator = torch.Generator().manual_seed(state.step)
            order = torch.randperm(importance[0].numel(), generator=generator).to(importance.device)
            state.importance = importance.flatten(1)[:, order].view_as(importance)

    return find_denoiser(pipe).register_forward_hook(shuffle)


@dataclass
class Row:
    method: str
    ratio: float
    n_images: int
    accuracy: float | None
    accuracy_ci95: tuple[float, float] | None
    position_accuracy: float | None
    position_accuracy_ci95: tuple[float, float] | None
    frechet: float | None
    psnr: float | None
    psnr_ci95: tuple[float, float] | None
    ssim: float | None
    ssim_ci95: tuple[float, float] | None
    step_seconds: float | None
    flops_per_step: float
    n_scored: int | None = None  # images of prompts the classifier reads: accuracies and Frechet rest on them
    # per image, as grids [prompt][seed] (the report's prompt_texts and seeds; null where not measured):
    # psnr, ssim, hits, position_hits, objects; enough to recompute every interval without the images
    per_image: dict[str, list[list[float | None]]] | None = None


# ---------------------------------------------------------------------------------------------- inputs


def _unscorable_warning(prompts: list[str], objects: list[list | None]) -> str | None:
    """What the user is told when some prompts are outside the classifier's grammar; None when all are in."""
    outside = [prompt for prompt, objs in zip(prompts, objects, strict=True) if objs is None]
    if not outside:
        return None
    shown = quote_some(outside, 5)
    scored = len(prompts) - len(outside)
    covered = f"cover only the other {scored} prompt(s)" if scored else "are not computed ('-')"
    return (
        f"imptome: warning: the attribute classifier cannot score {len(outside)} of {len(prompts)} "
        f"prompt(s): {shown}; accuracy, position accuracy and Frechet distance {covered}. "
        f"The classifier reads {grammar()}."
    )


# ---------------------------------------------------------------------------------------------- images


class ImageCache:
    """PNG per (variant, prompt, seed), named by the prompt's text (a run with other prompts finds only the
    images of prompts it shares); written atomically, so a file that exists is complete."""

    def __init__(self, root: Path, settings: dict[str, Any], prompts: list[str]) -> None:
        self.root, self.settings = root, settings
        self._prompt_keys = [hashlib.sha256(prompt.encode()).hexdigest()[:16] for prompt in prompts]
        self._settings_file = root / "settings.json"
        if self._settings_file.exists():
            previous = json.loads(self._settings_file.read_text())
            # the weights identify the model; its path differs between installs of the bundled model
            differing = [key for key in settings if key != "model" and previous.get(key) != settings[key]]
            if differing:
                details = ", ".join(f"{k} {previous.get(k)!r} (now {settings[k]!r})" for k in differing)
                raise CliError(
                    f"cache {root} holds images made with other settings: {details}; use another --cache"
                )

    def _claim(self) -> None:
        """Create the cache with its settings on the first write (not before: a run that fails to load its
        model must not leave a cache that refuses the next run's settings)."""
        if not self._settings_file.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomically(self._settings_file, json.dumps(self.settings, indent=1).encode())

    def path(self, variant: Variant, prompt_index: int, seed: int) -> Path:
        return self.root / variant.key / f"{self._prompt_keys[prompt_index]}_{seed}.png"

    def has(self, variant: Variant, prompt_index: int, seed: int) -> bool:
        return self.path(variant, prompt_index, seed).exists()

    def save(self, variant: Variant, prompt_index: int, seed: int, image: Image.Image) -> None:
        self._claim()
        path = self.path(variant, prompt_index, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        image.save(png, format="PNG")
        write_atomically(path, png.getvalue())

    def load(self, variant: Variant, items: list[tuple[int, int]]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(self.path(variant, p, s)).convert("RGB")) for p, s in items])

    def stats(self, variant: Variant) -> dict[str, Any]:
        path = self.root / variant.key / "stats.json"
        return json.loads(path.read_text()) if path.exists() else {"step_seconds": []}

    def save_stats(self, variant: Variant, stats: dict[str, Any]) -> None:
        self._claim()
        path = self.root / variant.key / "stats.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(stats).encode())


def _generate_variant(pipe, variant, prompts, items, cache, args, progress) -> None:
    """Make the missing images of one variant; record step times and FLOPs.

    Batches are fixed slices of `items`, and a batch with any image missing is made whole: an image's merge
    draws depend on its row in the batch, so a resumed run makes the images an uninterrupted one would.
    tomesd's draws (one partition per block call for the whole batch) come from a generator seeded with the
    batch's first index, not from its fork of the process's global RNG."""
    stats = cache.stats(variant)
    denoiser = find_denoiser(pipe)
    with variant.applied(pipe):
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            missing = [(p, s) for p, s in batch if not cache.has(variant, p, s)]
            if not missing:
                continue
            generators = [torch.Generator(pipe.device).manual_seed(seed) for _, seed in batch]
            if variant.method == "tomesd":  # its partitions drawn for this batch, as in every run
                seed_tomesd(pipe, start)
            with DenoiserTimer().attach(denoiser) as timer:
                images = pipe(
                    [prompts[p] for p, _ in batch],
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=generators,
                ).images
            for (p, s), image in zip(batch, images, strict=True):
                if (p, s) in missing:
                    cache.save(variant, p, s, image)
            stats["step_seconds"].append(timer.median)
            cache.save_stats(variant, stats)
            progress.update(len(missing))
        if "flops_per_step" not in stats:
            generator = torch.Generator(pipe.device).manual_seed(0)
            stats["flops_per_step"] = denoiser_flops(
                denoiser,
                lambda: pipe(
                    prompts[0],
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=generator,
                ),
            )
            cache.save_stats(variant, stats)


# ---------------------------------------------------------------------------------------------- metrics


def _reference_images(objects: list[list], items: list[tuple[int, int]]) -> np.ndarray:
    """Real procedural images of the same prompts (one per prompt and seed)."""
    from imptome.miniature.data import render

    images = [render(objects[p], np.random.default_rng([seed, p, 7])) for p, seed in items]
    return np.round(np.stack(images) * 255).astype(np.uint8)


def _score(images, prompts, items, classifier) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: objects right anywhere, objects right at their cell, and prompted objects."""
    from imptome.miniature.classifier import score

    result = score(list(images), [prompts[p] for p, _ in items], classifier)
    anywhere = np.array([sum(a for a, _ in hits) for hits in result["per_image"]], dtype=float)
    placed = np.array([sum(p for _, p in hits) for hits in result["per_image"]], dtype=float)
    counts = np.array([len(hits) for hits in result["per_image"]], dtype=float)
    return anywhere, placed, counts


# How the intervals resample the grid [prompt, seed] of images: the images of one prompt share its content
# (and its failures), and all prompts at one seed share the initial noise (and, at the default batch size,
# one batch). So prompts and seeds are drawn independently, each drawn prompt bringing its images at each
# drawn seed (bootstrap_ci's two-way bootstrap). On the published 288-image run the seed carried most of
# the spread of mean PSNR; see docs/RESULTS.md ("How the intervals are computed").
RESAMPLE = (0, 1)
INTERVALS = (
    "95% percentile-bootstrap intervals (2000 rounds) that draw prompts and seeds independently, each drawn "
    "prompt bringing its images at each drawn seed; accuracies are ratios of summed hits to summed objects; "
    "[-]: fewer than 2 prompts or 2 seeds"
)


def _per_image_json(grids: dict[str, np.ndarray]) -> dict[str, list[list[float | None]]]:
    """Grids [prompt, seed] as JSON lists, NaN as null; PSNR to 0.001 dB and SSIM to 1e-5 (far below their
    intervals), counts as integers."""
    digits = {"psnr": 3, "ssim": 5}
    out = {}
    for name, grid in grids.items():
        if name in digits:
            out[name] = [
                [None if np.isnan(v) else round(float(v), digits[name]) for v in row] for row in grid
            ]
        else:
            out[name] = [[None if np.isnan(v) else int(v) for v in row] for row in grid]
    return out


def evaluate(cache, variants, prompts, items, objects) -> tuple[list[Row], list[dict[str, Any]]]:
    """Metrics of every variant, and paired differences (accuracy, PSNR) over the same prompts and seeds:
    each importance variant minus every imptome tome variant (tome, tome-per-layer, ...) at the same ratio,
    each method minus its -shuffled control, and each -rowmatch ablation minus the ablation it extends.
    Accuracies and Frechet distances cover the images of the prompts in `objects` that are not None.
    Intervals resample prompts and seeds (RESAMPLE): per-image values go into grids [prompt, seed] first."""
    classifier = None
    real_features = None
    scored = [i for i, (p, _) in enumerate(items) if objects[p] is not None]  # indices into items
    scored_items = [items[i] for i in scored]
    if scored:
        from imptome.miniature.classifier import features, load_classifier

        classifier = load_classifier()
        real_features = features(_reference_images(objects, scored_items), classifier).numpy()
    # every prompt is a row (in prompt order) and every seed a column, also where a metric has no value
    seeds = list(dict.fromkeys(seed for _, seed in items))

    def grid(per_image: np.ndarray, where: list[int] | None = None) -> np.ndarray:
        """[prompts, seeds] of the values of all items, or of items[where]; NaN elsewhere."""
        chosen = items if where is None else [items[i] for i in where]
        prompt_of, seed_of = [p for p, _ in chosen], [seed for _, seed in chosen]
        return to_grid(per_image, prompt_of, seed_of, list(range(len(prompts))), seeds)

    def interval(values: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float] | None:
        return bootstrap_ci(values, weights, resample=RESAMPLE)

    baseline = cache.load(Variant("none", 0.0), items)
    rows: list[Row] = []
    # key -> grids of hits, object counts (None: prompts not scored) and PSNR, for paired differences
    paired: dict[str, tuple[np.ndarray | None, np.ndarray | None, np.ndarray]] = {}
    for variant in tqdm(variants, desc="metrics", unit="variant"):
        images = cache.load(variant, items)
        stats = cache.stats(variant)
        accuracy = accuracy_ci = placed_acc = placed_ci = frechet = None
        grids: dict[str, np.ndarray] = {}
        if classifier is not None:
            anywhere, placed, counts = _score(images[scored], prompts, scored_items, classifier)
            grids |= {"hits": grid(anywhere, scored), "position_hits": grid(placed, scored)}
            grids["objects"] = grid(counts, scored)
            accuracy, accuracy_ci = anywhere.sum() / counts.sum(), interval(grids["hits"], grids["objects"])
            placed_acc = placed.sum() / counts.sum()
            placed_ci = interval(grids["position_hits"], grids["objects"])
            assert real_features is not None  # made with the classifier
            frechet = frechet_distance(features(images[scored], classifier).numpy(), real_features)
        fidelity: dict[str, Any] = {"psnr": None, "psnr_ci95": None, "ssim": None, "ssim_ci95": None}
        if variant.method != "none":
            all_db = psnr(images, baseline)
            db = all_db[np.isfinite(all_db)]  # identical images have no finite PSNR
            similarity = ssim(images, baseline)
            grids |= {"psnr": grid(np.where(np.isfinite(all_db), all_db, np.nan)), "ssim": grid(similarity)}
            paired[variant.key] = (grids.get("hits"), grids.get("objects"), grids["psnr"])
            fidelity = {
                "psnr": float(db.mean()) if len(db) else None,
                "psnr_ci95": interval(grids["psnr"]) if len(db) else None,
                "ssim": float(similarity.mean()),
                "ssim_ci95": interval(grids["ssim"]),
            }
        rows.append(
            Row(
                method=variant.method,
                ratio=variant.ratio,
                n_images=len(images),
                accuracy=None if accuracy is None else float(accuracy),
                accuracy_ci95=accuracy_ci,
                position_accuracy=None if placed_acc is None else float(placed_acc),
                position_accuracy_ci95=placed_ci,
                frechet=frechet,
                **fidelity,
                step_seconds=float(np.median(stats["step_seconds"])) if stats["step_seconds"] else None,
                flops_per_step=float(stats["flops_per_step"]),
                n_scored=len(scored_items),
                per_image=_per_image_json(grids) if grids else None,
            )
        )
    # (variant, baseline): importance variants against imptome's tome variants, methods against their control,
    # row matching against shared matching
    tomes = [v for v in variants if base_method(v.method) == "tome" and v.method != "tomesd"]
    pairs = []
    for variant in variants:
        if variant.method.startswith("importance"):
            pairs += [(variant, tome) for tome in tomes if tome.ratio == variant.ratio]
        if variant.method.endswith(SHUFFLED):
            pairs.append((Variant(variant.method.removesuffix(SHUFFLED), variant.ratio), variant))
        if variant.method.endswith(ROW_MATCH):
            pairs.append((variant, Variant(variant.method.removesuffix(ROW_MATCH), variant.ratio)))
    comparisons = []
    for variant, baseline in pairs:
        if variant.key not in paired or baseline.key not in paired:
            continue
        (hits, objects, db), (base_hits, _, base_db) = paired[variant.key], paired[baseline.key]
        db_diff = db - base_db  # NaN where either image equals its unmerged one (no finite PSNR)
        has_diff = bool(np.isfinite(db_diff).any())
        accuracy_diff = accuracy_ci = None
        if hits is not None and base_hits is not None and objects is not None:  # the classifier scores them
            hits_diff = hits - base_hits
            accuracy_diff = float(np.nansum(hits_diff) / np.nansum(objects))
            accuracy_ci = interval(hits_diff, objects)
        comparisons.append(
            {
                "method": variant.method,
                "baseline": baseline.method,
                "ratio": variant.ratio,
                "accuracy_diff": accuracy_diff,
                "accuracy_ci95": accuracy_ci,
                "psnr_diff_db": float(np.nanmean(db_diff)) if has_diff else None,
                "psnr_ci95": interval(db_diff) if has_diff else None,
            }
        )
    return rows, comparisons


# ---------------------------------------------------------------------------------------------- output


def report_json(report: Any, indent: str = "") -> str:
    """JSON as json.dumps(indent=1) writes it, but each list of numbers on one line (a per-image grid: one
    line per prompt), so that 288 images x 25 rows stay a few hundred kB that a reader can page through."""

    if isinstance(report, list) and not any(isinstance(v, dict | list) for v in report):
        return json.dumps(report, separators=(", ", ": "))
    inner = indent + " "
    if isinstance(report, dict) and report:
        items = [f"{inner}{json.dumps(key)}: {report_json(value, inner)}" for key, value in report.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(report, list) and report:
        items = [inner + report_json(value, inner) for value in report]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return json.dumps(report)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ci(value: float | None, ci: tuple[float, float] | None, digits: int = 3, sign: str = "") -> str:
    if value is None:
        return "-"
    if ci is None:  # too few prompts or seeds to resample
        return f"{value:{sign}.{digits}f} [-]"
    return f"{value:{sign}.{digits}f} [{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]"


def markdown_table(rows: list[Row], comparisons: list[dict[str, Any]], cfg: bool) -> str:
    header = (
        "| method | ratio | images | accuracy [95% CI] | position acc. [95% CI] | Frechet "
        "| PSNR dB [95% CI] | SSIM | s/step (batch) | GFLOPs/step (1 prompt) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r.method} | {r.ratio:g} | {r.n_images} | {_fmt_ci(r.accuracy, r.accuracy_ci95)} "
        f"| {_fmt_ci(r.position_accuracy, r.position_accuracy_ci95)} | {_fmt(r.frechet, 2)} "
        f"| {_fmt_ci(r.psnr, r.psnr_ci95, 2)} | {_fmt(r.ssim)} | {_fmt(r.step_seconds, 4)} "
        f"| {r.flops_per_step / 1e9:.3f} |"
        for r in rows
    ]
    text = header + "\n".join(lines) + "\n"
    with_cfg = "with CFG" if cfg else "without CFG"
    text += (
        f"\ns/step: median time of one denoiser call on a batch of --batch-size prompts {with_cfg}; "
        f"GFLOPs/step: one call for one prompt {with_cfg}, averaged over the schedule.\n"
    )
    counts = sorted({r.n_images if r.n_scored is None else r.n_scored for r in rows if r.frechet is not None})
    if counts:
        text += (
            f"Frechet: from {', '.join(map(str, counts))} images per method; the estimate is biased by the "
            "number of images (strongly below a few hundred), so compare it only between rows of one run.\n"
        )
    text += f"Intervals: {INTERVALS}.\n"
    if comparisons:
        text += (
            "\n| method | minus | ratio | accuracy difference (paired) [95% CI] "
            "| PSNR difference, dB (paired) [95% CI] |\n|---|---|---|---|---|\n"
        )
        text += "\n".join(
            f"| {c['method']} | {c['baseline']} | {c['ratio']:g} "
            f"| {_fmt_ci(c['accuracy_diff'], c['accuracy_ci95'], 3, '+')} "
            f"| {_fmt_ci(c['psnr_diff_db'], c['psnr_ci95'], 2, '+')} |"
            for c in comparisons
        )
        text += "\n"
    return text


def plot(rows: list[Row], path: Path) -> Figure:
    """Save each metric against the merge ratio, one line per method and `none` dashed; returns the figure."""
    from matplotlib.figure import Figure  # a figure of its own: the process's backend is left as it is

    metrics = [
        ("accuracy", "accuracy"),
        ("frechet", "Frechet distance"),
        ("psnr", "PSNR (dB)"),
        ("ssim", "SSIM"),
    ]
    fig = Figure(figsize=(4 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics))
    none_row = next(r for r in rows if r.method == "none")
    for ax, (name, label) in zip(axes, metrics, strict=True):
        for method in dict.fromkeys(r.method for r in rows if r.method != "none"):
            points = [(r.ratio, getattr(r, name)) for r in rows if r.method == method]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=method)
        if getattr(none_row, name) is not None:
            ax.axhline(getattr(none_row, name), color="black", linestyle="--", linewidth=1, label="none")
        ax.set_xlabel("merge ratio")
        ax.set_title(label)
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))
    if labels:  # none when nothing has a value (only `none`, no prompt the classifier can score)
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    save_figure(fig, path, dpi=110)
    return fig


def run(args: argparse.Namespace) -> int:
    device = check_device(args.device)  # the other checks ran before torch (imptome.commands.quality)
    try:
        figure = figure_path(args.plot)
    except ValueError as error:
        raise CliError(f"--plot {args.plot}: {error}") from None
    prompts, seeds, model = args.prompt_list, args.seed_list, args.model_source
    variants = [Variant("none", 0.0)]
    variants += [Variant(method, ratio) for ratio in args.ratios for method in args.method_list]
    objects = parse_prompts(prompts)
    warning = _unscorable_warning(prompts, objects)
    cache_root = args.cache
    settings = {
        "imptome_version": imptome.__version__,  # plans (and so merged images) differ between versions
        # and so, slightly, do the images of the versions of the packages whose arithmetic makes them
        "versions": package_versions("torch", "diffusers", "transformers", "tomesd"),
        "model": model,
        "weights": model_fingerprint(model),
        "steps": args.steps,
        "guidance": args.guidance,
        "dtype": args.dtype,
        "device": torch.device(device).type,  # kernels round differently
        "batch_size": args.batch_size,  # so do batched ones
    }
    cache = ImageCache(cache_root, settings, prompts)
    items = [(p, seed) for seed in seeds for p in range(len(prompts))]

    pipe = load_pipeline(args.model, args.device, args.dtype)
    if warning:  # once, before generating
        print(warning, file=sys.stderr, flush=True)
    missing = sum(not cache.has(v, p, s) for v in variants for p, s in items)
    with tqdm(total=missing, desc="generating", unit="img") as progress:
        for variant in variants:
            progress.set_postfix_str(variant.key)
            _generate_variant(pipe, variant, prompts, items, cache, args, progress)

    rows, comparisons = evaluate(cache, variants, prompts, items, objects)
    report = {
        "command": "imptome bench quality " + " ".join(_argv_of(args)),
        "device": str(pipe.device),
        "model": model,
        "steps": args.steps,
        "guidance": args.guidance,
        "prompts": len(prompts),
        "seeds": seeds,
        "prompt_texts": prompts,  # the rows of each row's per_image grids (its columns: seeds)
        "intervals": INTERVALS,
        "rows": [asdict(r) for r in rows],
        "comparisons": comparisons,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.json, report_json(report).encode())
    table = markdown_table(rows, comparisons, cfg=args.guidance > 1)
    markdown = args.markdown
    markdown.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(markdown, table.encode())
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, figure)
    console = Console()
    # rich wraps at 80 columns when stdout is not a terminal: a file or pipe gets whole rows instead
    console.print(table, soft_wrap=not console.is_terminal)
    note = busy_machine_note()  # the s/step column
    if note is not None:
        console.print(note)
    console.print(
        f"wrote {args.json}, {markdown} and {figure}; images cached in {cache_root}", soft_wrap=True
    )
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The options that define the run, for the report."""
    out = ["--seeds", *map(str, args.seeds), "--ratios", *(f"{r:g}" for r in args.ratios)]
    out += ["--steps", str(args.steps), "--guidance", f"{args.guidance:g}"]
    out += ["--batch-size", str(args.batch_size), "--dtype", args.dtype]  # both change the images
    if args.device:
        out += ["--device", args.device]
    if args.methods:
        out += ["--methods", *args.methods]
    if args.ablations:
        out.append("--ablations")
    if args.model:
        out += ["--model", args.model]
    if args.prompts:
        out += ["--prompts", str(args.prompts)]
    return out
