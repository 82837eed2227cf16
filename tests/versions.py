"""Skips for tests of diffusers features that are newer than the oldest diffusers imptome supports.

CI runs the suite twice: with the newest versions (.ci/constraints.txt) and with the floors pyproject.toml
declares (.ci/constraints-min.txt). A feature the floor lacks is skipped there, with the version it needs.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from packaging.version import Version

DIFFUSERS = Version(diffusers.__version__)


def needs_diffusers(version: str, feature: str, when: bool = True) -> pytest.MarkDecorator:
    """Skip unless the installed diffusers is at least `version` (only where `when` holds)."""
    return pytest.mark.skipif(
        when and Version(version) > DIFFUSERS,
        reason=f"{feature} needs diffusers>={version}, {DIFFUSERS} is installed",
    )


def has_accelerator() -> bool:
    return torch.accelerator.current_accelerator() is not None
