"""Shared fixtures of the end-to-end patch tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import imptome
from tests.factories import tiny_sd_pipeline


@pytest.fixture(scope="module")
def _sd_module():
    return tiny_sd_pipeline()


@pytest.fixture
def sd(_sd_module) -> Iterator:
    """A tiny Stable Diffusion pipeline (one per test module), unpatched before and after each test."""
    imptome.remove_patch(_sd_module)
    yield _sd_module
    imptome.remove_patch(_sd_module)
