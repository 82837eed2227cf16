"""One intra-op thread for the end-to-end patch tests.

The tiny pipelines gain nothing from threads, and on a CPU shared with other jobs two threads per op made
them 10-60x slower (thread contention), e.g. a 3-step AnimateDiff call went from 0.8 s to 8-50 s.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
