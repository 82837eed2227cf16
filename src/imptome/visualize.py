"""Pictures of what imptome does: importance heatmaps, token role maps, side-by-side comparison grids."""

from __future__ import annotations

import io
import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.colors import Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from imptome.files import write_atomically
from imptome.merge import DESTINATION, INDEPENDENT, MERGED

ROLE_COLOURS = {MERGED: "#c8c8c8", DESTINATION: "#d62728", INDEPENDENT: "#1f77b4"}
ROLE_NAMES = {MERGED: "merged", DESTINATION: "destination", INDEPENDENT: "independent"}
_ROLE_CMAP = ListedColormap([ROLE_COLOURS[r] for r in (MERGED, DESTINATION, INDEPENDENT)])


def heatmap_overlay(
    image: Image.Image, heat: torch.Tensor | np.ndarray, alpha: float = 0.5, cmap: str | Colormap = "magma"
) -> Image.Image:
    """`image` with a [h, w] map (e.g. one image's `imptome.importance_map(pipe)[i]`) drawn over it.

    The map is scaled to [0, 1] by its own range, coloured with the matplotlib colormap `cmap`, resized to the
    image (each token a block of pixels) and blended in with weight `alpha` (0: the image, 1: the map).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"image must be a PIL image (e.g. pipe(...).images[0]), got {type(image).__name__}; convert "
            "arrays with PIL.Image.fromarray"
        )
    heat = torch.as_tensor(heat)
    if heat.ndim != 2 or not heat.numel():
        raise ValueError(
            f"heat must be one non-empty [h, w] map, got shape {tuple(heat.shape)}; index the batch first"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 and 1")
    (h, w), (width, height) = heat.shape, image.size
    if (h > w and height < width) or (h < w and height > width):  # transposed: stretched over the wrong sides
        raise ValueError(
            f"heat of shape [h={h}, w={w}] does not lie like the image ({width} wide, {height} high): a map "
            "is [rows, columns], like importance_map(pipe)[i]; was it transposed?"
        )
    if isinstance(cmap, str):
        if cmap not in matplotlib.colormaps:
            raise ValueError(f"cmap={cmap!r} is not a matplotlib colormap (e.g. magma, viridis, gray)")
        cmap = matplotlib.colormaps[cmap]
    values = heat.detach().float().cpu().numpy()
    if not np.isfinite(values).all():  # one NaN would make the whole range NaN, and the map one flat colour
        raise ValueError(
            "heat holds NaN or infinite values (e.g. a half-precision overflow); it has no range"
        )
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    coloured = (cmap(scaled)[..., :3] * 255).astype(np.uint8)
    layer = Image.fromarray(coloured).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image.convert("RGB"), layer, alpha)


def figure_path(path: str | Path) -> Path:
    """`path`, with ".png" added when it has no suffix; a ValueError when matplotlib cannot write its
    format (here: .pgf without the TeX program matplotlib typesets it with)."""
    path = Path(path)
    path = path if path.suffix else path.with_suffix(".png")
    formats = dict(FigureCanvasBase.get_supported_filetypes())
    texsystem = matplotlib.rcParams["pgf.texsystem"]
    if shutil.which(texsystem) is None:  # matplotlib typesets .pgf figures with TeX
        formats.pop("pgf", None)
    if path.suffix[1:].lower() not in formats:
        pgf = path.suffix.lower() == ".pgf"
        needs = f" (matplotlib makes them with {texsystem}, not installed here)" if pgf else ""
        raise ValueError(f"cannot write a {path.suffix} figure{needs}; use one of .{', .'.join(formats)}")
    return path


def role_legend() -> list[Patch]:
    return [Patch(color=ROLE_COLOURS[r], label=ROLE_NAMES[r]) for r in (MERGED, DESTINATION, INDEPENDENT)]


_PANEL_KINDS = ("image", "heatmap", "roles")
_ROLE_VALUES = torch.tensor([MERGED, DESTINATION, INDEPENDENT])
_LEGEND_WIDTH = 3.6  # inches: the role legend in one line at fontsize 8 (about 3.2), with a margin


def comparison_grid(
    path: str | Path,
    row_titles: Sequence[str],
    columns: Sequence[tuple[str, Sequence[Image.Image | torch.Tensor | np.ndarray], str]],
    title: str = "",
) -> Path:
    """Save a grid figure: one row per prompt, one column per panel; returns the file written (`path`, with
    ".png" added when it has no suffix).

    Args:
        columns: (title, one panel per row, kind) with kind "image" (PIL), "heatmap" ([h, w] float tensor
            or array) or "roles" ([h, w] integer tensor or array of MERGED / DESTINATION / INDEPENDENT).

    Drawn on a matplotlib Figure of its own, not through pyplot: the process's backend is left as it is.
    """
    _check_panels(row_titles, columns)
    path = figure_path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot save {path}: the folder {path.parent} does not exist; create it first"
        )
    rows, cols = len(row_titles), len(columns)
    has_roles = any(kind == "roles" for _, _, kind in columns)
    width = 2.1 * cols if not has_roles else max(2.1 * cols, _LEGEND_WIDTH)  # the legend's three names fit
    fig = Figure(figsize=(width, 2.2 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, (col_title, panels, kind) in enumerate(columns):
        for r in range(rows):
            ax = axes[r][c]
            panel = panels[r]
            if kind == "image":  # greyscale or palette images as they look, not as numbers in a colormap
                assert isinstance(panel, Image.Image)  # checked by _check_panels
                ax.imshow(np.asarray(panel if panel.mode in ("RGB", "RGBA") else panel.convert("RGB")))
            elif kind == "heatmap":
                heat = torch.as_tensor(panel).detach().float().cpu().numpy()
                ax.imshow(heat, cmap="magma", interpolation="nearest")
            else:
                roles = torch.as_tensor(panel).cpu().numpy()
                ax.imshow(roles, cmap=_ROLE_CMAP, vmin=0, vmax=2, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_title, fontsize=8)
            if c == 0:
                ax.set_ylabel(textwrap.fill(row_titles[r], 32), fontsize=7)  # lines fit one panel's height
    if has_roles:
        fig.legend(handles=role_legend(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save_figure(fig, path, dpi=110)
    return path


def save_figure(fig: Figure, path: Path, dpi: float) -> None:
    """Save `fig` as `path` in the format of its suffix: drawn in memory, then written atomically, so that an
    interrupted save (Ctrl-C) leaves the previous file whole, or none, and never a cut one."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix[1:].lower(), dpi=dpi)
    write_atomically(path, buffer.getvalue())


def _check_panels(
    row_titles: Sequence[str],
    columns: Sequence[tuple[str, Sequence[Image.Image | torch.Tensor | np.ndarray], str]],
) -> None:
    """A ValueError naming the first column or panel that comparison_grid cannot draw."""
    if isinstance(row_titles, str):
        raise ValueError(f"row_titles must be a list of titles, one per row, got the string {row_titles!r}")
    if not row_titles:
        raise ValueError("row_titles is empty: give one title per row of panels")
    if not columns:
        raise ValueError("columns is empty: give at least one (title, panels, kind) column")
    for col_title, panels, kind in columns:
        if kind not in _PANEL_KINDS:
            raise ValueError(f"unknown panel kind {kind!r}; use image, heatmap or roles")
        if len(panels) != len(row_titles):
            raise ValueError(
                f"column {col_title!r} has {len(panels)} panel(s) for {len(row_titles)} row title(s): give "
                "one panel per row"
            )
        for row, panel in enumerate(panels):
            where = f"column {col_title!r}, row {row}"
            if kind == "image" and not isinstance(panel, Image.Image):
                raise ValueError(
                    f"{where}: an image panel must be a PIL image (e.g. pipe(...).images[0]), got "
                    f"{type(panel).__name__}"
                )
            if kind == "image":
                continue
            if not (isinstance(panel, torch.Tensor | np.ndarray) and panel.ndim == 2):
                shape = tuple(panel.shape) if hasattr(panel, "shape") else type(panel).__name__
                raise ValueError(
                    f"{where}: a {kind} panel must be one [h, w] tensor or array, got {shape}; index the "
                    "batch first"
                )
            if kind == "roles":
                roles = torch.as_tensor(panel).cpu()  # records of a GPU run are on the GPU
                if (
                    roles.is_floating_point()
                    or roles.is_complex()
                    or not torch.isin(roles, _ROLE_VALUES).all()
                ):
                    raise ValueError(
                        f"{where}: a roles panel holds the integers {MERGED} (merged), {DESTINATION} "
                        f"(destination) and {INDEPENDENT} (independent) only, as PlanRecord.roles does"
                    )
            if kind == "heatmap" and not torch.isfinite(torch.as_tensor(panel).detach().float()).all():
                raise ValueError(
                    f"{where}: the heatmap holds NaN or infinite values (e.g. a half-precision overflow); "
                    "it has no range"
                )
