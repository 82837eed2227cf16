"""The `imptome` command: a thin layer over the library.

    imptome demo              side-by-side grid of no merging / tome / importance on the bundled model
    imptome generate ...      batch generation (resumable; `accelerate launch` splits the prompts)
    imptome bench speed ...   denoiser step time and FLOPs at real model sizes
    imptome bench quality ... prompt accuracy, Frechet distance, PSNR/SSIM on the bundled model

Each subcommand has two modules. `imptome.commands.<name>` defines its arguments (`add_arguments(parser)`)
and the input checks that need neither torch nor the model (`check(args)`); it imports
neither torch nor diffusers, so that `--help`, a mistyped argument or a missing prompt file are answered at
once. The job's module (`imptome.generate`, `imptome.bench.speed`, ...) is imported only after those checks,
and runs it (`run(args) -> int`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import math
import sys
import tempfile
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

import imptome
from imptome.config import PRESETS, MergeConfig
from imptome.miniature import GUIDANCE, MODEL_DIR, miniature_path


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: `arguments` names the module with its `add_arguments(parser)` and `check(args)`, `job`
    the module with its `run(args) -> int`, and `help` is its one-line help."""

    arguments: str
    job: str
    help: str


# subcommand -> Command; "bench" has its own subcommands
COMMANDS: dict[str, Command] = {
    "demo": Command(
        arguments="imptome.commands.demo",
        job="imptome.demo",
        help="compare no merging, tome and importance on a few prompts; writes a PNG grid",
    ),
    "generate": Command(
        arguments="imptome.commands.generate",
        job="imptome.generate",
        help="generate one image per (prompt, seed); resumable, multi-process",
    ),
}
BENCHMARKS: dict[str, Command] = {
    "speed": Command(
        arguments="imptome.commands.speed",
        job="imptome.bench.speed",
        help="denoiser step time, FLOPs and efficiency at real model sizes",
    ),
    "quality": Command(
        arguments="imptome.commands.quality",
        job="imptome.bench.quality",
        help="accuracy, Frechet distance and PSNR/SSIM vs merge ratio",
    ),
}


#: The choices of `--dtype` (see add_dtype_argument).
DTYPE_NAMES = ("float32", "float16", "bfloat16")

#: The largest ratio that every family preset allows (their 2x2 cells: at most N - D tokens can go).
MAX_RATIO = min(preset.max_ratio for preset in PRESETS.values())


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def add_set_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """`--set KEY=VALUE` (repeatable), read by `merge_options`; `example` shows one use in the help."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a MergeConfig option as KEY=VALUE, repeatable (e.g. {example}; block_range=7,21 on "
        "transformer denoisers; none for no value); see imptome.MergeConfig",
    )


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """`--model`, resolved by `check_model`."""
    parser.add_argument("--model", help="pipeline folder or hub id (default: the bundled miniature model)")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype`, one of DTYPE_NAMES (imptome.loading maps them to torch dtypes)."""
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the weights")


def merge_options(pairs: list[str], ratio: float, method: str, method_flag: bool = True) -> dict[str, Any]:
    """MergeConfig options from `--set KEY=VALUE` strings, typed as the fields are and checked together
    with `ratio` and `method` (which have their own flags; `method_flag=False` for a command that runs
    every method) on top of the family presets; a CliError names what is wrong with every preset.
    `apply_patch_or_fail` checks them against the loaded model's preset."""
    hints = typing.get_type_hints(MergeConfig)
    settable = [f.name for f in dataclasses.fields(MergeConfig) if f.name not in ("ratio", "method")]
    options: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if key == "method" and not method_flag:
            raise CliError(f"--set {pair}: this command runs every method; the method cannot be set")
        if key in ("ratio", "method"):
            raise CliError(f"--set {pair}: use --{key} for the {key}")
        if not equals:
            raise CliError(f"--set {pair}: expected KEY=VALUE with KEY one of {', '.join(settable)}")
        if key not in settable:
            raise CliError(f"--set {pair}: unknown option {key!r}; KEY is one of {', '.join(settable)}")
        if key in options:  # the last would silently win
            raise CliError(f"--set {pair}: {key} is set twice; give each option once")
        try:
            options[key] = _typed(text.strip(), hints[key])
        except ValueError:
            raise CliError(f"--set {pair}: {text!r} is not a valid {key} ({_describe(hints[key])})") from None
    # The options go on top of the model family's preset (apply_patch), which is known only once the model
    # is loaded: refuse here what no preset accepts (the first is the UNets', MergeConfig's defaults), and
    # leave what depends on the family to apply_patch (merge_attn=false is fine on PixArt, whose preset merges
    # cross-attention too, but merges nothing in a UNet).
    errors = []
    for preset in dict.fromkeys(PRESETS.values()):
        try:
            preset.replace(ratio=ratio, method=method, **options)
            return options
        except ValueError as error:
            errors.append(error)
    message = str(errors[0])  # "<option>=<value> ...": named by the flag that set it
    option = message.partition("=")[0]
    flag = "--set " if option in options else "--" if option in ("ratio", "method") else ""
    raise CliError(flag + message)


def check_guidance(guidance: float) -> None:
    """A CliError unless `--guidance` is a finite number >= 0."""
    if not (math.isfinite(guidance) and guidance >= 0):
        raise CliError(f"--guidance {guidance}: must be a number >= 0 (1 or less turns CFG off)")


#: The largest seed a torch.Generator takes (manual_seed reads it as an unsigned 64-bit integer).
MAX_SEED = 2**64 - 1


def check_seed(seed: int, count: int = 1, flag: str = "--seed") -> None:
    """A CliError unless the `count` seeds from `seed` on are all in [0, MAX_SEED]."""
    if seed < 0:
        raise CliError(f"{flag} {seed}: seeds must be >= 0")
    if seed + count - 1 > MAX_SEED:
        last = seed + count - 1
        raise CliError(
            f"{flag} {seed}: the seeds go up to {last}; the largest a generator takes is {MAX_SEED}"
        )


def refuse_repeats(flag: str, values: list) -> None:
    """A CliError naming the values that `flag` lists more than once (they would run or count a case
    twice)."""
    repeated = dict.fromkeys(value for index, value in enumerate(values) if value in values[:index])
    if repeated:
        listed = ", ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in repeated)
        raise CliError(f"{flag} lists {listed} more than once; give each once")


def check_output_files(outputs: dict[str, Path], folders: dict[str, Path] | None = None) -> None:
    """Files a command writes when its work is done (flag -> path), checked before the work: none is a folder,
    each one's folder exists and is writable or can be made in a writable folder, and no two flags name one
    file; a CliError otherwise. `folders` (flag -> path) are folders the command writes files in (made when
    first needed): each is a writable folder or can be made in one, and is none of the files. Nothing is left
    behind here."""
    folders = folders or {}
    seen: dict[Path, str] = {}
    for flag, path in {**outputs, **folders}.items():
        resolved = path.expanduser().resolve()
        if resolved in seen:
            raise CliError(f"{flag} {path}: {seen[resolved]} writes that file too; give them different paths")
        seen[resolved] = flag
        if flag in folders:
            if resolved.exists() and not resolved.is_dir():
                raise CliError(f"{flag} {path} is a file, not a folder")
        elif resolved.is_dir():
            raise CliError(f"{flag} {path} is a folder; name a file")
        folder = resolved if flag in folders else resolved.parent
        while not folder.exists():  # the nearest folder that exists must take the new ones
            folder = folder.parent
        if not folder.is_dir():
            raise CliError(f"{flag} {path}: {folder} is a file, not a folder")
        problem = _write_problem(folder)
        if problem:
            raise CliError(f"{flag} {path}: cannot write in {folder}: {problem}")


def output_beside_json(args: Any, name: str, suffix: str) -> tuple[str, Path]:
    """Set `args.<name>` (an output file's path) to its default, the --json path with `suffix`, when it was
    not given; returns how an error should name the flag, and the path."""
    given = getattr(args, name)
    setattr(args, name, given or args.json.with_suffix(suffix))
    flag = f"--{name}" if given else f"--{name} (default: --json with {suffix})"
    return flag, getattr(args, name)


def _write_problem(folder: Path) -> str | None:
    """Why no file can be written in the existing `folder`, or None. Tried with a file that vanishes when
    closed: permissions alone say yes to root almost everywhere (e.g. under /proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or str(error)


def tomesd_installed() -> bool:
    """Whether the `tomesd` package (the baseline the benchmarks compare with) can be imported, without
    importing it (it imports torch)."""
    return importlib.util.find_spec("tomesd") is not None


def check_model(model: str | None) -> str:
    """Resolve `model` without loading it: None -> the bundled model's folder; a path must exist.

    Anything that is not an existing folder and does not look like a path is taken as a hub id
    (downloaded by diffusers on first use; needs internet).
    """
    if model is None:
        try:
            return str(miniature_path())
        except FileNotFoundError as error:  # a source checkout without the trained model
            raise CliError(f"{error}; or pass --model FOLDER") from None
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CliError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
        return str(path)
    if path.is_file():
        raise CliError(
            f"--model {model} is a file; give a diffusers pipeline folder (with model_index.json) or a hub "
            "id (a single-file checkpoint converts to a folder in Python: "
            "StableDiffusionPipeline.from_single_file, then save_pretrained)"
        )
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise CliError(
            f"model folder {model} does not exist (give a local pipeline folder, or a hub id of the form "
            "owner/name)"
        )
    owner = model.split("/")[0]
    if Path(owner).is_dir():  # runs/model, not yet made: a local path, not a hub lookup that waits on retries
        raise CliError(
            f"model folder {model} does not exist in the local folder {owner} (a hub id owner/name is looked "
            f"up only where no local folder named {owner} exists)"
        )
    return model


def apply_patch_or_fail(pipe: Any, **options: Any) -> None:
    """`imptome.apply_patch` for a command: a model imptome cannot patch, or options that do not fit it
    (e.g. block_range on a UNet, merge_kernel="triton" without Triton), are a CliError."""
    try:
        imptome.apply_patch(pipe, **options)
    except (TypeError, ValueError) as error:
        raise CliError(str(error)) from None


def uses_bundled_model(model: str | None) -> bool:
    """Whether --model `model` is the bundled model: not given, or its folder."""
    return model is None or Path(model).expanduser().resolve() == MODEL_DIR.resolve()


def default_guidance(model: str | None) -> float:
    """The CFG scale when --guidance is not given: the bundled model's own (see `imptome.miniature`), else
    diffusers' usual 7.5."""
    return GUIDANCE if uses_bundled_model(model) else 7.5


def warn_outside_grammar(prompts: list[str], model: str | None) -> None:
    """Warn on stderr about prompts outside the bundled model's language (when it is the model)."""
    from imptome.miniature.data import outside_grammar_warning

    warning = outside_grammar_warning(prompts) if uses_bundled_model(model) else None
    if warning:
        print(warning, file=sys.stderr, flush=True)


def prepare_output_folder(out: Path) -> None:
    """Create the output folder `out` if needed and prove it is writable by creating a file in it; a CliError
    otherwise (for `--out` of generate, and the folder of demo's `--out`)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"output folder {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CliError(f"cannot create output folder {out}: {error.strerror or error}") from None
    problem = _write_problem(out)
    if problem:
        raise CliError(f"cannot write a file in output folder {out}: {problem}")


#: How `--set` writes a bool field's values (in any case), in the order its error message names them.
BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def _typed(text: str, annotation: Any) -> Any:
    """`text` as a value of a MergeConfig field's type (bool, int, float, a Literal, a tuple, or None)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none":
            return None
        (annotation,) = [arg for arg in args if arg is not type(None)]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        if text.lower() not in BOOL_WORDS:
            raise ValueError(text)
        return BOOL_WORDS[text.lower()]
    if origin is Literal:
        return text  # MergeConfig names the allowed values when it rejects one
    if origin is tuple:
        parts = text.split(",")
        if len(parts) != len(args):
            raise ValueError(text)
        return tuple(_typed(part.strip(), arg) for part, arg in zip(parts, args, strict=True))
    return annotation(text)  # int or float


def _describe(annotation: Any) -> str:
    """How a value of a non-Literal field is written (Literal values are named by MergeConfig's check)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if annotation is type(None):
        return "none"
    if origin is tuple:
        return ",".join(_describe(arg) for arg in args)
    if annotation is bool:
        *words, last = BOOL_WORDS
        return f"{', '.join(words)} or {last}"
    return annotation.__name__


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that names each option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = any(default is none for none in (None, False, argparse.SUPPRESS)) or default == []
        if unset or "default" in text:
            return text
        if isinstance(default, list | tuple):  # as the values are typed: 0.3 0.5 0.7, not [0.3, 0.5, 0.7]
            return f"{text} (default: {' '.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


def _add(subparsers: argparse._SubParsersAction, name: str, command: Command, load: bool) -> None:
    parser = subparsers.add_parser(
        name, help=command.help, description=command.help, formatter_class=_HelpWithDefaults
    )
    parser.set_defaults(_command=command)
    if load:  # only the chosen subcommand's arguments module is imported
        importlib.import_module(command.arguments).add_arguments(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with arguments for the subcommand named in `argv` (all of them when none is named)."""
    words = [word for word in argv if not word.startswith("-")]
    chosen = words[:2] if words[:1] == ["bench"] else words[:1]
    parser = argparse.ArgumentParser(prog="imptome", description="Importance-based token merging (diffusers)")
    parser.add_argument("--version", action="version", version=f"imptome {imptome.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,bench}")
    for name, command in COMMANDS.items():
        _add(sub, name, command, load=chosen == [name])
    bench = sub.add_parser("bench", help="speed and quality benchmarks").add_subparsers(
        dest="benchmark", required=True, metavar="{speed,quality}"
    )
    for name, command in BENCHMARKS.items():
        _add(bench, name, command, load=chosen == ["bench", name])
    return parser


def read_prompts(path: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped (a byte-order mark, as some Windows editors write, is
    dropped); a CliError when unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CliError(f"prompt file {path} does not exist") from None
    except UnicodeDecodeError:
        raise CliError(f"prompt file {path} is not UTF-8 text") from None
    except OSError as error:
        raise CliError(f"cannot read prompt file {path}: {error.strerror or error}") from None
    # lines end at a newline only (text mode reads \r\n and \r as one): str.splitlines also breaks at
    # form feeds, \x1c-\x1e, \x85 and U+2028/U+2029, which scraped captions hold mid-line, and would
    # shift every later prompt's number (generate's file names) away from its line
    prompts = [line.strip() for line in text.split("\n") if line.strip()]
    if not prompts:
        raise CliError(f"prompt file {path} has no prompts (one per line; blank lines are skipped)")
    return prompts


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A `warnings.showwarning` that shows imptome's own warnings as one `imptome: warning: ...` line, like
    its errors (Python's format quotes the console script's line), and passes the others to `show`."""

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text.startswith("imptome: "):  # above any progress bar, not on its line
            tqdm.write(f"imptome: warning: {text.removeprefix('imptome: ')}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return show_warning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        try:
            importlib.import_module(args._command.arguments).check(args)
            return importlib.import_module(args._command.job).run(args) or 0
        except CliError as error:
            print(f"imptome: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C: no traceback; generate and bench quality resume when rerun
            print("\nimptome: interrupted", file=sys.stderr)
            return 130
        except (MemoryError, RuntimeError) as error:  # sizes, batches or --seeds too large for the memory
            if not _out_of_memory(error):
                raise
            reason = str(error).strip().partition("\n")[0] or type(error).__name__
            hint = "try smaller images or batches, or fewer seeds, prompts or frames"
            print(f"\nimptome: error: out of memory ({reason}); {hint}", file=sys.stderr)
            return 1


def _out_of_memory(error: BaseException) -> bool:
    """Whether `error` says that memory ran out: Python's MemoryError, torch.OutOfMemoryError (a device's
    allocator; named, not imported: cli imports no torch) or the RuntimeError of torch's CPU allocator."""
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or "DefaultCPUAllocator: can't allocate memory" in str(error)
    )


if __name__ == "__main__":
    sys.exit(main())
