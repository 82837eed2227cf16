"""A slow, loop-by-loop reading of the method (the partition and matching `MergeConfig` and
`build_plan` document), for checking the fast tensor code against."""

from __future__ import annotations

import math

import torch

from imptome.merge import DESTINATION, INDEPENDENT, MERGED


def reference_plan(
    features: torch.Tensor,
    dst: list[int],
    num_remove: int,
    in_pool: list[bool] | None,
) -> tuple[list[int], list[int]]:
    """One unit: returns (receiver, roles) per token, where receiver is the token index whose output it gets.

    features [N, C]; dst the destination token indices; in_pool per token (None = everything is in the pool).
    """
    num_tokens = features.shape[0]
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    sources = [i for i in range(num_tokens) if i not in set(dst)]
    candidates = []  # (score, order, source, best destination)
    for order, s in enumerate(sources):
        sims = [float(unit[s] @ unit[d]) for d in dst]
        best = max(range(len(dst)), key=lambda j: (sims[j], -j))
        score = math.inf if in_pool is not None and not in_pool[s] else sims[best]
        candidates.append((score, order, s, dst[best]))
    candidates.sort(key=lambda c: (-c[0], c[1]))
    receiver = list(range(num_tokens))
    roles = [INDEPENDENT] * num_tokens
    for d in dst:
        roles[d] = DESTINATION
    for _, _, s, d in candidates[:num_remove]:
        receiver[s] = d
        roles[s] = MERGED
    return receiver, roles
