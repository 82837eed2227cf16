"""Reading the timestep of a denoiser call on the host without waiting for the GPU."""

from __future__ import annotations

import torch

_LARGEST_COPY = 4096  # elements: a scheduler's timesteps are a few hundred at most


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

    def __call__(self, timestep: object) -> float:
        if not isinstance(timestep, torch.Tensor):
            return float(timestep)
        if timestep.device.type in self.read_directly or timestep.is_inference():
            return float(timestep.flatten()[0])
        if not self._holds(timestep) and not self._copy(timestep):
            return float(timestep.flatten()[0])
        return float(self._host[timestep.storage_offset()])

    def _holds(self, timestep: torch.Tensor) -> bool:
        source = self._source
        return (
            source is not None
            and (source.dtype, source.device) == (timestep.dtype, timestep.device)
            and source.untyped_storage().data_ptr() == timestep.untyped_storage().data_ptr()
            and timestep._version == self._version
        )

    def _copy(self, timestep: torch.Tensor) -> bool:
        """Copy the memory behind `timestep` to the host (waits for the GPU); False when it is too large."""
        storage = timestep.untyped_storage()
        elements = storage.nbytes() // timestep.element_size()
        if elements > _LARGEST_COPY:
            return False
        whole = timestep.new_empty(0).set_(storage, 0, (elements,))
        self._host = whole.to("cpu", copy=True)
        self._source, self._version = timestep, timestep._version
        return True
