"""`imptome demo` end to end on a tiny saved pipeline, and its input checks."""

from __future__ import annotations

import pytest
from PIL import Image

from imptome.cli import main
from tests.factories import tiny_sd_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def test_demo_writes_grid_and_prints_timings(model_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["demo", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "4", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out) as image:
        assert image.width > 7 * 100  # seven panels per row: 4 images, 2 token maps, 1 heatmap
    printed = capsys.readouterr().out
    for variant in ("none", "tome", "importance", "importance+prop"):
        assert variant in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--ratio", "0.9"], "allowed 0 <= ratio <= 0.75"),
        (["demo", "--model", "./no/such/folder"], "does not exist"),
        (["demo", "--steps", "1"], "at least 2 steps"),
        (["demo", "--set", "fallback=cells"], "fallback='cells' is not supported; choose one of"),
    ],
)
def test_demo_rejects_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
