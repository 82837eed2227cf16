"""Counter-based random numbers for partitions: a hash of (key, element index) in plain integer tensor ops.

Unlike a `torch.Generator`, this has no state: the draws of a plan depend only on its key (derived from the
seed, the denoiser call within the generation and the grid or layer) and not on what was drawn before. So
`torch.compile` can trace it (Dynamo cannot trace generator draws), a key held in a device tensor changes
every step without recompiling, and the same key gives the same bits on every device.

The hash is a 32-bit integer mixer (xorshift-multiply rounds with multipliers below 2**31, so every
product of a 32-bit value fits in int64 without overflow). It is a bijection on 32-bit values: the bits of
one key's elements are all distinct, so ranking them has no ties.
"""

from __future__ import annotations

import math
from typing import overload

import torch

from imptome.merge import constants

_MASK = 0xFFFFFFFF


@overload
def mix32(x: torch.Tensor) -> torch.Tensor: ...


@overload
def mix32(x: int) -> int: ...


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """Bijective 32-bit mixer, for int64 tensors holding values in [0, 2**32) and for Python ints."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK
    return x ^ (x >> 15)


def stream_id(*parts: int) -> int:
    """A 32-bit constant naming one stream from non-negative ints (e.g. seed, grid, layer).

    Plain integer arithmetic, so torch.compile folds it into a constant while tracing."""
    value = 0x9E3779B9
    for part in parts:
        chunks = 0
        while True:  # 32 bits at a time, so large seeds keep all their bits
            value = mix32(value ^ (part & _MASK))
            chunks += 1
            part >>= 32
            if not part:
                break
        value = mix32(value ^ chunks)  # ends the part: (2**32,) is not (0, 1)
    return value


def random_bits(key: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """int64 [*shape] of distinct pseudo-random 32-bit values for `key`, a 0-d int64 tensor holding a
    32-bit hash (e.g. from `stream_id`; keys of different streams should differ in many bits).

    Element i (row-major) holds mix32(i ^ key); no host synchronisation.
    """
    return mix32(constants.arange(math.prod(shape), key.device).view(shape) ^ key)
