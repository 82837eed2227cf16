"""Index tensors that depend only on sizes, made once per device and shared by every plan.

On a GPU each tensor a plan makes is a kernel launch that the host issues, and an eager step of a large model
is bound by the host, so planning takes its constant index tensors (aranges, the positions of ToMeSD's cells)
from here instead of making them anew at every step. Inside torch.compile they are made in the graph
(Inductor folds them), and while a CUDA stream is being captured into a graph they are made anew too, so no
graph's private memory is kept; so are they under a tracer's fake or proxy tensors (make_fx, FakeTensorMode),
whose tensors would fail every later call. Callers must not write into them. At most 64 are kept (about 6 per
image size and batch, a few MB at common sizes), and they outlive patches: a benchmark that patches each call
anew would otherwise make them at every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


def arange(end: int, device: torch.device, step: int = 1) -> torch.Tensor:
    """int64 [ceil(end / step)]: 0, step, 2 * step, ... below `end`."""
    return _constant(_make_arange, (end, step), device)


def cell_positions(grid: tuple[int, int], sy: int, sx: int, device: torch.device) -> torch.Tensor:
    """int64 [(h // sy) * (w // sx), sy * sx]: the token index (row-major on the h x w grid) of each position,
    row-major, inside each full sy x sx cell (cells row-major too)."""
    return _constant(_make_cell_positions, (tuple(grid), sy, sx), device)  # a list is no cache key


def _make_arange(end: int, step: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, end, step, device=device)


def _make_cell_positions(grid: tuple[int, int], sy: int, sx: int, device: torch.device) -> torch.Tensor:
    h, w = grid
    cells_y, cells_x = h // sy, w // sx
    corner = torch.arange(0, cells_y * sy * w, sy * w, device=device).view(-1, 1, 1)  # [cells_y, 1, 1]
    corner = corner + torch.arange(0, cells_x * sx, sx, device=device).view(1, -1, 1)  # [cells_y, cells_x, 1]
    inside = torch.arange(sy, device=device).view(-1, 1) * w + torch.arange(sx, device=device)  # [sy, sx]
    return (corner + inside.flatten()).view(cells_y * cells_x, sy * sx)


def _constant(make: Callable[..., torch.Tensor], args: tuple, device: torch.device) -> torch.Tensor:
    if _made_anew(device):
        return make(*args, device=device)
    return _cached(make, args, device)


_TRACER_MODES = (
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.PROXY,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
)


def _made_anew(device: torch.device) -> bool:
    """Whether a constant must not come from (nor go into) the cache: inside torch.compile or export, under a
    tracer's mode (its tensors are fake, proxied or functional, and sizes may be symbolic), or while the CUDA
    stream is being captured."""
    if torch.compiler.is_compiling():
        return True
    modes = torch._C._len_torch_dispatch_stack()  # none, as a rule: one cheap look
    if modes and any(torch._C._get_dispatch_mode(key) is not None for key in _TRACER_MODES):
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.lru_cache(maxsize=64)
def _cached(make: Callable[..., torch.Tensor], args: tuple, device: torch.device) -> torch.Tensor:
    # a normal tensor, usable inside and outside torch.inference_mode
    with torch.inference_mode(False), torch.no_grad():
        constant = make(*args, device=device)
    if device.type == "cuda":  # written by the current stream: wait once, so that any stream may read it
        torch.cuda.current_stream(device).synchronize()
    return constant
