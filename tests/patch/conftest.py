"""Shared fixtures of the end-to-end patch tests.

Test modules build their tiny pipelines once (module-scoped fixtures); `_pipelines_unpatched` makes every
pipeline a test uses start and end unpatched, so a failing test cannot leave a patch for the next one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from diffusers import DiffusionPipeline

import imptome
from tests.factories import tiny_sd_pipeline


@pytest.fixture(scope="module")
def sd():
    """A tiny Stable Diffusion pipeline, one per test module."""
    return tiny_sd_pipeline()


@pytest.fixture(autouse=True)
def _pipelines_unpatched(request) -> Iterator[None]:
    """Remove any patch from the test's pipeline fixtures before and after the test."""
    pipelines = []
    for name in request.fixturenames:
        if name not in ("request", "_pipelines_unpatched"):
            value = request.getfixturevalue(name)
            if isinstance(value, DiffusionPipeline):
                pipelines.append(value)
    for pipeline in pipelines:
        imptome.remove_patch(pipeline)
    yield
    for pipeline in pipelines:
        imptome.remove_patch(pipeline)
