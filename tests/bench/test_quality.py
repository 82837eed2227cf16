"""`imptome bench quality` end to end on a tiny saved pipeline: JSON fields, resuming, input checks."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import imptome
from imptome.bench import quality
from imptome.bench.metrics import bootstrap_ci
from imptome.cli import main
from imptome.commands import quality as quality_command
from imptome.commands.quality import ablation_options
from tests.factories import tiny_sd_pipeline, tiny_sd_unet

FIELDS = {
    "method", "ratio", "n_images", "accuracy", "accuracy_ci95", "position_accuracy", "frechet", "psnr",
    "ssim", "step_seconds", "flops_per_step", "n_scored", "per_image",
}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(sample_size=8).save_pretrained(path, safe_serialization=True)  # 64 px images
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\na blue square\n")
    return path


def test_quality_bench_writes_rows_and_resumes(model_dir, prompt_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q.json"
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    argv = ["bench", "quality", "--model", str(model), "--prompts", str(prompt_file), "--seeds", "1"]
    argv += ["--methods", "importance", "--ratios", "0.5", "--steps", "2", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["command"] == (  # everything that made these images, defaults included
        "imptome bench quality --seeds 1 --ratios 0.5 --steps 2 --guidance 5 --batch-size 36 --dtype float32 "
        f"--methods importance --model {model} --prompts {prompt_file}"
    )
    rows = report["rows"]
    assert [(r["method"], r["ratio"]) for r in rows] == [("none", 0.0), ("importance", 0.5)]
    assert all(set(r) >= FIELDS for r in rows)
    assert all(r["n_images"] == 2 for r in rows)
    merged = [r for r in rows if r["method"] != "none"]
    assert all(r["flops_per_step"] < rows[0]["flops_per_step"] for r in merged)
    assert all(0 < r["ssim"] <= 1 and r["psnr"] > 0 for r in merged)
    assert rows[0]["accuracy"] is None  # prompts outside the bundled model's grammar: no classifier scores
    # per-image values as grids [prompt][seed], the prompts named in the report
    assert report["prompt_texts"] == ["a red circle", "a blue square"] and report["seeds"] == [0]
    (grids,) = [r["per_image"] for r in merged]
    assert merged[0]["psnr_ci95"] is None  # one seed: no interval
    assert set(grids) == {"psnr", "ssim"} and rows[0]["per_image"] is None
    assert np.mean(grids["psnr"]) == pytest.approx(merged[0]["psnr"], abs=1e-3)
    lines = out.read_text().splitlines()  # a grid has one line per prompt, not one per value
    start = lines.index('    "psnr": [')
    assert [json.loads(line.strip().rstrip(",")) for line in lines[start + 1 : start + 3]] == grids["psnr"]
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    printed = capsys.readouterr().out
    assert f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}" in printed
    assert "| s/step (batch) | GFLOPs/step (1 prompt) |" in printed

    # a second run finds every image in the cache and generates nothing
    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached image")

    monkeypatch.setattr(quality.ImageCache, "save", fail)
    assert main(argv) == 0
    # ... and so does a copy of the model at another path (the bundled model in another install)
    shutil.copytree(model, tmp_path / "copy")
    assert main([*argv, "--model", str(tmp_path / "copy")]) == 0

    # other prompts with the same cache: only the shared prompt's images are found, the new one is made
    monkeypatch.undo()
    made, save = [], quality.ImageCache.save

    def record(self, variant, prompt_index, seed, image):
        made.append(prompt_index)
        save(self, variant, prompt_index, seed, image)

    monkeypatch.setattr(quality.ImageCache, "save", record)
    other = tmp_path / "other.txt"
    other.write_text("a blue square\na green triangle\n")
    assert main([*argv, "--prompts", str(other)]) == 0
    assert made == [1, 1]  # "a green triangle" (prompt 1 of the new file), for none and importance
    monkeypatch.undo()

    # another batch size (which rounds differently) is refused, not mixed with the cache
    capsys.readouterr()
    assert main([*argv, "--batch-size", "2"]) == 2
    assert re.search(r"other settings: batch_size \d+ \(now 2\)", capsys.readouterr().err)

    # the same folder with other weights (a model retrained in place) is refused, not mixed with the cache
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1.0}, weights)
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds images made with other settings: weights 'sha256:" in capsys.readouterr().err


def test_tomesd_merges_at_the_finest_level_with_attention():
    """As in `bench speed`: on a UNet without attention at full resolution (SDXL-like) tomesd's default level
    would merge nothing, so it is patched at the finest level that has attention."""
    pytest.importorskip("tomesd")
    pipe = tiny_sd_pipeline()
    pipe.unet = tiny_sd_unet(top_level_attention=False)
    with quality.Variant("tomesd", 0.5).applied(pipe):
        assert pipe.unet._tome_info["args"]["max_downsample"] == 2


def test_prompts_the_classifier_cannot_score_still_get_paired_psnr(model_dir, prompt_file, tmp_path):
    """Paired PSNR differences need no classifier: with prompts outside the bundled model's grammar they are
    reported, and only the accuracy difference is left out."""
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--model", str(model_dir), "--prompts", str(prompt_file), "--seeds", "2"]
    argv += ["--methods", "tome", "importance", "--ratios", "0.5", "--steps", "2", "--json", str(out)]
    assert main(argv) == 0
    (comparison,) = json.loads(out.read_text())["comparisons"]
    assert (comparison["method"], comparison["baseline"]) == ("importance", "tome")
    assert comparison["accuracy_diff"] is None and comparison["accuracy_ci95"] is None
    assert math.isfinite(comparison["psnr_diff_db"]) and len(comparison["psnr_ci95"]) == 2
    assert "| importance | tome | 0.5 | - | " in out.with_suffix(".md").read_text()


def test_a_resumed_run_makes_the_images_an_uninterrupted_one_does(
    model_dir, prompt_file, tmp_path, monkeypatch, capsys
):
    """An image's merge draws depend on its row in the batch: a run resumed after an interruption makes the
    batches of an uninterrupted run again (and saves only what is missing), not batches of what is left."""
    argv = ["bench", "quality", "--model", str(model_dir), "--prompts", str(prompt_file), "--seeds", "2"]
    argv += ["--methods", "importance", "--ratios", "0.5", "--steps", "2", "--batch-size", "2"]
    argv += ["--json", str(tmp_path / "q.json")]
    assert main(argv) == 0
    variant = quality.Variant("importance", 0.5)
    cached = sorted((tmp_path / "q.cache" / variant.key).glob("*.png"))
    assert len(cached) == 4  # 2 prompts x 2 seeds, in batches (prompt 0, prompt 1) per seed
    key = hashlib.sha256(b"a blue square").hexdigest()[:16]  # prompt 1: row 1 of seed 0's batch
    second = tmp_path / "q.cache" / variant.key / f"{key}_0.png"
    uninterrupted = second.read_bytes()
    second.unlink()  # as if the run had stopped before saving it
    saved, save = [], quality.ImageCache.save

    def record(self, variant, prompt_index, seed, image):
        saved.append((variant.key, prompt_index, seed))
        save(self, variant, prompt_index, seed, image)

    monkeypatch.setattr(quality.ImageCache, "save", record)
    assert main(argv) == 0
    assert len(saved) == 1 and saved[0][0] == variant.key and saved[0][2] == 0
    assert second.read_bytes() == uninterrupted

    # images made under other package versions (which round slightly differently) are not mixed in
    settings_file = tmp_path / "q.cache" / "settings.json"
    settings = json.loads(settings_file.read_text())
    assert set(settings["versions"]) == {"torch", "diffusers", "transformers", "tomesd"}
    settings["versions"]["torch"] = "0.0.1"
    settings_file.write_text(json.dumps(settings))
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds images made with other settings: versions" in capsys.readouterr().err


def test_tomesd_images_depend_on_neither_the_global_rng_nor_resuming(model_dir, prompt_file, tmp_path):
    """tomesd draws its partitions from a generator it forks from torch's global RNG at its first call, and
    that state differs between processes (and after anything that draws from it). The bench seeds tomesd's
    generator for every batch, so two runs make the same tomesd images, and a resumed run remakes a batch
    as an uninterrupted run made it, not with the draws left over from the batches before."""
    pytest.importorskip("tomesd")
    argv = ["bench", "quality", "--model", str(model_dir), "--prompts", str(prompt_file), "--seeds", "2"]
    argv += ["--methods", "tomesd", "--ratios", "0.5", "--steps", "3", "--batch-size", "2"]

    def images(name):
        folder = tmp_path / f"{name}.cache" / "tomesd@0.5"
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.glob("*.png")}

    with torch.random.fork_rng():
        for name, global_seed in (("a", 0), ("b", 1)):
            torch.manual_seed(global_seed)
            assert main([*argv, "--json", str(tmp_path / f"{name}.json")]) == 0
        assert len(images("a")) == 4 and images("a") == images("b")
        # the second batch (seed 1) made again alone, after another global RNG state
        key = hashlib.sha256(b"a blue square").hexdigest()[:16]
        (tmp_path / "b.cache" / "tomesd@0.5" / f"{key}_1.png").unlink()
        torch.manual_seed(2)
        assert main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    assert images("b") == images("a")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratios", "0.8"], "--ratios 0.8 for method tome: ratio=0.8 is out of range: allowed 0 <= ratio"),
        (["--methods", "random"], "unknown method"),
        (["--methods", "importance-pool0.5"], "pool_factor=0.5 must be a finite number >= 1"),
        (["--seeds", "0"], "--seeds 0"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--guidance", "-1"], "--guidance -1.0: must be a number >= 0"),
        (["--guidance", "nan"], "must be a number >= 0"),
        (["--seeds", "1", "1", "2", "2", "2"], "--seeds lists 1, 2 more than once; give each once"),
        (["--methods", "tome", "importance", "tome"], "--methods lists tome more than once; give each once"),
        (["--ratios", "0.5", "0.3", "0.50"], "--ratios lists 0.5 more than once; give each once"),
        (["--seeds", "-1", "3"], "--seeds -1: seeds must be >= 0"),
        (["--seeds", "0", str(2**64)], f"--seeds {2**64}: the seeds go up to {2**64}; the largest a"),
        (["--methods", "tome-per-layer-shuffled"], "or importance or an importance-* ablation followed by"),
        (["--json", "{tmp}"], "--json {tmp} is a folder; name a file"),
        (
            ["--json", "{tmp}/q.png"],
            "(default: --json with .png) {tmp}/q.png: --json writes that",
        ),
        (["--plot", "{tmp}/file.txt/q.png"], "--plot {tmp}/file.txt/q.png: {tmp}/file.txt is a file, not a"),
        (["--cache", "{tmp}/file.txt"], "--cache {tmp}/file.txt is a file; the image cache is a folder"),
    ],
)
def test_quality_bench_rejects_bad_input(prompt_file, extra, message, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("")
    extra = [part.format(tmp=tmp_path) for part in extra]
    assert main(["bench", "quality", "--prompts", str(prompt_file), *extra]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def test_an_unknown_plot_format_is_refused_before_any_image(prompt_file, tmp_path, capsys, monkeypatch):
    from imptome.bench import quality

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(quality, "load_pipeline", never)
    argv = ["bench", "quality", "--prompts", str(prompt_file), "--json", str(tmp_path / "q.json")]
    assert main([*argv, "--plot", str(tmp_path / "q.xyz")]) == 2
    assert "cannot write a .xyz figure; use one of .eps" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache", "{tmp}/q.json"], "--cache {tmp}/q.json: --json writes that file too"),
        (["--cache", "{tmp}/file.txt/cache"], "--cache {tmp}/file.txt/cache: {tmp}/file.txt is a file, not"),
        (["--json", "{tmp}/q.cache"], "--cache (default: --json with .cache) {tmp}/q.cache: --json writes"),
    ],
    ids=["--json", "under-a-file", "default-at-json"],
)
def test_a_cache_where_no_image_can_go_is_refused_before_any_image(
    extra, message, prompt_file, tmp_path, capsys, monkeypatch
):
    """The cache is checked with the output files: each of these failed with a traceback once the first
    images were made (a cache at the --json path even made a folder where the report was to go)."""
    from imptome.bench import quality

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(quality, "load_pipeline", never)
    (tmp_path / "file.txt").write_text("")
    argv = ["bench", "quality", "--prompts", str(prompt_file), "--json", str(tmp_path / "q.json")]
    assert main([*argv, *(part.format(tmp=tmp_path) for part in extra)]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file.txt", "prompts.txt"]


@pytest.mark.parametrize("name", ["q.json", "q.md", "q.png"])
def test_an_interrupted_report_leaves_the_previous_one_whole(
    name, model_dir, prompt_file, tmp_path, interrupt_writes
):
    """The report, table and plot are written atomically: a Ctrl-C while one was written left it cut."""
    argv = ["bench", "quality", "--model", str(model_dir), "--prompts", str(prompt_file), "--seeds", "1"]
    argv += ["--methods", "importance", "--ratios", "0.5", "--steps", "2", "--json", str(tmp_path / "q.json")]
    assert main(argv) == 0
    before = (tmp_path / name).read_bytes()
    interrupt_writes(tmp_path / name)
    assert main(argv) == 130  # every image cached: only the outputs are written
    assert (tmp_path / name).read_bytes() == before


def test_a_cache_interrupted_while_claimed_is_taken_by_the_next_run(
    model_dir, prompt_file, tmp_path, interrupt_writes, monkeypatch
):
    """The cache's settings.json is written atomically: a Ctrl-C while it was written left a cut file, and
    every later run with that cache failed reading it with a traceback."""
    argv = ["bench", "quality", "--model", str(model_dir), "--prompts", str(prompt_file), "--seeds", "1"]
    argv += ["--methods", "importance", "--ratios", "0.5", "--steps", "2", "--json", str(tmp_path / "q.json")]
    interrupt_writes(tmp_path / "q.cache" / "settings.json")
    assert main(argv) == 130
    monkeypatch.undo()  # writes go through again
    assert main(argv) == 0


def test_any_pool_factor_is_an_ablation():
    assert ablation_options("importance-pool2.33") == {"pool_factor": 2.33}
    assert ablation_options("importance-pool1.0") == {"pool_factor": 1.0}
    assert ablation_options("importance-random-pool2") == {"dst_selection": "random", "pool_factor": 2.0}
    assert ablation_options("importance-paper") == {"dst_selection": "random", "pool_factor": 1.4}
    assert ablation_options("importance-pool") is None and ablation_options("tome") is None
    assert ablation_options("importance-cells-pool1.0") is None  # not an ablation name
    assert ablation_options("importance-shuffled") == {}  # the control
    paper_pool2 = {"dst_selection": "random", "pool_factor": 2.0}
    assert ablation_options("importance-paper-pool2-shuffled") == paper_pool2
    assert ablation_options("tome-shuffled") is None and ablation_options("importance-shuffled-pool2") is None
    assert ablation_options("tome-per-layer") == {"plan_scope": "layer"}
    assert ablation_options("tome-per-layer-pool2") is None  # tome has no pool
    assert ablation_options("tome-per-layer-shuffled") is None  # nor an importance map to shuffle


def test_empty_prompt_file_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["bench", "quality", "--prompts", str(empty)]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_quality_bench_scores_the_bundled_model_with_its_classifier(tmp_path):
    out = tmp_path / "bundled.json"
    methods = ["tome", "tome-per-layer", "tome-per-layer-rowmatch", "importance", "importance-shuffled"]
    argv = ["bench", "quality", "--seeds", "1", "--methods", *methods, "--ratios", "0.7", "--steps", "4"]
    assert main([*argv, "--batch-size", "36", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert rows["none"]["n_images"] == 36  # the built-in held-out prompt set
    for row in rows.values():
        assert 0.0 <= row["position_accuracy"] <= row["accuracy"] <= 1.0
        assert row["frechet"] > 0
        # one seed: the spread between seeds (their shared initial noise) cannot be estimated, so no interval
        assert row["accuracy_ci95"] is None and row["psnr_ci95"] is None
    assert f"| {rows['none']['accuracy']:.3f} [-] |" in out.with_suffix(".md").read_text()
    # paired differences: each importance variant minus each tome variant, importance minus its shuffled
    # control, row matching minus the ablation it extends
    comparisons = {(c["method"], c["baseline"]): c for c in report["comparisons"]}
    tomes = ("tome", "tome-per-layer", "tome-per-layer-rowmatch")
    assert set(comparisons) == {
        *((importance, tome) for importance in ("importance", "importance-shuffled") for tome in tomes),
        ("importance", "importance-shuffled"), ("tome-per-layer-rowmatch", "tome-per-layer"),
    }  # fmt: skip
    for (method, baseline), comparison in comparisons.items():
        difference = rows[method]["accuracy"] - rows[baseline]["accuracy"]
        assert comparison["accuracy_diff"] == pytest.approx(difference)
        assert math.isfinite(comparison["psnr_diff_db"]) and comparison["psnr_ci95"] is None


def test_the_report_holds_the_per_image_values_every_interval_comes_from(tmp_path):
    """The per-image grids [prompt][seed] in the JSON rows are enough to recompute every interval (say, with
    another interval method) without the images."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("top left: red circle\nbottom left: red square\ntop right: red triangle\n")
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--prompts", str(prompts), "--seeds", "3", "--methods", "tome", "importance"]
    assert main([*argv, "--ratios", "0.5", "--steps", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 1, 2] and len(report["prompt_texts"]) == 3
    assert "draw prompts and seeds independently" in report["intervals"]
    assert "draw prompts and seeds independently" in out.with_suffix(".md").read_text()
    rows = {r["method"]: r for r in report["rows"]}

    def grid(method, name):
        return np.array(rows[method]["per_image"][name], dtype=float)  # [prompt, seed]; null -> NaN

    def interval(values, weights=None):
        return bootstrap_ci(values, weights, resample=quality.RESAMPLE)

    assert grid("none", "hits").shape == (3, 3) and "psnr" not in rows["none"]["per_image"]
    for method, row in rows.items():
        assert interval(grid(method, "hits"), grid(method, "objects")) == pytest.approx(row["accuracy_ci95"])
        position = interval(grid(method, "position_hits"), grid(method, "objects"))
        assert position == pytest.approx(row["position_accuracy_ci95"])
        if method != "none":
            assert np.nanmean(grid(method, "psnr")) == pytest.approx(row["psnr"], abs=1e-3)
            assert interval(grid(method, "psnr")) == pytest.approx(row["psnr_ci95"], abs=1e-3)
            ssim_ci = interval(grid(method, "ssim"))  # from values rounded to 1e-5
            assert ssim_ci == pytest.approx(row["ssim_ci95"], abs=1e-4)
    (comparison,) = report["comparisons"]
    assert (comparison["method"], comparison["baseline"]) == ("importance", "tome")
    db = grid("importance", "psnr") - grid("tome", "psnr")
    assert interval(db) == pytest.approx(comparison["psnr_ci95"], abs=1e-3)
    hits = grid("importance", "hits") - grid("tome", "hits")
    assert interval(hits, grid("importance", "objects")) == pytest.approx(comparison["accuracy_ci95"])


def test_prompts_outside_the_classifier_grammar_are_named_and_the_rest_scored(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("center: green square\ntop left: red circle\n")  # the first lacks its row
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--prompts", str(prompts), "--seeds", "1", "--methods", "none"]
    assert main([*argv, "--steps", "2", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "'center: green square'" in warning[0]
    assert "top left: red circle" not in warning[0].split(";")[0]  # names only the prompt it cannot score
    assert all(word in warning[0] for word in ("middle", "center", "magenta", "cross"))  # the vocabulary
    (row,) = json.loads(out.read_text())["rows"]
    assert row["n_images"] == 2 and 0.0 <= row["accuracy"] <= 1.0  # the scorable prompt is scored
    assert row["frechet"] is None  # one scored image has no covariance
    # the table is printed whole on a stdout that is not a terminal, not wrapped at 80 columns
    assert out.with_suffix(".md").read_text().splitlines()[0] in captured.out.splitlines()


def test_the_frechet_note_counts_only_the_images_the_classifier_scores(tmp_path):
    """The Frechet distance rests on the images of the prompts the classifier reads: the table's note gives
    their number, not that of every image (here 2 of 3)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("top left: red circle\nbottom right: blue square\na green triangle\n")
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--prompts", str(prompts), "--seeds", "1", "--methods", "none"]
    assert main([*argv, "--steps", "2", "--json", str(out)]) == 0
    assert "Frechet: from 2 images per method" in out.with_suffix(".md").read_text()
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["n_images"], row["n_scored"]) == (3, 2) and row["frechet"] is not None


def test_fidelity_pairs_each_image_with_the_unmerged_image_of_its_prompt_and_seed():
    """PSNR and its paired differences compare each merged image with the unmerged image of the same prompt
    and seed: every image here is off from its own reference by its own amount, so any other pairing (or a
    mean over the wrong axis) gives other numbers."""
    items = [(p, s) for s in (3, 5) for p in range(3)]
    rng = np.random.default_rng(0)
    unmerged = rng.integers(0, 200, (len(items), 8, 8, 3), dtype=np.uint8)
    offsets = {"tome": np.arange(1, 7), "importance": np.array([2, 1, 4, 3, 6, 5])}  # per image, items order

    class Cache:
        def load(self, variant, wanted):
            assert wanted == items
            if variant.method == "none":
                return unmerged
            return unmerged + offsets[variant.method].astype(np.uint8)[:, None, None, None]

        def stats(self, variant):
            return {"step_seconds": [], "flops_per_step": 1.0}

    variants = [
        quality.Variant(method, ratio) for method, ratio in (("none", 0), ("tome", 0.5), ("importance", 0.5))
    ]
    rows, comparisons = quality.evaluate(Cache(), variants, ["x", "y", "z"], items, [None] * 3)
    db = {method: 20 * np.log10(255 / offset) for method, offset in offsets.items()}  # MSE = (offset / 255)^2
    assert rows[1].psnr == pytest.approx(db["tome"].mean(), rel=1e-5)
    assert rows[2].psnr == pytest.approx(db["importance"].mean(), rel=1e-5)
    assert rows[1].ssim < 1 and rows[0].psnr is None
    (comparison,) = comparisons
    assert (comparison["method"], comparison["baseline"]) == ("importance", "tome")
    assert comparison["psnr_diff_db"] == pytest.approx((db["importance"] - db["tome"]).mean(), abs=1e-4)
    low, high = comparison["psnr_ci95"]
    per_image = db["importance"] - db["tome"]
    assert per_image.min() <= low < high <= per_image.max()


class _ShiftedCache:
    """Images of `items` made by adding a per-image offset to random unmerged images (one offset array per
    method, in items order), so each image's PSNR is 20 log10(255 / offset)."""

    def __init__(self, items, offsets):
        self.items, self.offsets = items, offsets
        self.unmerged = np.random.default_rng(0).integers(0, 200, (len(items), 8, 8, 3), dtype=np.uint8)

    def load(self, variant, wanted):
        assert wanted == self.items
        if variant.method == "none":
            return self.unmerged
        return self.unmerged + self.offsets[variant.method].astype(np.uint8)[:, None, None, None]

    def stats(self, variant):
        return {"step_seconds": [], "flops_per_step": 1.0}


VARIANTS = [
    quality.Variant(method, ratio) for method, ratio in (("none", 0), ("tome", 0.5), ("importance", 0.5))
]


def test_intervals_resample_prompts_not_images():
    """All seeds of a prompt give the same PSNR here: the interval is that of the per-prompt values (each
    prompt counted once), not the narrower one of the images taken as independent; likewise the paired
    difference. The per-image grids in the rows hold each value at its prompt and seed."""
    prompts, seeds = 10, (3, 5, 8, 9)
    items = [(p, s) for s in seeds for p in range(prompts)]
    per_prompt = {"tome": np.arange(1, 11), "importance": np.array([2, 1, 4, 3, 6, 5, 8, 7, 10, 12])}
    offsets = {method: np.array([offset[p] for p, _ in items]) for method, offset in per_prompt.items()}
    rows, comparisons = quality.evaluate(
        _ShiftedCache(items, offsets), VARIANTS, [f"p{i}" for i in range(prompts)], items, [None] * prompts
    )
    db = {method: 20 * np.log10(255 / offset) for method, offset in per_prompt.items()}  # [prompts]
    for row in rows[1:]:
        np.testing.assert_allclose(row.per_image["psnr"], np.repeat(db[row.method][:, None], 4, 1), atol=1e-3)
        assert row.psnr_ci95 == pytest.approx(bootstrap_ci(db[row.method]), rel=1e-6)  # float32 PSNR
        per_image = bootstrap_ci(np.repeat(db[row.method], 4))  # the images as independent units
        assert np.diff(row.psnr_ci95) > 1.5 * np.diff(per_image)  # about sqrt(4) = 2 wider
    (comparison,) = comparisons
    assert comparison["psnr_ci95"] == pytest.approx(bootstrap_ci(db["importance"] - db["tome"]), abs=1e-5)


def test_intervals_count_what_the_prompts_of_one_seed_share():
    """Every prompt at one seed starts from the same noise: here each seed moves all its prompts' PSNR alike
    (and nothing else varies). Resampling images or prompts alone would give an interval of (nearly) zero
    width; drawing seeds too gives the spread of the seeds' means."""
    prompts, seeds = 10, (3, 5, 8, 9)
    items = [(p, s) for s in seeds for p in range(prompts)]
    by_seed = {"tome": {3: 1, 5: 3, 8: 6, 9: 12}, "importance": {3: 2, 5: 2, 8: 4, 9: 10}}
    offsets = {method: np.array([offset[s] for _, s in items]) for method, offset in by_seed.items()}
    rows, comparisons = quality.evaluate(
        _ShiftedCache(items, offsets), VARIANTS, [f"p{i}" for i in range(prompts)], items, [None] * prompts
    )
    for row in rows[1:]:
        seed_db = 20 * np.log10(255 / np.array(list(by_seed[row.method].values())))
        low, high = row.psnr_ci95
        assert seed_db.min() <= low < row.psnr < high <= seed_db.max()
        assert high - low > 0.3 * (seed_db.max() - seed_db.min())
    low, high = comparisons[0]["psnr_ci95"]
    assert high - low > 1.0  # dB; the seeds' differences run from 0 to 6 dB


def test_one_prompt_gives_values_without_intervals():
    """With one prompt the spread between prompts cannot be estimated: the values come without intervals,
    and the table says so with [-] rather than an interval of width zero."""
    items = [(0, 0), (0, 1), (0, 2)]
    offsets = {"tome": np.array([1, 2, 3]), "importance": np.array([2, 2, 4])}
    rows, comparisons = quality.evaluate(_ShiftedCache(items, offsets), VARIANTS, ["x"], items, [None])
    assert rows[1].psnr is not None and rows[1].psnr_ci95 is None and rows[1].ssim_ci95 is None
    assert comparisons[0]["psnr_diff_db"] is not None and comparisons[0]["psnr_ci95"] is None
    table = quality.markdown_table(rows, comparisons, cfg=True)
    assert f"| {rows[1].psnr:.2f} [-] |" in table and "[-]: fewer than 2 prompts or 2 seeds" in table


def test_plot_of_rows_without_values_has_no_legend(tmp_path):
    row = quality.Row("none", 0.0, 1, None, None, None, None, None, None, None, None, None, None, 1e9)
    # `--methods none` on prompts the classifier cannot score
    figure = quality.plot([row], tmp_path / "q.png")
    assert (tmp_path / "q.png").exists() and not figure.legends
    scored = dataclasses.replace(row, accuracy=0.9)
    merged = dataclasses.replace(row, method="tome", ratio=0.5, accuracy=0.8, psnr=30.0)
    (legend,) = quality.plot([scored, merged], tmp_path / "q.png").legends
    assert [text.get_text() for text in legend.get_texts()] == ["tome", "none"]


def test_shuffled_control_moves_the_map_and_keeps_its_values():
    pipe = tiny_sd_pipeline()
    outputs = []
    record = pipe.unet.register_forward_hook(lambda module, args, output: outputs.append(output[0]))
    try:
        with quality.Variant("importance-shuffled", 0.5).applied(pipe):
            pipe("a red circle", num_inference_steps=3, output_type="latent")
            shuffled = imptome.importance_map(pipe)
        assert not imptome.is_patched(pipe) and not pipe.unet._forward_hooks.keys() - {record.id}
    finally:
        record.remove()
    uncond, cond = outputs[-1].chunk(2)
    true_map = (cond - uncond).abs().mean(dim=1)  # [1, 16, 16], what an unshuffled patch would hold
    assert not torch.equal(shuffled, true_map)
    assert torch.equal(shuffled.flatten().sort().values, true_map.flatten().sort().values)


@pytest.mark.parametrize(("guidance", "with_fallbacks"), [("5", False), ("1", True)])
def test_ablations_run_the_fallback_ablations_only_without_guidance(guidance, with_fallbacks):
    parser = argparse.ArgumentParser()
    quality_command.add_arguments(parser)
    args = parser.parse_args(["--ablations", "--methods", "none", "--ratios", "0.5", "--guidance", guidance])
    methods = quality_command._methods(args)
    fallbacks = {"importance-tomefallback", "importance-prop-randomfallback"}
    assert fallbacks & set(methods) == (fallbacks if with_fallbacks else set())
    assert {"importance-prop", "importance-grid", "tome-per-layer"}.issubset(methods)


def test_a_model_that_fails_to_load_leaves_no_cache(prompt_file, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--model", str(broken), "--prompts", str(prompt_file), "--json", str(out)]
    assert main(argv) == 2
    assert f"cannot load {broken}" in capsys.readouterr().err
    assert not out.with_name("q.cache").exists()  # else its settings would refuse the next, fixed run


def test_the_table_says_how_many_images_each_frechet_distance_rests_on():
    row = quality.Row("none", 0.0, 24, 0.9, (0.8, 1.0), 0.9, (0.8, 1.0), 301.5, *[None] * 5, 1e9)
    unscored = quality.Row("none", 0.0, 1, *[None] * 10, 1e9)
    table = quality.markdown_table([row, unscored], [], cfg=True)
    assert "| 301.50 |" in table
    assert "Frechet: from 24 images per method; the estimate is biased by the number of images" in table
    assert "Frechet:" not in quality.markdown_table([unscored], [], cfg=True)


def test_the_frechet_note_names_every_image_count_of_the_table():
    rows = [
        quality.Row("none", 0.0, n, 0.9, (0.8, 1.0), 0.9, (0.8, 1.0), 301.5, *[None] * 5, 1e9)
        for n in (24, 12)
    ]
    assert "Frechet: from 12, 24 images per method" in quality.markdown_table(rows, [], cfg=True)
