"""The `imptome` command: a thin layer over the library.

    imptome demo              side-by-side grid of no merging / tome / importance on the bundled model
    imptome generate ...      batch generation (resumable; `accelerate launch` splits the prompts)
    imptome bench speed ...   denoiser step time and FLOPs at real model sizes
    imptome bench quality ... prompt accuracy, Frechet distance, PSNR/SSIM on the bundled model

Each subcommand lives in its own module with `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help); "bench" has its own subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("imptome.demo", "compare no merging, tome and importance on a few prompts; writes a PNG grid"),
    "generate": ("imptome.generate", "generate one image per (prompt, seed); resumable, multi-process"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "speed": ("imptome.bench.speed", "denoiser step time, FLOPs and efficiency at real model sizes"),
    "quality": ("imptome.bench.quality", "accuracy, Frechet distance and PSNR/SSIM vs merge ratio"),
}


class CliError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""


def _add(subparsers: argparse._SubParsersAction, name: str, module: str, help_text: str, load: bool) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    if load:  # only the chosen subcommand's module is imported: `imptome demo` never imports the benchmarks
        importlib.import_module(module).add_arguments(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with arguments for the subcommand named in `argv` (all of them when none is named)."""
    words = [word for word in argv if not word.startswith("-")]
    chosen = words[:2] if words[:1] == ["bench"] else words[:1]
    parser = argparse.ArgumentParser(prog="imptome", description="Importance-based token merging (diffusers)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,bench}")
    for name, (module, help_text) in COMMANDS.items():
        _add(sub, name, module, help_text, load=chosen == [name])
    bench = sub.add_parser("bench", help="speed and quality benchmarks").add_subparsers(
        dest="benchmark", required=True
    )
    for name, (module, help_text) in BENCHMARKS.items():
        _add(bench, name, module, help_text, load=chosen == ["bench", name])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except CliError as error:
        print(f"imptome: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
