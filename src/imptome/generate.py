"""`imptome generate`: one image per (prompt, seed), split across `accelerate launch` processes, resumable.

Files. The image of prompt `p` (0-based, blank lines not counted) with seed `s` is `OUT/{p:05d}_{s}.png`.
Its generation arguments are stored in the PNG itself, as a JSON text chunk named "imptome". Each image is
written to `NAME.tmp`, fsynced and renamed, so a file with its final name is always complete. At the end of
a run, `OUT/manifest.jsonl` lists every image of the run (its metadata plus "file").

Resuming. An image is done when its file exists and its chunk matches this run's arguments. A re-run skips
done images and regenerates missing ones, PNGs without imptome metadata included; leftover temporary files
(`*.png.tmp`, `manifest.jsonl.tmp`) of a killed run are deleted at the start and never count. A folder (or
other non-file) where the run writes a file (an image, its temporary file, the manifest) is refused before
loading the model. More seeds or more prompt lines extend a finished run. If an image of this run exists but
was made with different arguments (`MATCHED_FIELDS`), the run refuses before loading the model rather than
mixing or overwriting results.

Determinism. Each image's initial noise comes from its own CPU `torch.Generator` seeded with its seed. With
`--batch-size B`, batches are fixed slices of the full (prompt, seed) list, not of what is left to do, so on
given hardware the pixels do not depend on the number of processes or on where an earlier run was killed.
Batching itself changes float results slightly (and merging draws destinations per batch row), so images
made with different batch sizes are not bit-identical; the batch size is recorded but not compared, and so
is `--compile` (compiled kernels round differently).
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

import imptome
from imptome.cli import (
    CliError,
    apply_patch_or_fail,
    prepare_output_folder,
    warn_outside_grammar,
)
from imptome.files import write_atomically
from imptome.loading import check_device, load_pipeline, model_fingerprint

METADATA_KEY = "imptome"
MANIFEST = "manifest.jsonl"
#: Metadata fields that define an image: an existing image whose fields differ is not this run's image.
# "weights" identifies the model (a local folder's content hash, or the hub id); its path ("model") is kept in
# the metadata but not compared: the bundled model, or a copied folder, lives at another path in each install.
MATCHED_FIELDS = (
    "prompt", "seed", "weights", "method", "ratio", "steps", "guidance", "height", "width", "dtype",
    "imptome_version", "options",
)  # fmt: skip


@dataclass(frozen=True)
class WorkItem:
    """One image to make: prompt number `prompt_index` (0-based, blank lines not counted) with `seed`."""

    prompt_index: int
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.prompt_index:05d}_{self.seed}.png"


def work_items(prompts: list[str], seeds: range) -> list[WorkItem]:
    """Every (prompt, seed) pair, prompt-major: the same list in every process and on every re-run."""
    return [WorkItem(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The imptome metadata of a PNG, or None when the file is missing, damaged, cut short or has none (a
    chunk of that name holding other JSON than an object is not imptome's).

    The pixels are not decoded (a resume scan of thousands of images paid seconds to minutes for it): the
    chunk is read where save_image puts it, before them, and Image.verify checks every chunk's checksum up to
    the end marker. Only a chunk after the pixels, where another program may have moved it, needs decoding.
    """
    try:
        with Image.open(path) as image:
            text = image.info.get(METADATA_KEY)  # text chunks before the pixels
            if text is None:  # after them, or none: `text` decodes the pixels to reach them
                text = getattr(image, "text", {}).get(METADATA_KEY)
            else:
                image.verify()  # a damaged or cut file raises
        metadata = json.loads(text) if text is not None else None
    except (OSError, SyntaxError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def paths_in_the_way(items: list[WorkItem], out: Path) -> list[Path]:
    """The paths in `out` where this run writes a file (each image, the manifest, and their temporary files)
    that hold something else, a folder say: writing there would fail once the images are made."""
    names = [item.file_name for item in items] + [MANIFEST]
    paths = [out / file for name in names for file in (name, name + ".tmp")]
    return [path for path in paths if path.exists() and not path.is_file()]


def pending_items(items: list[WorkItem], out: Path, settings: dict[str, Any]) -> list[WorkItem]:
    """The items whose image is not done yet; a CliError if any was made with different arguments."""
    pending = []
    conflicts = []
    for item in items:
        metadata = read_metadata(out / item.file_name)
        if metadata is None:
            pending.append(item)
            continue
        expected = {**settings, "prompt": item.prompt, "seed": item.seed}
        differing = [name for name in MATCHED_FIELDS if metadata.get(name) != expected[name]]
        if differing:
            details = ", ".join(
                f"{name} {metadata.get(name)!r} (now {expected[name]!r})" for name in differing
            )
            conflicts.append(f"{item.file_name}: {details}")
    if conflicts:
        shown = "; ".join(conflicts[:3]) + ("; ..." if len(conflicts) > 3 else "")
        raise CliError(
            f"{len(conflicts)} image(s) in {out} were generated with different arguments ({shown}). "
            "Use another --out folder, or delete those images to regenerate them with these arguments."
        )
    return pending


def save_image(image: Image.Image, path: Path, metadata: dict[str, Any]) -> None:
    """Save `image` as PNG with `metadata` as its "imptome" JSON text chunk, atomically."""
    info = PngImagePlugin.PngInfo()
    info.add_text(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_atomically(path, buffer.getvalue())


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What defines this run's images besides prompt and seed (see MATCHED_FIELDS), from checked `args`."""
    return {
        "imptome_version": imptome.__version__,  # plans (and so merged images) differ between versions
        "model": args.model_source,
        "weights": model_fingerprint(args.model_source),
        "method": args.method,
        "ratio": 0.0 if args.method == "none" else args.ratio,
        "options": json.loads(json.dumps(args.options)),  # as read back from the PNG (tuples as lists)
        "steps": args.steps,
        "guidance": args.guidance,
        "height": args.height,
        "width": args.width,
        "dtype": args.dtype,
    }


def _process_state(device: str | None) -> PartialState:
    """accelerate's view of this process (rank, count, device); CPU processes when asked or without CUDA."""
    cpu = device == "cpu" if device is not None else not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)  # the other checks ran before torch was imported (imptome.commands.generate)
    items = work_items(args.prompt_list, range(args.seed, args.seed + args.seeds))
    out = args.out_folder
    created = not out.exists()
    prepare_output_folder(out)
    try:
        return _run_in(out, items, args)
    except CliError:  # e.g. a model that does not load: leave no empty folder behind
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run_in(out: Path, items: list[WorkItem], args: argparse.Namespace) -> int:
    settings = _settings(args)
    state = _process_state(args.device)
    blocked = paths_in_the_way(items, out)  # every process refuses, as pending_items does
    if blocked:
        shown = ", ".join(map(str, blocked[:3])) + (", ..." if len(blocked) > 3 else "")
        raise CliError(
            f"{len(blocked)} path(s) where this run writes a file are taken by a folder or other "
            f"non-file ({shown}); move them away or use another --out folder"
        )
    if state.is_main_process:
        warn_outside_grammar(args.prompt_list, args.model)
        # write_atomically's leftovers of a killed run; nobody in this run writes before the barrier. A
        # folder of such a name is not one (and not in this run's way: paths_in_the_way)
        for leftover in [*out.glob("*.png.tmp"), out / f"{MANIFEST}.tmp"]:
            if not leftover.is_dir():
                leftover.unlink(missing_ok=True)
    pending = set(pending_items(items, out, settings))
    state.wait_for_everyone()  # every process has scanned the folder before any of them writes to it

    batches = [items[start : start + args.batch_size] for start in range(0, len(items), args.batch_size)]
    with state.split_between_processes([batch for batch in batches if pending.intersection(batch)]) as mine:
        written = _generate(args, settings, out, list(mine), pending, state) if mine else 0
    print(
        f"imptome generate: process {state.process_index + 1}/{state.num_processes} wrote {written} image(s)",
        flush=True,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        _write_manifest(items, out)
    return 0


def _generate(
    args: argparse.Namespace,
    settings: dict[str, Any],
    out: Path,
    batches: list[list[WorkItem]],
    pending: set[WorkItem],
    state: PartialState,
) -> int:
    """Generate this process's batches and save their pending images; returns how many were written."""
    device = args.device or ("cpu" if state.device.type == "cpu" else str(state.device))
    pipe = load_pipeline(settings["model"], device, args.dtype)
    if args.method != "none":
        apply_patch_or_fail(pipe, ratio=args.ratio, method=args.method, **args.options)
    if args.compile:  # after patching: the merge is traced into the graph
        name = "transformer" if isinstance(getattr(pipe, "transformer", None), torch.nn.Module) else "unet"
        setattr(pipe, name, torch.compile(getattr(pipe, name), mode=args.compile))
    recorded = {**settings, "batch_size": args.batch_size, "compile": args.compile}
    total = sum(item in pending for batch in batches for item in batch)
    label = "generate"
    if state.num_processes > 1:  # numbered as the closing summaries are
        label = f"process {state.process_index + 1}/{state.num_processes}"
    written = 0
    with tqdm(total=total, desc=label, unit="image", position=state.process_index) as progress:
        for batch in batches:
            try:
                images = pipe(
                    [item.prompt for item in batch],
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    height=args.height,
                    width=args.width,
                    generator=[torch.Generator("cpu").manual_seed(item.seed) for item in batch],
                ).images
            except torch._dynamo.exc.BackendCompilerFailed as error:  # only with --compile
                cause = error.inner_exception
                raise CliError(
                    f"torch.compile (--compile {args.compile}) failed: {type(cause).__name__}: {cause}. "
                    "Run without --compile, or fix the compiler set-up (Inductor needs a C++ compiler on "
                    "the CPU and Triton on a GPU)."
                ) from None
            for item, image in zip(batch, images, strict=True):
                if item not in pending:  # a batch is generated whole; its images already done stay untouched
                    continue
                metadata = {
                    **recorded,
                    "prompt_index": item.prompt_index,
                    "prompt": item.prompt,
                    "seed": item.seed,
                }
                save_image(image, out / item.file_name, metadata)
                written += 1
                progress.update(1)
    return written


def _write_manifest(items: list[WorkItem], out: Path) -> None:
    """`out/manifest.jsonl`: one JSON line per finished image of this run, in work order."""
    lines = []
    for item in items:
        metadata = read_metadata(out / item.file_name)
        if metadata is not None:
            lines.append(json.dumps({"file": item.file_name, **metadata}, sort_keys=True) + "\n")
    write_atomically(out / MANIFEST, "".join(lines).encode())
    print(f"imptome generate: {len(lines)}/{len(items)} images done in {out} (index: {out / MANIFEST})")
