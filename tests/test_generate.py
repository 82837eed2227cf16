"""`imptome generate` on a tiny SD pipeline folder: two accelerate processes, resume after SIGKILL, bad input.

Generation runs on one thread per process (OMP_NUM_THREADS=1 / torch.set_num_threads(1)): the cores here are
shared, and the same thread count in every run keeps float results comparable across processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile, PngImagePlugin

import imptome
import imptome.generate as generate
from imptome.cli import CliError, main
from imptome.generate import METADATA_KEY, WorkItem, pending_items, read_metadata, save_image, work_items
from tests.factories import tiny_sd_pipeline

PROMPTS = ["a red cat", "a blue dog on the grass", "a green tree", "a white house", "a yellow star"]
FAST = ["--steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS[0] + "\n\n" + "\n".join(PROMPTS[1:]) + "\n   \n")  # blank lines are skipped
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _environment(tmp_path: Path) -> dict[str, str]:
    """A subprocess environment: one thread, no user accelerate config, offline."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _images(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def _expected_names(prompts: int, seeds: range) -> set[str]:
    return {f"{index:05d}_{seed}.png" for index in range(prompts) for seed in seeds}


def test_two_accelerate_processes_make_the_full_set_once(tmp_path, model_dir, prompts_file):
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port())]
    command = [*launch, "-m", "imptome", "generate", "--prompts", str(prompts_file), "--out", str(out)]
    command += ["--model", str(model_dir), *FAST]
    result = subprocess.run(command, env=_environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    assert set(_images(out)) == _expected_names(len(PROMPTS), range(1))
    # each process reports what it wrote: 3 + 2 = 5 means no image was generated twice
    assert "process 1/2 wrote 3 image(s)" in result.stdout
    assert "process 2/2 wrote 2 image(s)" in result.stdout
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [entry["file"] for entry in manifest] == sorted(_expected_names(len(PROMPTS), range(1)))
    assert [entry["prompt"] for entry in manifest] == PROMPTS
    assert not list(out.glob("*.tmp"))


def test_killed_run_resumes_to_the_images_of_a_clean_run(
    tmp_path, model_dir, prompts_file, one_thread, capsys
):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    arguments = ["generate", "--prompts", str(prompts_file), "--model", str(model_dir), "--seeds", "3", *FAST]
    expected = _expected_names(len(PROMPTS), range(3))
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "imptome", *arguments, "--out", str(killed)],
            env=_environment(tmp_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 600  # a guard against a hung child, not a speed target
        while not list(killed.glob("*.png")):
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no image appeared: the child hangs"
            time.sleep(0.005)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_before_kill = _images(killed)
    assert 0 < len(done_before_kill) < len(expected)
    # as if killed while rewriting a finished image: the resume writes no file of that name
    leftover = killed / f"{min(done_before_kill)}.tmp"
    leftover.write_bytes(b"half an image")

    capsys.readouterr()
    assert main([*arguments, "--out", str(killed)]) == 0
    # only the missing images were made (the finished ones were kept, not made again)
    assert f"wrote {len(expected) - len(done_before_kill)} image(s)" in capsys.readouterr().out
    resumed = _images(killed)
    assert set(resumed) == expected
    assert not leftover.exists()
    rewritten = [name for name, data in done_before_kill.items() if resumed[name] != data]
    assert rewritten == []

    assert main([*arguments, "--out", str(clean)]) == 0
    reference = _images(clean)
    assert [name for name in sorted(expected) if reference[name] != resumed[name]] == []  # byte-identical


def test_a_partly_done_batch_is_regenerated_whole_and_only_its_missing_image_written(
    tmp_path, model_dir, prompts_file, one_thread, capsys
):
    out = tmp_path / "out"
    arguments = ["generate", "--prompts", str(prompts_file), "--model", str(model_dir), "--out", str(out)]
    arguments += ["--method", "tome", "--ratio", "0.5", "--batch-size", "2", *FAST]
    assert main(arguments) == 0
    first = _images(out)
    assert set(first) == _expected_names(len(PROMPTS), range(1))
    metadata = read_metadata(out / "00002_0.png")
    assert metadata is not None
    assert (metadata["method"], metadata["batch_size"], metadata["prompt"]) == ("tome", 2, PROMPTS[2])
    assert metadata["guidance"] == 7.5  # diffusers' usual scale for a --model; the bundled model's is 5

    (out / "00003_0.png").unlink()  # batches are [0, 1], [2, 3], [4]: batch [2, 3] is half done
    capsys.readouterr()
    assert main(arguments) == 0
    assert "wrote 1 image(s)" in capsys.readouterr().out
    again = _images(out)
    assert [name for name in first if again[name] != first[name]] == []  # same batch composition, same pixels


def test_set_options_change_the_images_are_recorded_and_must_match_on_resume(
    tmp_path, model_dir, prompts_file, one_thread, capsys
):
    one_prompt = tmp_path / "one.txt"
    one_prompt.write_text(PROMPTS[0] + "\n")

    def run(out: str, *options: str) -> int:
        arguments = ["generate", "--prompts", str(one_prompt), "--model", str(model_dir), *FAST]
        return main([*arguments, "--out", str(tmp_path / out), "--ratio", "0.7", *options])

    assert run("plain") == 0
    assert run("prop", "--set", "proportional_attention=true", "--set", "merge_start_step=0") == 0
    plain, prop = read_metadata(tmp_path / "plain/00000_0.png"), read_metadata(tmp_path / "prop/00000_0.png")
    assert plain["options"] == {}
    assert prop["options"] == {"proportional_attention": True, "merge_start_step": 0}
    assert _images(tmp_path / "plain") != _images(tmp_path / "prop")
    capsys.readouterr()
    assert run("prop", "--set", "proportional_attention=false", "--set", "merge_start_step=0") == 2
    assert "options {'merge_start_step': 0, 'proportional_attention': True}" in capsys.readouterr().err
    assert run("unet", "--set", "block_range=7,21") == 2  # found when patching the loaded UNet
    error = capsys.readouterr().err  # after the loading progress bars
    assert error.splitlines()[-1].startswith(
        "imptome: error: block_range=(7, 21) selects blocks of transformer"
    )
    assert "Traceback" not in error


def test_compile_option_compiles_the_patched_denoiser_and_is_recorded(
    tmp_path, model_dir, prompts_file, one_thread, capsys, monkeypatch
):
    """`--compile MODE` hands the patched UNet to torch.compile in that mode (here with Dynamo's eager
    backend, which computes exactly what eager mode does: Inductor's own checks are in tests/patch); the
    images equal an uncompiled run's and resume into its folder."""
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(model, *, mode=None):
        compiled.append((type(model).__name__, imptome.is_patched(model), mode))
        return real_compile(model, backend="eager")

    def run(out: str, *options: str) -> int:
        arguments = ["generate", "--prompts", str(prompts_file), "--model", str(model_dir), *FAST]
        return main([*arguments, "--out", str(tmp_path / out), "--ratio", "0.7", *options])

    assert run("plain") == 0
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    try:
        assert run("compiled", "--compile", "reduce-overhead") == 0
    finally:
        torch._dynamo.reset()
    assert compiled == [("UNet2DConditionModel", True, "reduce-overhead")]
    for path in sorted((tmp_path / "plain").glob("*.png")):  # same pixels (the PNGs' metadata differs)
        with Image.open(path) as plain, Image.open(tmp_path / "compiled" / path.name) as other:
            assert plain.tobytes() == other.tobytes(), path.name
    assert read_metadata(tmp_path / "compiled/00000_0.png")["compile"] == "reduce-overhead"
    assert read_metadata(tmp_path / "plain/00000_0.png")["compile"] is None
    capsys.readouterr()
    try:
        assert run("plain", "--compile", "default") == 0  # compiling is not part of what an image is
    finally:
        torch._dynamo.reset()
    assert "wrote 0 image(s)" in capsys.readouterr().out


def test_a_failing_compiler_is_one_clear_error(tmp_path, model_dir, prompts_file, capsys, monkeypatch):
    real_compile = torch.compile

    def no_compiler(graph, inputs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend=no_compiler))
    arguments = ["generate", "--prompts", str(prompts_file), "--model", str(model_dir), *FAST]
    try:
        assert main([*arguments, "--out", str(tmp_path / "out"), "--compile", "default"]) == 2
    finally:
        torch._dynamo.reset()
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        "imptome: error: torch.compile (--compile default) failed: RuntimeError: no C++ compiler found. Run "
        "without --compile, or fix the compiler set-up (Inductor needs a C++ compiler on the CPU and Triton "
        "on a GPU)."
    )
    assert list((tmp_path / "out").glob("*.png")) == []


def test_pending_items_ignores_temporary_and_broken_files_and_refuses_other_arguments(tmp_path):
    items = work_items(["a red cat", "a blue dog", "a green tree"], range(7, 8))
    settings = {"model": "/m", "weights": "sha256:aa", "method": "importance", "ratio": 0.5, "steps": 2}
    settings |= {"guidance": 7.5, "height": 64, "width": 64, "dtype": "float32", "imptome_version": "0.2.0"}
    settings |= {"options": {}}

    def metadata(item: WorkItem) -> dict:
        return {**settings, "prompt": item.prompt, "seed": item.seed}

    save_image(Image.new("RGB", (8, 8)), tmp_path / items[0].file_name, metadata(items[0]))
    complete = (tmp_path / items[0].file_name).read_bytes()
    (tmp_path / (items[1].file_name + ".tmp")).write_bytes(complete)  # a temporary file never counts
    (tmp_path / items[2].file_name).write_bytes(complete[:40])  # truncated: not done, will be overwritten
    assert pending_items(items, tmp_path, settings) == items[1:]
    # the same weights at another path (the bundled model in another install) resume the same images
    assert pending_items(items, tmp_path, {**settings, "model": "/elsewhere/m"}) == items[1:]

    with pytest.raises(CliError) as refused:
        pending_items(items, tmp_path, {**settings, "steps": 3})
    assert "1 image(s)" in str(refused.value) and "00000_7.png: steps 2 (now 3)" in str(refused.value)
    with pytest.raises(CliError, match=r"00000_7.png: prompt 'a red cat' \(now 'a black cat'\)"):
        pending_items([WorkItem(0, "a black cat", 7), *items[1:]], tmp_path, settings)
    with pytest.raises(CliError, match=r"weights 'sha256:aa' \(now 'sha256:bb'\)"):  # retrained in place
        pending_items(items, tmp_path, {**settings, "weights": "sha256:bb"})
    with pytest.raises(CliError, match=r"imptome_version '0.2.0' \(now '0.3.0'\)"):  # plans may differ
        pending_items(items, tmp_path, {**settings, "imptome_version": "0.3.0"})


def test_leftover_temporary_files_are_deleted_at_the_start_and_folders_of_such_names_kept(
    tmp_path, model_dir, prompts_file, monkeypatch
):
    """A killed run may leave an image's or the manifest's temporary file; a folder of such a name (of no
    image of this run: one of this run's is refused) is not imptome's."""
    out = tmp_path / "out"
    (out / "00099_0.png.tmp").mkdir(parents=True)
    leftovers = [out / "00000_0.png.tmp", out / "00099_1.png.tmp", out / "manifest.jsonl.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a file")
    seen = []

    def look(args, settings, out, batches, pending, state) -> int:
        seen.extend(path.name for path in leftovers if path.exists())
        return 0

    monkeypatch.setattr(generate, "_generate", look)
    argv = ["generate", "--prompts", str(prompts_file), "--model", str(model_dir), "--out", str(out), *FAST]
    assert main(argv) == 0
    assert seen == []  # gone before any image is written
    assert sorted(path.name for path in out.iterdir()) == ["00099_0.png.tmp", "manifest.jsonl"]
    assert (out / "00099_0.png.tmp").is_dir()


def test_the_resume_scan_reads_the_metadata_without_decoding_pixels_and_checks_the_file_is_whole(
    tmp_path, monkeypatch
):
    """The chunk is read, and every chunk's checksum checked up to the end marker (Image.verify), but the
    pixels are not decoded: a run of thousands of images paid for that on every resume. A damaged or cut
    file is not done, wherever it was cut."""
    (item,) = work_items(["a red cat"], range(1))
    path = tmp_path / item.file_name
    metadata = {"prompt": "a red cat", "seed": 0}
    save_image(Image.effect_noise((64, 64), 64).convert("RGB"), path, metadata)
    complete = path.read_bytes()

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert read_metadata(path) == metadata
    idat = complete.index(b"IDAT")
    assert complete.index(METADATA_KEY.encode()) < idat  # where save_image puts it
    damaged = bytearray(complete)
    damaged[idat + 100] ^= 1  # the chunk's checksum no longer matches
    for data in (complete[: idat + 100], complete[:-12], bytes(damaged)):  # cut in IDAT; no IEND
        path.write_bytes(data)
        assert read_metadata(path) is None
    monkeypatch.undo()

    start = complete.index(b"tEXt") - 4  # another program may move the chunk after the pixels, before IEND
    end = start + 12 + int.from_bytes(complete[start : start + 4], "big")
    moved = complete[:start] + complete[end:-12] + complete[start:end] + complete[-12:]
    path.write_bytes(moved)
    assert read_metadata(path) == metadata  # found by decoding them
    path.write_bytes(moved[: idat + 100])
    assert read_metadata(path) is None


def test_a_png_whose_imptome_chunk_is_not_an_object_is_not_done(tmp_path):
    """Only an object is imptome's metadata; other JSON under that name (a list, a number) raised an
    AttributeError from the resume scan."""
    (item,) = work_items(["a red cat"], range(1))
    for text in ("[1, 2]", "3", '"text"', "null"):
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        Image.new("RGB", (8, 8)).save(tmp_path / item.file_name, pnginfo=info)
        assert read_metadata(tmp_path / item.file_name) is None
        assert pending_items([item], tmp_path, {}) == [item]


def _bad_inputs(tmp_path: Path, model_dir: Path, prompts_file: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, expected message) for every kind of bad input."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    conflicting = tmp_path / "conflicting"
    conflicting.mkdir()
    old = {"model": str(model_dir.resolve()), "method": "importance", "ratio": 0.5, "steps": 30}
    old |= {"guidance": 7.5, "height": 64, "width": 64, "dtype": "float32", "prompt": PROMPTS[0], "seed": 0}
    save_image(Image.new("RGB", (8, 8)), conflicting / "00000_0.png", old)
    taken = {}  # a folder where the run writes a file: an image, the manifest, or a temporary file of either
    for name in ("00004_0.png", "00001_0.png.tmp", "manifest.jsonl", "manifest.jsonl.tmp"):
        taken[name] = tmp_path / f"taken-{name}"
        (taken[name] / name).mkdir(parents=True)

    def args(
        prompts: Path = prompts_file, out: Path = tmp_path / "out", model: Path = model_dir
    ) -> list[str]:
        return ["generate", "--prompts", str(prompts), "--out", str(out), "--model", str(model), *FAST]

    return {
        "empty prompt file": (args(prompts=empty), "has no prompts"),
        "missing prompt file": (args(prompts=tmp_path / "nope.txt"), "nope.txt does not exist"),
        "prompt file is a folder": (args(prompts=tmp_path), "cannot read prompt file"),
        "prompt file not utf-8": (args(prompts=latin1), "is not UTF-8 text"),
        "missing model folder": (args(model=tmp_path / "no-model"), "no-model does not exist"),
        "folder is not a pipeline": (args(model=tmp_path), "not a diffusers pipeline"),
        "output is a file": (args(out=not_a_folder), "file.txt is a file, not a folder"),
        "output under a file": (args(out=not_a_folder / "sub"), "cannot create output folder"),
        "ratio too large": (
            [*args(), "--ratio", "0.9"],
            "ratio=0.9 is out of range: allowed 0 <= ratio <= 0.75",
        ),
        "negative ratio": ([*args(), "--ratio", "-0.1"], "ratio=-0.1 is out of range"),
        "zero steps": ([*args(), "--steps", "0"], "--steps 0: must be at least 1"),
        "negative seed": ([*args(), "--seed", "-1"], "--seed -1: seeds must be >= 0"),
        "seeds past 2**64 - 1": (
            [*args(), "--seed", str(2**64 - 1), "--seeds", "2"],
            f"--seed {2**64 - 1}: the seeds go up to {2**64}; the largest a generator takes is {2**64 - 1}",
        ),
        "negative guidance": ([*args(), "--guidance", "-1"], "--guidance -1.0: must be a number >= 0"),
        "odd size": ([*args(), "--height", "60"], "--height 60: must be a positive multiple of 8"),
        "unknown device": ([*args(), "--device", "gpu0"], "--device gpu0: not a device name"),
        "other arguments in --out": (args(out=conflicting), "steps 30 (now 2)"),
        **{
            f"{name} is a folder": (
                args(out=folder),
                f"1 path(s) where this run writes a file are taken by a folder or other non-file "
                f"({folder / name}); move them away or use another --out folder",
            )
            for name, folder in taken.items()
        },
        "unknown --set option": (
            [*args(), "--set", "speed=11"],
            "--set speed=11: unknown option 'speed'; KEY is one of",
        ),
        "--set without merging": (
            [*args(), "--method", "none", "--set", "seed=1"],
            "--set configures merging; it cannot be used with --method none",
        ),
    }


def test_bad_input_exits_2_with_a_clear_message_before_loading(
    tmp_path, model_dir, prompts_file, capsys, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded despite bad input")

    monkeypatch.setattr(generate, "load_pipeline", never)
    for name, (arguments, message) in _bad_inputs(tmp_path, model_dir, prompts_file).items():
        assert main(arguments) == 2, name
        error = capsys.readouterr().err
        assert error.startswith("imptome: error: ") and message in error, (name, error)
        assert "Traceback" not in error
    assert not (tmp_path / "out").exists()  # a refused run leaves no output folder behind


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_the_guidance_default_is_the_bundled_models_own_for_it_and_diffusers_usual_else(
    command, tmp_path, prompts_file, model_dir
):
    """5 for the bundled model, whether named by its folder or not at all; 7.5 for another model."""
    from imptome.cli import build_parser
    from imptome.commands import demo as demo_command
    from imptome.commands import generate as generate_command
    from imptome.miniature import GUIDANCE, miniature_path

    base = ["generate", "--prompts", str(prompts_file), "--out", str(tmp_path / "out")]
    check = generate_command.check
    if command == "demo":
        base, check = ["demo"], demo_command.check
    for model, guidance in (
        ([], GUIDANCE),
        (["--model", str(miniature_path())], GUIDANCE),
        (
            ["--model", str(model_dir)],
            7.5,
        ),
    ):
        args = build_parser([*base, *model]).parse_args([*base, *model])
        check(args)
        assert args.guidance == guidance, model
    assert GUIDANCE == 5.0


def test_a_model_that_fails_to_load_leaves_no_output_folder_behind(tmp_path, prompts_file, capsys):
    broken = tmp_path / "broken"  # a pipeline folder whose UNet has no files
    broken.mkdir()
    (broken / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    existing = tmp_path / "existing"
    existing.mkdir()
    for out in (tmp_path / "new" / "images", existing):
        argv = ["generate", "--prompts", str(prompts_file), "--out", str(out), "--model", str(broken)]
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert f"imptome: error: cannot load {broken}: " in error and "Traceback" not in error
    assert not (tmp_path / "new" / "images").exists()
    assert existing.is_dir()  # a folder the user had is kept, even empty


def test_prompts_outside_the_bundled_models_language_are_named_in_a_warning(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\ntop left: red circle\n")
    argv = ["generate", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "2"]
    assert main(argv) == 0
    warning = capsys.readouterr().err
    assert "imptome: warning: 1 of 2 prompt(s) are outside the bundled model's language" in warning
    assert "'a photo of a cat'" in warning and "'top left: red circle'" not in warning.split(". It reads")[0]
    assert "shapes circle, square, triangle, cross" in warning
    assert len(list((tmp_path / "out").glob("*.png"))) == 2  # a warning, not a refusal


def test_a_run_refused_after_writing_images_keeps_the_folder_it_created(
    tmp_path, prompts_file, capsys, monkeypatch
):
    def write_then_refuse(args, settings, out, batches, pending, state):  # e.g. --compile failing on a batch
        (out / "written.png").write_bytes(b"")
        raise CliError("torch.compile (--compile default) failed")

    monkeypatch.setattr(generate, "_generate", write_then_refuse)
    out = tmp_path / "new"
    assert main(["generate", "--prompts", str(prompts_file), "--out", str(out)]) == 2
    assert "imptome: error: torch.compile (--compile default) failed" in capsys.readouterr().err
    assert (out / "written.png").exists()
