"""Pictures: the heatmap overlay users draw over their own images, and the comparison grid."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from imptome.visualize import comparison_grid, heatmap_overlay


def test_overlay_blends_the_map_scaled_to_the_image():
    image = Image.new("RGB", (64, 32), (10, 200, 30))
    heat = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])  # [h=2, w=4] -> 16 px blocks
    assert np.array_equal(np.asarray(heatmap_overlay(image, heat, alpha=0.0)), np.asarray(image))
    full = np.asarray(heatmap_overlay(image, heat, alpha=1.0, cmap="gray"))
    assert full.shape == (32, 64, 3)
    assert full[0, 0].tolist() == [0, 0, 0] and full[0, 63].tolist() == [255, 255, 255]  # min, max
    assert (full[:16, 16:32] == full[8, 20]).all()  # one token, one block of pixels
    assert full[0, 20, 0] < full[0, 40, 0]  # brighter where the map is higher
    flat = np.asarray(heatmap_overlay(image, torch.ones(2, 4), alpha=1.0, cmap="gray"))
    assert (flat == 0).all()  # a constant map has no range: drawn at its minimum colour


def test_overlay_and_grid_refuse_bad_input(tmp_path):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"one non-empty \[h, w\] map, got shape \(1, 2, 2\)"):
        heatmap_overlay(image, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="alpha=2"):
        heatmap_overlay(image, torch.zeros(2, 2), alpha=2)
    with pytest.raises(ValueError, match="cmap='nope' is not a matplotlib colormap"):
        heatmap_overlay(image, torch.zeros(2, 2), cmap="nope")
    with pytest.raises(ValueError, match="heat holds NaN or infinite values"):
        heatmap_overlay(image, torch.tensor([[float("nan"), 1.0], [0.0, 2.0]]))
    with pytest.raises(TypeError, match="image must be a PIL image .*got ndarray"):
        heatmap_overlay(np.zeros((8, 8, 3), dtype=np.uint8), torch.zeros(2, 2))
    grid = tmp_path / "grid.png"
    with pytest.raises(ValueError, match="unknown panel kind 'mask'"):
        comparison_grid(grid, ["p"], [("x", [torch.zeros(2, 2)], "mask")])
    with pytest.raises(ValueError, match="row_titles is empty"):
        comparison_grid(grid, [], [("x", [], "heatmap")])
    with pytest.raises(ValueError, match="column 'x' has 1 panel.s. for 2 row title.s."):
        comparison_grid(grid, ["p", "q"], [("x", [torch.zeros(2, 2)], "heatmap")])
    with pytest.raises(
        ValueError,
        match=r"column 'x', row 0: a heatmap panel must be one \[h, w\] tensor or array, got \(1, 2, 2\)",
    ):
        comparison_grid(grid, ["p"], [("x", [torch.zeros(1, 2, 2)], "heatmap")])
    with pytest.raises(ValueError, match="column 'x', row 0: an image panel must be a PIL image"):
        comparison_grid(grid, ["p"], [("x", [torch.zeros(3, 8, 8)], "image")])
    with pytest.raises(ValueError, match="columns is empty"):
        comparison_grid(grid, ["p"], [])
    with pytest.raises(ValueError, match="a roles panel holds the integers 0 .merged., 1 .destination."):
        comparison_grid(grid, ["p"], [("x", [torch.rand(2, 2)], "roles")])  # a float map, not roles
    with pytest.raises(ValueError, match="a roles panel holds the integers"):
        comparison_grid(grid, ["p"], [("x", [torch.full((2, 2), 7)], "roles")])
    with pytest.raises(ValueError, match="heat must be one non-empty"):
        heatmap_overlay(image, torch.ones(0, 4))
    with pytest.raises(ValueError, match=r"cannot write a \.xyz figure; use one of \.eps"):
        comparison_grid(tmp_path / "grid.xyz", ["p"], [("x", [torch.zeros(2, 2)], "heatmap")])
    with pytest.raises(FileNotFoundError, match="folder .*missing does not exist; create it first"):
        comparison_grid(tmp_path / "missing" / "grid.png", ["p"], [("x", [torch.zeros(2, 2)], "heatmap")])
    assert not grid.exists()
    # arrays are panels too, as heatmap_overlay takes them
    heat, roles = np.random.default_rng(0).random((2, 2)), np.array([[0, 1], [2, 0]])
    comparison_grid(grid, ["p"], [("heat", [heat], "heatmap"), ("roles", [roles], "roles")])
    assert grid.is_file()


def test_overlay_takes_a_numpy_map_and_a_colormap_object():
    import matplotlib

    image = Image.new("RGB", (8, 8))
    heat = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert heatmap_overlay(image, heat) == heatmap_overlay(image, torch.from_numpy(heat))
    by_name = heatmap_overlay(image, heat, cmap="viridis")
    assert heatmap_overlay(image, heat, cmap=matplotlib.colormaps["viridis"]) == by_name


def test_the_grid_adds_png_to_a_path_without_suffix_and_leaves_the_backend_alone(tmp_path):
    """Importing or drawing never switches the process's matplotlib backend (a user's plt.show() or
    notebook keeps its own; 0.6.6 set Agg on import), and the path returned is the file written."""
    import matplotlib

    script = (
        "import matplotlib; matplotlib.use('pdf'); import imptome.visualize; print(matplotlib.get_backend())"
    )
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "pdf"

    import imptome

    matplotlib.use("pdf")
    panels = [
        ("map", [torch.rand(4, 4)], "heatmap"),
        ("roles", [torch.zeros(4, 4, dtype=torch.int8)], "roles"),
    ]
    written = imptome.visualize.comparison_grid(tmp_path / "grid", ["a prompt"], panels)
    heatmap_overlay(Image.new("RGB", (8, 8)), torch.rand(2, 2))
    assert matplotlib.get_backend() == "pdf"
    assert written == tmp_path / "grid.png" and Image.open(written).format == "PNG"


def test_a_pgf_figure_is_refused_where_its_tex_program_is_missing(monkeypatch):
    """matplotlib typesets .pgf with TeX (xelatex by default): without it, `imptome demo --out grid.pgf` and
    `bench quality --plot q.pgf` passed the format check and failed with a traceback after all the work."""
    from imptome.visualize import figure_path

    monkeypatch.setattr("shutil.which", lambda name: None)
    missing = r"^cannot write a \.pgf figure \(matplotlib makes them with xelatex, not installed here\)"
    with pytest.raises(ValueError, match=missing):
        figure_path("grid.pgf")
    with pytest.raises(ValueError, match=r"use one of \.eps, .*\.pdf, \.png, \.ps"):
        figure_path("grid.PGF")
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}")
    assert figure_path("grid.pgf").name == "grid.pgf"


def test_an_interrupted_grid_leaves_the_previous_figure_whole(tmp_path, interrupt_writes):
    """The grid is drawn in memory and written atomically: a Ctrl-C while it was written (`imptome demo`'s
    last moment) left a cut PNG in place of the previous figure."""
    panels = [("map", [torch.rand(4, 4)], "heatmap")]
    path = comparison_grid(tmp_path / "grid.png", ["a prompt"], panels)
    before = path.read_bytes()
    interrupt_writes(path)
    with pytest.raises(KeyboardInterrupt):
        comparison_grid(path, ["another prompt"], panels)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))  # the cut temporary file is removed


@pytest.fixture
def drawn(monkeypatch):
    """The figures comparison_grid draws (their axes hold the arrays and colours as drawn)."""
    import imptome.visualize as visualize

    figures = []

    class Recorded(visualize.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(visualize, "Figure", Recorded)
    return figures


def test_the_grid_draws_panels_upright_in_their_rows_and_roles_in_the_legends_colours(tmp_path, drawn):
    """Row r, column c shows panel r of column c, array row 0 at the top and not transposed (a 2 x 3 map
    spans 3 columns and 2 rows); each role is drawn in the colour the legend gives its name, and the heatmap
    spans magma's range from the map's minimum to its maximum. Names and colours as README describes them."""
    from matplotlib import colormaps

    from imptome.merge import DESTINATION, INDEPENDENT, MERGED

    names = {MERGED: "merged", DESTINATION: "destination", INDEPENDENT: "independent"}

    images = [Image.fromarray(np.arange(18, dtype=np.uint8).reshape(2, 3, 3) * (i + 5)) for i in range(2)]
    heats = [
        torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]),
        torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    ]
    roles = [
        torch.tensor([[MERGED, DESTINATION, INDEPENDENT], [INDEPENDENT, MERGED, MERGED]], dtype=torch.int8),
        torch.tensor(
            [[DESTINATION, DESTINATION, MERGED], [MERGED, INDEPENDENT, DESTINATION]], dtype=torch.int8
        ),
    ]
    columns = [("images", images, "image"), ("maps", heats, "heatmap"), ("roles", roles, "roles")]
    comparison_grid(tmp_path / "grid.png", ["first", "second"], columns, title="the title")
    (figure,) = drawn
    axes = np.array(figure.axes).reshape(2, 3)  # subplots are made row by row
    assert [ax.get_title() for ax in axes[0]] == ["images", "maps", "roles"]
    assert [ax.get_ylabel() for ax in axes[:, 0]] == ["first", "second"]
    assert figure._suptitle.get_text() == "the title"
    (legend,) = figure.legends
    legend_colours = {
        text.get_text(): handle.get_facecolor()
        for handle, text in zip(legend.legend_handles, legend.texts, strict=True)
    }
    assert list(legend_colours) == ["merged", "destination", "independent"]
    # README: "red tokens are destinations, blue ones are independent and grey ones are merged"
    (r, g, b, _), grey = legend_colours["destination"], legend_colours["merged"]
    assert r > max(g, b) and legend_colours["independent"][2] > max(legend_colours["independent"][:2])
    assert grey[0] == grey[1] == grey[2]
    for row in range(2):
        shown = [ax.images[0] for ax in axes[row]]
        for picture in shown:  # array row 0 at the top, 3 columns wide, 2 rows high
            assert picture.get_extent() == [-0.5, 2.5, 1.5, -0.5]
        assert np.array_equal(shown[0].get_array(), np.asarray(images[row]))
        assert np.array_equal(shown[1].get_array(), heats[row].numpy())
        heat_rgba = shown[1].to_rgba(shown[1].get_array())
        top, bottom = divmod(int(heats[row].argmax()), 3), divmod(int(heats[row].argmin()), 3)
        assert np.allclose(heat_rgba[top], colormaps["magma"](1.0))
        assert np.allclose(heat_rgba[bottom], colormaps["magma"](0.0))
        assert np.array_equal(shown[2].get_array(), roles[row].numpy())
        role_rgba = shown[2].to_rgba(shown[2].get_array())
        for (y, x), role in np.ndenumerate(roles[row].numpy()):
            assert np.allclose(role_rgba[y, x], legend_colours[names[role]]), (row, y, x)


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "1"])
def test_the_grid_draws_greyscale_and_palette_images_in_their_own_colours(tmp_path, drawn, mode):
    """A one-channel image (greyscale, palette) is drawn as its RGB pixels, not as values in imshow's
    default colormap (viridis drew a grey image dark purple and a red palette image purple)."""
    rgb = Image.new("RGB", (4, 2), (200, 30, 30) if mode == "P" else (255, 255, 255))
    image = Image.new(mode, (4, 2), 255) if mode == "I;16" else rgb.convert(mode)  # Pillow 10: no RGB -> I;16
    comparison_grid(tmp_path / "grid.png", ["p"], [("x", [image], "image")])
    (figure,) = drawn
    drawn_image = figure.axes[0].images[0]
    rgba = drawn_image.to_rgba(drawn_image.get_array())
    expected = np.asarray(image.convert("RGB"), dtype=float) / 255
    assert rgba.shape[:2] == (2, 4) and np.allclose(rgba[..., :3], expected, atol=1 / 255)


def test_the_grid_refuses_a_heatmap_without_a_range_and_draws_one_that_needs_grad(tmp_path, drawn):
    """As heatmap_overlay does: a NaN or infinite value leaves the map no range (matplotlib drew it blank,
    with a warning at most). A map that requires grad is drawn as its values (it raised numpy()'s error)."""
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="column 'm', row 0: the heatmap holds NaN or infinite values"):
            comparison_grid(tmp_path / "grid.png", ["p"], [("m", [torch.tensor([[0.0, bad]])], "heatmap")])
    assert not (tmp_path / "grid.png").exists()
    heat = torch.tensor([[0.0, 1.0], [2.0, 3.0]], requires_grad=True)
    comparison_grid(tmp_path / "grid.png", ["p"], [("m", [heat], "heatmap")])
    assert np.array_equal(drawn[-1].axes[0].images[0].get_array(), heat.detach().numpy())


@pytest.mark.parametrize("columns", [1, 2])
def test_the_role_legend_fits_in_a_narrow_grid(tmp_path, drawn, columns):
    """A grid of one roles column was 2.1 inches wide, narrower than its legend: "merged" and
    "independent" were cut off at the edges of the PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    panel = ("roles", [torch.tensor([[0, 1], [2, 0]])], "roles")
    comparison_grid(tmp_path / "grid.png", ["p"], [panel] * columns)
    (figure,) = drawn
    renderer = FigureCanvasAgg(figure).get_renderer()
    (legend,) = figure.legends
    box = legend.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (box, figure.bbox)


def test_an_overlay_refuses_a_map_lying_across_a_non_square_image():
    """A transposed map was stretched over the image's other sides without a word; maps lying like the
    image, and any map over a square image, are drawn."""
    wide = Image.new("RGB", (64, 32))
    with pytest.raises(ValueError, match=r"heat of shape \[h=8, w=4\] does not lie like the image"):
        heatmap_overlay(wide, torch.rand(8, 4))
    assert heatmap_overlay(wide, torch.rand(4, 8)).size == (64, 32)
    assert heatmap_overlay(wide, torch.rand(3, 3)).size == (64, 32)
    assert heatmap_overlay(Image.new("RGB", (32, 32)), torch.rand(8, 4)).size == (32, 32)


def test_the_grid_refuses_one_string_as_its_row_titles(tmp_path):
    """A string is a sequence of characters: "abc" drew three rows titled a, b and c."""
    with pytest.raises(ValueError, match="row_titles must be a list of titles, one per row, got the string"):
        comparison_grid(tmp_path / "grid.png", "abc", [("x", [Image.new("RGB", (2, 2))] * 3, "image")])
