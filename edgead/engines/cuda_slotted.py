"""The Engine protocol on CUDA slots, written once for every CUDA backend.

A slot is one frame in flight with its own stream, pinned host buffers, device buffers and
events (:class:`~edgead.engines.cuda_rt.CudaSlots`). ``enqueue`` queues, on the slot's stream:
the H2D copies, the backend's compute (:meth:`CudaSlottedEngine._launch`), the D2H copies; it
returns at once. ``synchronize`` waits for that stream only, so with two slots frame N+1's upload
overlaps frame N's compute. TensorRT and the torch-CUDA verification engine differ only in
``_launch`` (and where their device tensors live).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgead.core.engine import TensorSpec
from edgead.engines import cuda_rt


class CudaSlottedEngine:
    """Base of the CUDA backends. Subclasses call :meth:`_open_slots` and implement
    :meth:`_launch`; they may override :meth:`_input_pointers` and :meth:`_release`."""

    backend = "cuda"
    precision = "fp32"
    num_slots = 2
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    _slots: cuda_rt.CudaSlots | None = None

    def _open_slots(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], num_slots: int,
                    allocate_device: bool = True) -> None:
        self.inputs, self.outputs, self.num_slots = list(inputs), list(outputs), int(num_slots)
        self._slots = cuda_rt.CudaSlots(self.inputs, self.outputs, self.num_slots, allocate_device=allocate_device)

    # -- what a backend supplies ----------------------------------------------------------------
    def _input_pointers(self, slot: int) -> Mapping[str, int] | None:
        """Device addresses the inputs are uploaded to (None: the slot's own device buffers)."""
        return None

    def _launch(self, slot: int, stream_handle: int) -> Mapping[str, int] | None:
        """Queue the compute of ``slot`` on its stream; returns the device addresses of the
        outputs to download (None: the slot's own device buffers)."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the backend holds beyond the slots (contexts, scratch buffers)."""

    # -- the Engine protocol --------------------------------------------------------------------
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.slots.fill(0, feeds)
        self.enqueue(0)
        return self.synchronize(0)

    @property
    def slots(self) -> cuda_rt.CudaSlots:
        if self._slots is None:
            from edgead.core.engine import EngineError

            raise EngineError(f"{self.backend} engine is closed")
        return self._slots

    def host_inputs(self, slot: int) -> dict[str, np.ndarray]:
        return self.slots.host_inputs(slot)

    def enqueue(self, slot: int) -> None:
        slots = self.slots
        slots.upload(slot, self._input_pointers(slot))
        try:
            outputs = self._launch(slot, slots[slot].stream.handle)
        except Exception:
            slots.wait(slot)  # drain the queued upload; the slot stays usable
            raise
        slots.download(slot, outputs)

    def synchronize(self, slot: int) -> dict[str, np.ndarray]:
        return self.slots.wait(slot)

    def last_timings(self, slot: int = 0) -> dict[str, float]:
        """h2d/compute/d2h ms of the slot's last synchronised frame, from CUDA events."""
        return self.slots.timings(slot)

    def timeline(self, slot: int, origin: cuda_rt.Event) -> tuple[float, float, float, float]:
        return self.slots.timeline(slot, origin)

    def close(self) -> None:
        if self._slots is not None:
            self._slots.close()  # waits for the streams before anything is freed
            self._slots = None
        self._release()
