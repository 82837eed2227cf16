"""The merge algorithm in pure torch: importance maps, partitions, matching, merge plans."""

from imptome.merge.importance import cfg_importance, guidance_importance, pool_to_grid
from imptome.merge.partition import (
    cell_partition,
    importance_partition,
    importance_pool,
    pool_size,
)
from imptome.merge.plan import DESTINATION, INDEPENDENT, MERGED, AveragingKernel, MergePlan, build_plan

__all__ = [
    "AveragingKernel",
    "DESTINATION",
    "INDEPENDENT",
    "MERGED",
    "MergePlan",
    "build_plan",
    "cell_partition",
    "cfg_importance",
    "guidance_importance",
    "importance_partition",
    "importance_pool",
    "pool_size",
    "pool_to_grid",
]
