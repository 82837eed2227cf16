"""FLOPs of a call, counted by `torch.utils.flop_counter` (deterministic, so fit for regression tests).

FlopCounterMode counts matrix products, convolutions and attention kernels. Gathers, scatters, sorts and
elementwise work count zero, so a merged model's count holds the attention it saves and the similarity
products its planning adds, not the cost of moving tokens.

PyTorch 2.13 registers no formula for the CPU flash-attention kernel that `scaled_dot_product_attention`
dispatches to on the CPU, which would make attention free there; `flop_counter()` adds it.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args: object, **kwargs: object) -> int:
    """Same count as the CUDA attention kernels: 2 * B * H * Lq * Lk * (d + d_v)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts scaled-dot-product attention on the CPU."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
