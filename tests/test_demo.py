"""`imptome demo` end to end on a tiny saved pipeline, and its input checks."""

from __future__ import annotations

import math
import re

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
    """Three steps: the middle one (1) comes before the map is used (from step 2), so the importance panels
    show step 2. --out without a suffix in a folder that does not exist yet writes a PNG there."""
    out = tmp_path / "figures" / "grid"
    argv = ["demo", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "3", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out.with_suffix(".png")) as image:
        assert image.format == "PNG"
        assert image.width == round(7 * 2.1 * 110)  # 7 panels of 2.1 in: 4 images, 2 token maps, 1 heatmap
    printed = capsys.readouterr().out
    # the table's rows: variant, ratio, median seconds per step, speedup over none
    row = re.compile(r"^│ (\S+) +│ +(\S+) │ +(\d+\.\d{4}) │ +(\d+\.\d\d)x │$", re.MULTILINE)
    rows = {
        variant: (ratio, float(seconds), float(speedup))
        for variant, ratio, seconds, speedup in row.findall(printed)
    }
    assert list(rows) == ["none", "tome", "importance", "importance+prop"]
    assert [ratio for ratio, _, _ in rows.values()] == ["0", "0.7", "0.7", "0.7"]
    base = rows["none"][1]
    for _, seconds, speedup in rows.values():
        # printed times are rounded to 0.1 ms (each off by up to 5e-5 s) and speedups to 0.01
        rounding = base / seconds * (5e-5 / base + 5e-5 / seconds) + 0.005
        assert seconds > 0 and math.isclose(speedup, base / seconds, abs_tol=rounding * 1.01)
    assert "batch 2 with CFG" in printed and "grid.png" in printed.replace("\n", "")
    assert "No step of the importance variants used the CFG map" not in printed
    assert "16x16 latent" not in printed  # the caution is the bundled model's


def test_demo_on_the_bundled_model_cautions_that_its_times_say_nothing_about_speed(tmp_path, capsys):
    argv = ["demo", "--prompt", "top left: red circle", "--steps", "2", "--out", str(tmp_path / "grid.png")]
    assert main(argv) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the bundled model is tiny, with a 16x16 latent: these times say nothing about speed" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--ratio", "0.9"], "allowed 0 <= ratio <= 0.75"),
        (["demo", "--model", "./no/such/folder"], "does not exist"),
        (["demo", "--steps", "1"], "at least 2 steps"),
        (["demo", "--set", "fallback=cells"], "fallback='cells' is not supported; choose one of"),
        (["demo", "--set", "method=tome"], "runs every method; the method cannot be set"),
        (["demo", "--guidance", "-1"], "must be a number >= 0"),
        (["demo", "--out", "grid.txt"], "cannot write a .txt figure; use one of .eps, "),
        (["demo", "--out", "."], "--out . is a folder; name a file in it"),
        (["demo", "--seed", "-3"], "--seed -3: seeds must be >= 0"),
        (["demo", "--seed", str(2**64 - 2)], f"the seeds go up to {2**64 + 1}"),  # 4 prompts, one seed each
        (["demo", "--set", "proportional_attention=true"], "already shows importance with and without"),
    ],
)
def test_demo_rejects_bad_input(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_demo_refuses_ratio_0_before_loading(tmp_path, capsys, monkeypatch):
    """Ratio 0 merges nothing: the demo made a figure of identical columns without token or importance
    panels, and its hint said that the map "is used from a later step; add --steps"."""
    import imptome.demo as demo

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(demo, "load_pipeline", never)
    assert main(["demo", "--ratio", "0", "--out", str(tmp_path / "grid.png")]) == 2
    error = capsys.readouterr().err
    assert "--ratio 0: the merged variants would merge nothing; give a ratio above 0" in error
    assert not (tmp_path / "grid.png").exists()


def test_demo_without_guidance_says_so(model_dir, tmp_path, capsys):
    """Guidance 1 turns CFG off: the table says so, the demo says why no importance panel is shown, and
    imptome's warning about calls without CFG is one line, not Python's warning format."""
    out = tmp_path / "grid.png"
    argv = ["demo", "--model", str(model_dir), "--prompt", "a red circle", "--steps", "3", "--guidance", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "batch 1 without CFG" in captured.out
    assert "used the CFG map: it needs guidance above 1" in captured.out.replace("\n", " ")
    assert "imptome: warning: this denoiser call has no classifier-free guidance" in captured.err
    assert "UserWarning" not in captured.err


@pytest.mark.parametrize(
    ("argv", "figure_name", "message"),
    [
        ([], "grid.xyz", "cannot write a .xyz figure; use one of"),
        (["--model", "no/such/folder"], "grid.png", "model folder no/such/folder does not exist"),
        (["--device", "tpu9"], "grid.png", "--device tpu9: not a device name"),
    ],
    ids=["format", "model", "device"],
)
def test_demo_bad_input_is_refused_without_leaving_a_folder(argv, figure_name, message, tmp_path, capsys):
    figure = tmp_path / "new" / figure_name
    assert main(["demo", *argv, "--out", str(figure)]) == 2
    assert message in capsys.readouterr().err
    assert not figure.parent.exists()


def test_demo_that_fails_after_its_checks_leaves_no_folder(tmp_path, capsys, monkeypatch):
    """The figure's folder is made when the figure is written: a model that does not load (a hub id offline),
    memory running out or Ctrl-C left an empty folder behind."""
    import imptome.demo as demo
    from imptome.cli import CliError

    def offline(*args, **kwargs):
        raise CliError("cannot load owner/name: a hub id needs internet on first use")

    monkeypatch.setattr(demo, "load_pipeline", offline)
    figure = tmp_path / "new" / "deeper" / "grid.png"
    assert main(["demo", "--out", str(figure)]) == 2
    assert "cannot load owner/name" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_demo_out_under_a_file_is_refused_before_loading(tmp_path, capsys):
    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n")
    assert main(["demo", "--out", str(text / "grid.png")]) == 2
    assert f"--out {text / 'grid.png'}: {text} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("own_model", [False, True], ids=["bundled", "--model"])
def test_demo_names_prompts_outside_the_bundled_models_language(own_model, tmp_path, capsys, monkeypatch):
    import imptome.demo as demo
    from imptome.cli import CliError

    def stop(*args, **kwargs):  # the warning comes before the model is loaded
        raise CliError("stopped before loading")

    monkeypatch.setattr(demo, "load_pipeline", stop)
    argv = ["demo", "--prompt", "a photo of a cat", "--prompt", "top left: red circle"]
    argv += ["--out", str(tmp_path / "grid.png")]
    if own_model:  # another model has its own language: no warning
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "model_index.json").write_text("{}")
        argv += ["--model", str(tmp_path / "model")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "stopped before loading" in error
    assert ("1 of 2 prompt(s) are outside the bundled model's language" in error) != own_model
    assert ("'a photo of a cat'" in error) != own_model


def test_default_prompts_suit_the_model(model_dir):
    """The bundled model's held-out prompts for it (named by its folder too), general ones for another."""
    from imptome.demo import GENERAL_PROMPTS, default_prompts
    from imptome.miniature import miniature_path
    from imptome.miniature.data import parse_prompts

    assert default_prompts(None) == default_prompts(str(miniature_path()))
    assert all(parse_prompts(default_prompts(None)))  # in the bundled model's language
    assert default_prompts(str(model_dir)) == GENERAL_PROMPTS


def test_demo_panels_show_each_prompts_own_map_and_tokens_upright(tmp_path, monkeypatch):
    """The bundled model draws its shape where the prompt says, and the CFG importance is highest there: the
    heatmap of prompt i must be brightest in that prompt's quadrant (top right vs bottom left also catches a
    transposed map). The importance variant's kept-token map must be the plan built from that heatmap: with
    the default pool factor 1 the pool is the K most important tokens, and every independent (kept, not a
    destination) token is in the pool."""
    import imptome.demo as demo
    from imptome.merge import INDEPENDENT, MERGED

    drawn = {}
    grid = demo.comparison_grid

    def recording(path, row_titles, columns, title=""):
        drawn.update(rows=row_titles, columns=columns)
        return grid(path, row_titles, columns, title=title)

    monkeypatch.setattr(demo, "comparison_grid", recording)
    prompts = ["top right: red circle", "bottom left: blue cross"]
    argv = ["demo", "--steps", "6", "--out", str(tmp_path / "grid.png")]
    assert main([*argv, "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    assert drawn["rows"] == prompts
    panels = {kind: (title, panels) for title, panels, kind in drawn["columns"] if kind != "image"}
    assert panels["heatmap"][0] == "CFG importance used at step 3"
    (roles_title, roles), heats = panels["roles"], panels["heatmap"][1]
    assert roles_title == "importance: kept tokens, step 3"
    quadrant = {"top right": (slice(0, 8), slice(8, 16)), "bottom left": (slice(8, 16), slice(0, 8))}
    for prompt, heat, role in zip(prompts, heats, roles, strict=True):
        assert heat.shape == role.shape == (16, 16)
        inside = heat[quadrant[prompt.split(":")[0]]].mean()
        assert inside > 2 * heat.mean(), prompt
        kept = int((role != MERGED).sum())
        pool_threshold = heat.flatten().topk(kept).values[-1]
        assert bool((heat[role == INDEPENDENT] >= pool_threshold).all()), prompt
