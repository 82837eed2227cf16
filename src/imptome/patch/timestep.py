"""The timestep of a denoiser call, on the host without waiting for the GPU: its value, and the memory it
lives in (which tells a new generation's schedule)."""

from __future__ import annotations

import torch

_LARGEST_COPY = 4096  # elements: a scheduler's timesteps are a few hundred at most


def same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors (or views) live in one allocation; compares addresses, so waits for nothing."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _elements_after(tensor: torch.Tensor) -> int:
    """How many elements of `tensor`'s memory lie after the last one it reads (e.g. the later timesteps of a
    schedule that a view of one timestep leaves)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    offset = int(tensor.storage_offset())  # an int for a real tensor (torch's stubs allow a SymInt)
    return tensor.untyped_storage().nbytes() // tensor.element_size() - offset - span


def _views_part_of_its_memory(tensor: torch.Tensor) -> bool:
    """Whether `tensor` reads fewer elements than its memory holds (e.g. one timestep of a schedule)."""
    return tensor.storage_offset() > 0 or _elements_after(tensor) > 0


class TimestepMemory:
    """Where the denoiser calls' timesteps live, to tell a new generation's schedule.

    Holds the last call's timestep (so no other tensor takes its address) and whether its memory is a
    schedule: the scheduler's `timesteps`, which set_timesteps makes anew for every generation. It is when
    the timestep is a view of part of it (`for t in timesteps`), or when it held two timesteps of the
    generation; a tensor made for one step (e.g. t.expand(n).to(dtype)) is neither, and neither is the
    one-element schedule of a one-step generation.
    """

    def __init__(self) -> None:
        self._last: torch.Tensor | None = None
        self._first_timestep: float | None = None
        self._is_schedule = False
        self._last_was_number = False
        # The walk through the memory: where the last call's timestep lies in it, and which way the calls
        # have moved since the walk began (+1 towards later elements, -1 towards earlier ones, 0 not yet)
        self._last_offset = 0
        self._direction = 0
        # whether the last call's timestep moved on in the walk, or against it (the walk began again)
        self.moved_on = self.walked_back = False

    @property
    def in_schedule(self) -> bool:
        """Whether the last call's timestep lives in a schedule of several timesteps."""
        return self._last is not None and self._is_schedule

    @property
    def more_to_come(self) -> bool:
        """Whether the last call's timestep lives in a schedule that holds later timesteps after it: a
        generation that ends with that call stopped before its last step."""
        if not self.in_schedule:
            return False
        assert self._last is not None  # in_schedule holds a last timestep
        return _elements_after(self._last) > 0

    def __call__(self, timestep: torch.Tensor | float, t: float) -> tuple[bool | None, bool]:
        """(whether `timestep`, of value `t`, lives in the last call's timestep memory, None when either is
        no tensor; whether it does not and the last call's was a schedule, or the last call's was a number
        and this one is part of a schedule)."""
        after_number = self._last_was_number
        self._last_was_number = not isinstance(timestep, torch.Tensor)
        if not isinstance(timestep, torch.Tensor):
            self._last, self._direction, self.moved_on, self.walked_back = None, 0, False, False
            return None, False
        same = None if self._last is None else same_memory(self._last, timestep)
        offset = int(timestep.storage_offset())
        move = (offset > self._last_offset) - (offset < self._last_offset) if same else 0
        self._last_offset = offset
        self.walked_back = move != 0 and move == -self._direction
        self.moved_on = move != 0 and not self.walked_back
        if not same or self.walked_back:  # another memory, or the walk begins again
            self._direction = 0
        elif move:
            self._direction = move
        if same:
            self._is_schedule |= t != self._first_timestep
            return True, False
        part_of_a_schedule = _views_part_of_its_memory(timestep)
        changed = (same is False and self._is_schedule) or (after_number and part_of_a_schedule)
        self._last, self._first_timestep = timestep, t
        self._is_schedule = part_of_a_schedule
        return same, changed


class TimestepReader:
    """The first element of a denoiser call's timestep, as a float.

    Pipelines pass the denoiser one element of the scheduler's `timesteps` per step (`for t in timesteps`
    yields views of that tensor), on the GPU. `float(t)` waits for every kernel queued before it, so the host
    cannot queue the next call while the GPU runs the last one. The reader copies the whole memory behind such
    a view to the host once and answers the later views of that memory from the copy, while

    - the memory is the same: the reader keeps a reference to the tensor, so no other tensor can take its
      address;
    - the dtype and device are the same;
    - nothing has written to it: the version counter, which a tensor shares with its views and every in-place
      write increments, is unchanged.

    Otherwise it reads on the device and waits: for a tensor on a device in `read_directly` (the CPU, where
    that costs nothing), for inference tensors (made under `torch.inference_mode`: they have no version
    counter), and for a timestep made anew for each call (e.g. `t.expand(n).to(dtype)`), copied each time.
    """

    def __init__(self, read_directly: tuple[str, ...] = ("cpu",)) -> None:
        self.read_directly = read_directly
        self._source: torch.Tensor | None = None
        self._version = -1
        self._host: torch.Tensor | None = None  # [storage elements] on the CPU

    def __call__(self, timestep: torch.Tensor | float) -> float:
        if not isinstance(timestep, torch.Tensor):
            return float(timestep)
        if timestep.device.type in self.read_directly or timestep.is_inference():
            return float(timestep.flatten()[0])
        if not self._holds(timestep) and not self._copy(timestep):
            return float(timestep.flatten()[0])
        assert self._host is not None  # copied by _copy, with _source, which _holds requires
        return float(self._host[timestep.storage_offset()])

    def _holds(self, timestep: torch.Tensor) -> bool:
        source = self._source
        return (
            source is not None
            and source.dtype == timestep.dtype
            and same_memory(source, timestep)
            and timestep._version == self._version
        )

    def _copy(self, timestep: torch.Tensor) -> bool:
        """Copy the memory behind `timestep` to the host (waits for the GPU); False when it is too large."""
        storage = timestep.untyped_storage()
        elements = storage.nbytes() // timestep.element_size()
        if elements > _LARGEST_COPY:
            return False
        whole = timestep.new_empty(0).set_(storage, 0, (elements,), (1,))
        self._host = whole.to("cpu", copy=True)
        self._source, self._version = timestep, timestep._version
        return True
