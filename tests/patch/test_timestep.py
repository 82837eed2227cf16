"""The host copy of a pipeline's timesteps (imptome.patch.timestep), with CPU tensors treated as if they
were on a GPU."""

from __future__ import annotations

import pytest
import torch

import imptome
from imptome.patch.api import patch_state
from imptome.patch.timestep import TimestepReader
from tests.factories import tiny_sd_pipeline


@pytest.fixture
def reader(monkeypatch):
    """A reader that copies CPU tensors too, counting its copies."""
    reader = TimestepReader(read_directly=())
    copy = reader._copy
    reader.copies = 0

    def counted(timestep):
        reader.copies += 1
        return copy(timestep)

    monkeypatch.setattr(reader, "_copy", counted)
    return reader


def test_views_of_one_schedule_are_read_from_one_copy(reader):
    timesteps = torch.tensor([999, 750, 500, 250, 1])
    assert [reader(t) for t in timesteps] == [999.0, 750.0, 500.0, 250.0, 1.0]
    expanded = [reader(t[None].expand(2)) for t in timesteps]  # PixArt's and SD3's timestep [batch]
    assert expanded == [999.0, 750.0, 500.0, 250.0, 1.0]
    assert reader.copies == 1


def test_a_write_or_a_new_schedule_is_read_again(reader):
    timesteps = torch.tensor([999.0, 500.0, 1.0])
    assert reader(timesteps[1]) == 500.0
    timesteps[1] = 400.0  # in place: the version counter moves
    assert reader(timesteps[1]) == 400.0
    timesteps.mul_(2)  # through the base: its views share the counter
    assert reader(timesteps[2]) == 2.0
    assert reader(torch.tensor([999.0, 500.0, 1.0])[1]) == 500.0  # a new schedule
    assert reader.copies == 4
    assert reader(timesteps[0]) == 1998.0  # and back: the first schedule is copied again
    assert reader.copies == 5


def test_inference_tensors_numbers_and_large_storages_are_read_directly(reader):
    with torch.inference_mode():
        timesteps = torch.tensor([999, 500])
    assert reader(timesteps[1]) == 500.0
    assert reader(42) == 42.0
    large = torch.arange(10_000.0)
    assert reader(large[7]) == 7.0
    assert reader.copies == 1  # tried for the large storage, refused


def test_a_pipeline_through_the_host_copy_makes_the_same_images(monkeypatch):
    """A whole pipeline with its timesteps read through the host copy (as on a GPU): one copy per generation
    (each sets new timesteps), and the same latents as reading every timestep directly."""

    def run(pipe) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("a red circle", num_inference_steps=5, generator=generator, output_type="latent").images

    pipe = tiny_sd_pipeline()
    imptome.apply_patch(pipe, ratio=0.7)
    direct = [run(pipe) for _ in range(2)]
    state = patch_state(pipe.unet)
    reader = TimestepReader(read_directly=())
    copy = reader._copy
    copies = []
    monkeypatch.setattr(reader, "_copy", lambda timestep: copies.append(timestep) or copy(timestep))
    state.read_timestep = reader
    through_copy = [run(pipe) for _ in range(2)]
    assert len(copies) == 2
    for got, want in zip(through_copy, direct, strict=True):
        assert torch.equal(got, want)


def test_a_tensor_that_held_two_timesteps_is_a_schedule():
    """A whole tensor (no view) written with each step's timestep in place is a schedule once it has held two
    of them; a later timestep in other memory then starts a new schedule."""
    from imptome.patch.timestep import TimestepMemory

    memory, timestep = TimestepMemory(), torch.tensor(900.0)
    assert memory(timestep, 900.0) == (None, False) and not memory.in_schedule
    assert memory(timestep, 900.0) == (True, False) and not memory.in_schedule  # the same timestep again
    timestep.fill_(700.0)
    assert memory(timestep, 700.0) == (True, False) and memory.in_schedule
    assert memory(torch.tensor(500.0), 500.0) == (False, True)
