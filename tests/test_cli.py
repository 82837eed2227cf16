"""The command line: `--set KEY=VALUE` options typed and checked, prompt files, version, interrupts."""

from __future__ import annotations

import subprocess
import sys

import pytest

import imptome
from imptome.cli import CliError, main, merge_options, read_prompts


def test_values_take_the_type_of_their_field():
    options = merge_options(
        [
            "proportional_attention=true",
            "merge-mlp=no",  # dashes for underscores, as in flags
            "block_range=7, 21",
            "max_downsample=none",
            "pool_factor=1.4",
            "sx=4",
            "fallback=tome",
        ],
        ratio=0.5,
        method="importance",
    )
    assert options == {
        "proportional_attention": True,
        "merge_mlp": False,
        "block_range": (7, 21),
        "max_downsample": None,
        "pool_factor": 1.4,
        "sx": 4,
        "fallback": "tome",
    }
    assert type(options["sx"]) is int and type(options["pool_factor"]) is float
    assert merge_options([], ratio=0.5, method="tome") == {}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("ratio=0.3", "use --ratio"),
        ("method=tome", "use --method"),
        ("proportional_attention", "expected KEY=VALUE"),
        ("no_such_option=1", "unknown option 'no_such_option'; KEY is one of dst_fraction, pool_factor"),
        (
            "proportional_attention=maybe",
            "'maybe' is not a valid proportional_attention (true, false, yes, no, 1 or 0)",
        ),
        ("block_range=7", "'7' is not a valid block_range (int,int or none)"),
        ("pool_factor=big", "'big' is not a valid pool_factor (float)"),
        ("fallback=cells", "--set fallback='cells' is not supported; choose one of auto, random, tome"),
        ("pool_factor=0.5", "--set pool_factor=0.5 must be a finite number >= 1"),
    ],
)
def test_bad_options_name_what_is_wrong(pair, message):
    with pytest.raises(CliError) as error:
        merge_options([pair], ratio=0.5, method="importance")
    assert str(error.value).startswith("--set ") and message in str(error.value)


def test_every_spelling_the_bool_error_names_is_accepted_in_any_case():
    with pytest.raises(CliError) as error:
        merge_options(["merge_mlp=maybe"], ratio=0.5, method="importance")
    words = str(error.value).rpartition("(")[2].rstrip(")").replace(" or ", ", ").split(", ")
    assert sorted(words) == ["0", "1", "false", "no", "true", "yes"]
    for word in words:
        for text in (word, word.upper()):
            value = merge_options([f"merge_mlp={text}"], ratio=0.5, method="importance")["merge_mlp"]
            assert value is (word in ("true", "yes", "1")), text


def test_options_are_checked_together_with_ratio_and_method():
    assert merge_options(["dst_selection=random"], ratio=0.75, method="importance")
    with pytest.raises(CliError, match=r"^--ratio=0.75 is out of range: allowed 0 <= ratio <= 0.666667"):
        merge_options(["sx=3", "sy=1"], ratio=0.75, method="tome")


def test_an_option_set_twice_is_refused():
    """The last value silently won, and the command recorded only that one."""
    with pytest.raises(CliError, match=r"^--set pool_factor=2: pool_factor is set twice; give each option"):
        merge_options(["pool_factor=1.5", "pool_factor=2"], ratio=0.5, method="importance")


def test_options_are_checked_on_top_of_the_family_presets():
    """--set goes on top of the loaded model's preset, as apply_patch's keywords do: merge_attn=false is
    fine on PixArt, whose preset also merges cross-attention, so it is not refused before the model is known
    (apply_patch refuses it on a UNet); what no preset accepts still is."""
    assert imptome.PRESETS["pixart"].replace(merge_attn=False).merge_crossattn
    assert merge_options(["merge_attn=false"], ratio=0.5, method="importance") == {"merge_attn": False}
    with pytest.raises(CliError, match=r"^at least one of merge_attn, merge_crossattn, merge_mlp"):
        merge_options(["merge_attn=false", "merge_crossattn=false"], ratio=0.5, method="importance")


@pytest.mark.parametrize(
    "command", [["demo"], ["generate", "--prompts", "{prompts}", "--out", "{out}"], ["bench", "quality"]]
)
def test_commands_check_the_device_before_loading_anything(command, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    argv = [part.format(prompts=prompts, out=tmp_path / "out") for part in command]
    assert main([*argv, "--device", "gpu0"]) == 2
    assert "--device gpu0: not a device name; use e.g. cpu, cuda or cuda:1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["demo"], ["generate", "--prompts", "{prompts}", "--out", "{out}"], ["bench", "quality"]]
)
def test_commands_without_the_bundled_model_say_how_to_get_one(command, tmp_path, capsys, monkeypatch):
    """A source checkout without the trained model: one line naming the fix, for every command using it."""
    import imptome.cli

    def missing():
        raise FileNotFoundError("the miniature model is missing at /nowhere; train it with `...`")

    monkeypatch.setattr(imptome.cli, "miniature_path", missing)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    argv = [part.format(prompts=prompts, out=tmp_path / "out") for part in command]
    assert main([*argv, "--device", "cpu"]) == 2
    assert "the miniature model is missing at /nowhere; train it with `...`; or pass --model FOLDER" in (
        capsys.readouterr().err
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"imptome {imptome.__version__}"


def test_a_prompt_file_with_a_byte_order_mark_reads_as_plain_prompts(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufefftop left: red circle\r\n\r\nblue square\r\n".encode())
    assert read_prompts(str(prompts)) == ["top left: red circle", "blue square"]


def test_prompts_are_numbered_by_newlines_only_as_editors_and_wc_count_lines(tmp_path):
    """A form feed, \\x85 or U+2028 inside a line (scraped captions hold them) is no line break, as for
    editors and `wc -l`: each prompt keeps its line's number, which names generate's images; a lone \\r
    (old Mac files) still ends a line, as \\r\\n does."""
    prompts = tmp_path / "prompts.txt"
    lines = ["red circle\x0cblue square", "green cross \u2028 and red square \x85 too", "old mac\rline"]
    prompts.write_bytes(("\n".join(lines) + "\n").encode())
    assert read_prompts(str(prompts)) == [
        "red circle\x0cblue square",
        "green cross \u2028 and red square \x85 too",
        "old mac",
        "line",
    ]


def test_ctrl_c_ends_a_command_with_one_line_and_exit_code_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("imptome.demo.run", interrupted)
    assert main(["demo"]) == 130
    assert capsys.readouterr().err.strip() == "imptome: interrupted"


def _device_out_of_memory():
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nIf reserved but ...")


def _cpu_out_of_memory():
    import torch

    torch.empty(2**60, dtype=torch.uint8)  # torch's CPU allocator refuses at once


def _python_out_of_memory():
    raise MemoryError  # e.g. list(range(n)) for bench quality --seeds 1000000000000


@pytest.mark.parametrize(
    ("fail", "reason"),
    [
        (_device_out_of_memory, "CUDA out of memory. Tried to allocate 20.00 GiB."),
        (_cpu_out_of_memory, "[enforce fail at alloc_cpu.cpp"),
        (_python_out_of_memory, "MemoryError"),
    ],
    ids=["device", "cpu", "python"],
)
def test_running_out_of_memory_ends_a_command_with_one_line_and_exit_1(fail, reason, monkeypatch, capsys):
    """A size, batch or count too large for the memory was a traceback of dozens of lines (torch's allocator
    fails deep inside the denoiser): one line names it. Other errors still show their traceback."""
    monkeypatch.setattr("imptome.demo.run", lambda args: fail())
    assert main(["demo"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"imptome: error: out of memory ({reason}")
    assert lines[0].endswith("); try smaller images or batches, or fewer seeds, prompts or frames")

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr("imptome.demo.run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["demo"])


def test_bench_without_a_benchmark_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: {speed,quality}" in capsys.readouterr().err


def test_importing_imptome_and_asking_its_version_load_neither_torch_diffusers_nor_matplotlib():
    """They take seconds to import; the patch functions load them on first use."""
    script = (
        "import contextlib, io, sys, imptome; from imptome.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['--version'])\n"
        "heavy = [name for name in ('diffusers', 'matplotlib', 'torch') if name in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(imptome.apply_patch) and 'diffusers' in sys.modules\n"
        "assert imptome.patch.api.remove_patch is imptome.remove_patch and imptome.merge.build_plan\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_help_argument_errors_and_input_checks_import_no_heavy_library(tmp_path):
    """Each subcommand's arguments and input checks are in imptome.commands, which imports neither torch nor
    diffusers (seconds to import): `--help`, a mistyped argument and bad input are answered without them."""
    script = (
        "import sys; from imptome.cli import main\n"
        "missing, out = sys.argv[1:]\n"
        "commands = [['demo'], ['generate'], ['bench', 'speed'], ['bench', 'quality']]\n"
        "for argv in [command + ['--help'] for command in commands] + [['demo', '--ratio', 'high']]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit_info:\n"
        "        assert exit_info.code == (0 if '--help' in argv else 2), (argv, exit_info.code)\n"
        "assert main(['generate', '--prompts', missing, '--out', out]) == 2\n"
        "assert main(['bench', 'quality', '--prompts', missing]) == 2\n"
        "assert main(['demo', '--seed', '-3']) == 2\n"
        "assert main(['bench', 'speed', '--arch', 'sd21']) == 2\n"
        "heavy = [name for name in ('diffusers', 'matplotlib', 'numpy', 'torch') if name in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    missing, out = str(tmp_path / "missing.txt"), str(tmp_path / "out")
    result = subprocess.run([sys.executable, "-c", script, missing, out], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "argument --ratio: invalid float value: 'high'" in result.stderr
    assert result.stderr.count("missing.txt does not exist") == 2
    assert "--seed -3: seeds must be >= 0" in result.stderr
    assert "unknown --arch sd21" in result.stderr


def test_help_names_defaults_as_they_are_typed(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "merge ratios, each 0 to 0.75 (default: 0.3 0.5 0.7)" in text and "(default: 20)" in text
    assert "[0.3" not in text


def test_help_names_each_default_once_and_no_empty_one(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--set KEY=VALUE" in text
    assert text.count("(default: importance)") == 1 and text.count("(default: 20)") == 1
    assert "(default: )" not in text and "(default: [])" not in text


@pytest.mark.parametrize(
    ("command", "text"),
    [
        (["demo"], "merge ratio of the merged variants, above 0 and at most 0.75 with 2x2 cells (default:"),
        (["generate"], "merge ratio, 0 to 0.75 with 2x2 cells (default: 0.5; ignored with --method none)"),
        (["bench", "speed"], "merge ratios, each above 0 and at most 0.75 (default: 0.5 0.7)"),
        (["bench", "quality"], "merge ratios, each 0 to 0.75 (default: 0.3 0.5 0.7)"),
    ],
)
def test_help_names_the_ratios_allowed(command, text, capsys):
    """The ratio options said neither bound: a ratio out of range was learnt from the error."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert text in " ".join(capsys.readouterr().out.split())  # unwrapped


def test_an_output_folder_where_no_file_can_be_written_is_refused(tmp_path, monkeypatch):
    import tempfile

    from imptome.cli import prepare_output_folder

    def refuse(*args, **kwargs):  # as root, chmod cannot make a folder unwritable
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(CliError, match="cannot write a file in output folder .*out: Permission denied"):
        prepare_output_folder(tmp_path / "out")


def test_a_ctrl_c_while_the_command_loads_ends_it_without_a_traceback(monkeypatch, capsys):
    """The `imptome` command loads the command line inside its Ctrl-C handler: a Ctrl-C in the fraction of a
    second that loading takes printed a traceback (the console script imported `imptome.cli` first)."""
    import builtins

    from imptome.__main__ import run

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "imptome.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    assert run() == 130
    assert capsys.readouterr().err == "\nimptome: interrupted\n"
