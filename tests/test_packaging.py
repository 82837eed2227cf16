"""Packaging: declared dependency floors are versions CI runs, and the wheel declares every data file."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# Only the torch 2.13.0 CPU wheel can be installed on CI machines; torch's floor is what the GPU runs used.
FLOOR_NOT_INSTALLABLE = {"torch"}


def pins(path: Path) -> dict[str, Version]:
    """name -> version of each `name==version` line of a constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.partition("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(requirement.name)] = Version(spec.version)
    return out


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


@pytest.mark.parametrize("requirement", runtime_requirements(), ids=str)
def test_each_floor_is_pinned_for_the_oldest_versions_run(requirement):
    (spec,) = requirement.specifier  # one lower bound per dependency, nothing else
    assert spec.operator == ">=", f"{requirement}: declare a floor (>=) only"
    name, floor = canonicalize_name(requirement.name), Version(spec.version)
    pinned = pins(ROOT / ".ci/constraints-min.txt")[name]
    if name in FLOOR_NOT_INSTALLABLE:
        assert pinned >= floor
    else:
        assert pinned == floor, f"{requirement} but .ci/constraints-min.txt runs {name}=={pinned}"


@pytest.mark.parametrize("requirement", runtime_requirements(), ids=str)
def test_the_newest_versions_run_satisfy_the_requirements(requirement):
    pinned = pins(ROOT / ".ci/constraints.txt")[canonicalize_name(requirement.name)]
    assert requirement.specifier.contains(pinned), f".ci/constraints.txt pins {pinned}, outside {requirement}"


def test_every_data_file_of_the_package_is_declared_package_data():
    """A file of src/imptome that is not Python reaches a wheel only through package-data (the model card
    was missing from 0.6.6's wheel); the license file is declared too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["imptome"]
    package = ROOT / "src" / "imptome"
    data = {
        path
        for path in package.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    declared = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    assert data and not data - declared, sorted(data - declared)
    assert project["project"]["license-files"] == ["LICENSE"] and (ROOT / "LICENSE").is_file()
