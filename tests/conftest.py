"""Test-suite settings: one intra-op thread.

Every test runs tiny models, which gain nothing from threads; on a 2-core machine shared with other jobs,
two threads per op made the end-to-end tests 10-60x slower (e.g. a 3-step AnimateDiff call went from
0.8 s to 8-50 s). Subprocesses started by tests inherit OMP_NUM_THREADS.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
