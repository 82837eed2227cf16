"""The `imptome` command, and `python -m imptome` (so `accelerate launch -m imptome ...` works)."""

import sys


def run() -> int:
    """The command line, loaded inside the handler of a Ctrl-C: one pressed while it loads (a fraction of a
    second) ends the command as one pressed later does, with a one-line message instead of a traceback."""
    try:
        from imptome.cli import main
    except KeyboardInterrupt:
        print("\nimptome: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
