"""Planning's shared index tensors: right values, made once per size and device, safe in every mode."""

from __future__ import annotations

import pytest
import torch

from imptome.bench.operators import OperatorCounter
from imptome.merge import cell_partition, constants
from imptome.merge.noise import random_bits, stream_id

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("grid", "sy", "sx"), [((4, 4), 2, 2), ((5, 7), 2, 2), ((7, 5), 1, 3), ((9, 8), 3, 2)]
)
def test_cell_positions_list_every_full_cell_row_major(grid, sy, sx):
    h, w = grid
    want = [
        [(cy * sy + dy) * w + cx * sx + dx for dy in range(sy) for dx in range(sx)]
        for cy in range(h // sy)
        for cx in range(w // sx)
    ]
    assert constants.cell_positions(grid, sy, sx, CPU).tolist() == want


@pytest.mark.parametrize(("grid", "sy", "sx"), [((6, 6), 2, 2), ((7, 9), 3, 2)])
def test_cell_partition_takes_the_position_its_bits_name(grid, sy, sx):
    """The destination of cell c in unit u is the cell's position bits[u, c] % (sy * sx), row-major: the
    draws of a seed are those of 0.8.2, which made the positions arithmetically at every plan."""
    units, key = 3, torch.tensor(stream_id(11))
    cells_x = grid[1] // sx
    cells = (grid[0] // sy) * cells_x
    bits = random_bits(key, (units, cells))
    want = [
        [
            (c // cells_x * sy + int(bits[u, c]) % (sy * sx) // sx) * grid[1]
            + c % cells_x * sx
            + int(bits[u, c]) % sx
            for c in range(cells)
        ]
        for u in range(units)
    ]
    assert cell_partition(units, grid, sy, sx, key).tolist() == want


def test_a_constant_is_made_once_per_size_and_device():
    first = constants.arange(1234, CPU, step=3)
    with OperatorCounter() as ops:
        again = constants.arange(1234, CPU, step=3)
    assert again is first and ops.total == 0
    assert torch.equal(first, torch.arange(0, 1234, 3))
    assert constants.arange(1234, CPU) is not first


def test_a_constant_first_made_in_inference_mode_serves_autograd_later():
    """Plans are built under torch.inference_mode in pipelines and without it in training or tests; an
    inference tensor cannot be saved for backward, so the shared ones must be normal tensors."""
    with torch.inference_mode():
        index = constants.arange(7, CPU, step=2)  # a size no other test uses: made here
    assert not index.is_inference()
    x = torch.randn(8, requires_grad=True)
    x.gather(0, index).sum().backward()
    assert x.grad.tolist() == [1.0 if i % 2 == 0 else 0.0 for i in range(8)]


def test_inside_torch_compile_constants_are_made_in_the_graph():
    """A compiled function makes its constants in its graph: no traced (fake) tensor is kept for eager
    calls. (Dynamo also ignores an lru_cache it traces into; the module's check spares it the warning.)"""
    torch._dynamo.reset()
    constants._cached.cache_clear()
    compiled = torch.compile(lambda x: x + constants.arange(5, x.device), fullgraph=True)
    assert torch.equal(compiled(torch.zeros(5, dtype=torch.int64)), torch.arange(5))
    assert constants._cached.cache_info().currsize == 0


def test_a_tracer_leaves_no_fake_constant_behind():
    """A plan traced under fake tensors (make_fx, FakeTensorMode: memory estimates, graph capture tools) makes
    its constants in the trace: a kept fake tensor would fail every later eager call of that size."""
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    key = torch.tensor(stream_id(5))
    size = (3, 37)  # a size no other test uses
    with FakeTensorMode():
        fake = constants.arange(41, CPU, step=5)
    assert type(fake) is not torch.Tensor
    make_fx(lambda k: random_bits(k, size), tracing_mode="fake")(key)
    make_fx(lambda k: cell_partition(2, (9, 7), 3, 1, k), tracing_mode="symbolic")(key)
    assert torch.equal(constants.arange(41, CPU, step=5), torch.arange(0, 41, 5))
    assert random_bits(key, size).shape == size
    assert cell_partition(2, (9, 7), 3, 1, key).shape == (2, 21)


def test_cell_positions_take_a_grid_as_a_list():
    """`cell_partition` is public and took any (h, w) sequence before its cell positions were shared."""
    listed = constants.cell_positions([4, 6], 2, 3, CPU)
    assert torch.equal(listed, constants.cell_positions((4, 6), 2, 3, CPU))
