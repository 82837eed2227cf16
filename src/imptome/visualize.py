"""Pictures of what imptome does: importance heatmaps, token role maps, side-by-side comparison grids."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image  # noqa: E402

from imptome.merge import DESTINATION, INDEPENDENT, MERGED  # noqa: E402

ROLE_COLOURS = {MERGED: "#c8c8c8", DESTINATION: "#d62728", INDEPENDENT: "#1f77b4"}
ROLE_NAMES = {MERGED: "merged", DESTINATION: "destination", INDEPENDENT: "independent"}
_ROLE_CMAP = ListedColormap([ROLE_COLOURS[r] for r in (MERGED, DESTINATION, INDEPENDENT)])


def heatmap_overlay(
    image: Image.Image, heat: torch.Tensor, alpha: float = 0.5, cmap: str = "magma"
) -> Image.Image:
    """`image` with a [h, w] map (e.g. one image's `imptome.importance_map(pipe)[i]`) drawn over it.

    The map is scaled to [0, 1] by its own range, coloured with the matplotlib colormap `cmap`, resized to the
    image (each token a block of pixels) and blended in with weight `alpha` (0: the image, 1: the map).
    """
    if heat.ndim != 2:
        raise ValueError(f"heat must be one [h, w] map, got shape {tuple(heat.shape)}; index the batch first")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 and 1")
    values = heat.detach().float().cpu().numpy()
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    coloured = (plt.get_cmap(cmap)(scaled)[..., :3] * 255).astype(np.uint8)
    layer = Image.fromarray(coloured).resize(image.size, Image.Resampling.NEAREST)
    return Image.blend(image.convert("RGB"), layer, alpha)


def role_legend() -> list[Patch]:
    return [Patch(color=ROLE_COLOURS[r], label=ROLE_NAMES[r]) for r in (MERGED, DESTINATION, INDEPENDENT)]


def comparison_grid(
    path: str | Path,
    row_titles: Sequence[str],
    columns: Sequence[tuple[str, Sequence[Image.Image | torch.Tensor], str]],
    title: str = "",
) -> Path:
    """Save a grid figure: one row per prompt, one column per panel.

    Args:
        columns: (title, one panel per row, kind) with kind "image" (PIL), "heatmap" ([h, w] float tensor)
            or "roles" ([h, w] int tensor of MERGED / DESTINATION / INDEPENDENT).
    """
    rows, cols = len(row_titles), len(columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.2 * rows + 0.6), squeeze=False)
    for c, (col_title, panels, kind) in enumerate(columns):
        for r in range(rows):
            ax = axes[r][c]
            panel = panels[r]
            if kind == "image":
                ax.imshow(np.asarray(panel))
            elif kind == "heatmap":
                ax.imshow(panel.float().cpu().numpy(), cmap="magma", interpolation="nearest")
            elif kind == "roles":
                ax.imshow(panel.cpu().numpy(), cmap=_ROLE_CMAP, vmin=0, vmax=2, interpolation="nearest")
            else:
                raise ValueError(f"unknown panel kind {kind!r}; use image, heatmap or roles")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_title, fontsize=8)
            if c == 0:
                ax.set_ylabel(textwrap.fill(row_titles[r], 32), fontsize=7)  # lines fit one panel's height
    if any(kind == "roles" for _, _, kind in columns):
        fig.legend(handles=role_legend(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
