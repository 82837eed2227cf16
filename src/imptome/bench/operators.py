"""Tensor operators per call: what the host issues, counted (deterministic, so fit for regression tests).

On a GPU every operator that is not a view is a kernel launch or an allocation that the host issues, and a
large model's eager step is often bound by the host issuing them. A merging method's own operators then cost
wall time even when their kernels are short: their count is the device-independent measure of that cost.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# A view in all but name: reshape's copy-free result (reshape itself is a view op)
_METADATA_ONLY = {torch.ops.aten._unsafe_view}


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it that do work: views and metadata changes left out.

    Attributes:
        names: operator name (e.g. "bmm", "index_select") -> how many times it ran.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return self.names.total()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in _METADATA_ONLY:
            self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
