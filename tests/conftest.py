"""Test-suite settings: one intra-op thread; the `interrupt_writes` fixture.

Every test runs tiny models, which gain nothing from threads; on a 2-core machine shared with other jobs,
two threads per op made the end-to-end tests 10-60x slower (e.g. a 3-step AnimateDiff call went from
0.8 s to 8-50 s). Subprocesses started by tests inherit OMP_NUM_THREADS.
"""

import builtins
import io
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


class _CutWrites:
    """A file opened for writing that keeps half of its first write and then raises KeyboardInterrupt, as a
    Ctrl-C while the file is written would."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise KeyboardInterrupt

    def __getattr__(self, name: str):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self._file.close()


@pytest.fixture
def interrupt_writes(monkeypatch):
    """`interrupt_writes(*paths)`: from then on, writing a file at one of `paths`, or beside it with a longer
    name (`q.json.tmp`), stops halfway with KeyboardInterrupt (through `open`, which pathlib and PIL use)."""

    def interrupt(*paths: Path) -> None:
        targets = [Path(path).resolve() for path in paths]
        real_open = builtins.open

        def opening(file, mode="r", *args, **kwargs):
            opened = real_open(file, mode, *args, **kwargs)
            if not isinstance(file, str | os.PathLike) or not set(mode) & set("wax"):
                return opened
            path = Path(file).resolve()
            if any(path.parent == t.parent and path.name.startswith(t.name) for t in targets):
                return _CutWrites(opened)
            return opened

        monkeypatch.setattr(builtins, "open", opening)
        monkeypatch.setattr(io, "open", opening)

    return interrupt
