"""A thin, typed layer over cuda-python's ``cuda.bindings.runtime``.

Shared by the TensorRT backend and the torch-CUDA verification backend, so both move data the
same way: pinned host buffers, device buffers, one non-blocking stream per slot, and events that
time H2D / compute / D2H.

``cuda.bindings.runtime`` is imported lazily (``_rt()``), so importing edgead never needs
cuda-python; the old ``cuda.cudart`` module was removed in cuda-bindings 13 and is not used.
Every runtime call returns ``(cudaError_t, *values)``; :func:`check` turns a failure into an
:class:`EngineError` naming the call. No torch here.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from edgead.core.engine import EngineError, TensorSpec

INSTALL_HINT = "cuda-python is not installed: pip install 'edgead[tensorrt]'"


def _rt() -> Any:
    """The ``cuda.bindings.runtime`` module. Looked up on each call (a dict hit once imported)
    so tests can substitute a fake through ``sys.modules``."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError as exc:
        raise EngineError(INSTALL_HINT) from exc


def check(result: Any, call: str) -> Any:
    """Unpack ``(err, *values)``: raise :class:`EngineError` naming ``call`` unless err is success.
    Returns None, the single value, or the tuple of values."""
    rt = _rt()
    err, values = (result[0], tuple(result[1:])) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = _describe(rt, err)
        raise EngineError(f"{call} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _describe(rt: Any, err: Any) -> str:
    try:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        return f"{_text(name)} ({_text(text)})"
    except Exception:  # noqa: BLE001 - the description is best effort; the call name is what matters
        return str(err)


def _text(value: Any) -> str:
    return value.decode(errors="replace").rstrip("\x00") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "87" for Orin, "90" for H100


def set_device(index: int) -> None:
    check(_rt().cudaSetDevice(int(index)), "cudaSetDevice")


def device_info(index: int | None = None) -> DeviceInfo:
    """Name and compute capability of the current (or given) GPU: part of the engine cache key."""
    rt = _rt()
    if index is None:
        index = int(check(rt.cudaGetDevice(), "cudaGetDevice"))
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    return DeviceInfo(index, _text(props.name), f"{props.major}{props.minor}")


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) seen as a numpy array, so async copies can
    really run asynchronously and callers fill it in place."""

    def __init__(self, shape: Sequence[int], dtype: str | np.dtype = "float32") -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(d) for d in shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr: int = int(check(_rt().cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost"))
        raw = (ctypes.c_uint8 * max(self.nbytes, 1)).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(self.shape)

    def free(self) -> None:
        if self.ptr:
            self.array = np.empty(0, dtype=self.dtype)  # drop the view before the memory goes
            check(_rt().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class DeviceBuffer:
    """Device memory from cudaMalloc."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr: int = int(check(_rt().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))

    def free(self) -> None:
        if self.ptr:
            check(_rt().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class Stream:
    """A non-blocking stream: it does not synchronise with the legacy default stream, so slots
    really overlap."""

    def __init__(self) -> None:
        rt = _rt()
        self.raw: Any = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def handle(self) -> int:
        """The cudaStream_t as an int, as TensorRT's execute_async_v3 and torch's ExternalStream take it."""
        return int(self.raw)

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self.raw), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.raw is not None:
            check(_rt().cudaStreamDestroy(self.raw), "cudaStreamDestroy")
            self.raw = None


class Event:
    """A timing event (created without cudaEventDisableTiming)."""

    def __init__(self) -> None:
        self.raw: Any = check(_rt().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(_rt().cudaEventRecord(self.raw, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        check(_rt().cudaEventSynchronize(self.raw), "cudaEventSynchronize")

    def elapsed_time(self, end: "Event") -> float:
        """Milliseconds from this event to ``end``; both must have completed."""
        return float(check(_rt().cudaEventElapsedTime(self.raw, end.raw), "cudaEventElapsedTime"))

    def destroy(self) -> None:
        if self.raw is not None:
            check(_rt().cudaEventDestroy(self.raw), "cudaEventDestroy")
            self.raw = None


def memcpy_htod_async(dst_device: int, src_host: int, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(dst_device, src_host, nbytes, kind, stream.raw), "cudaMemcpyAsync(HostToDevice)")


def memcpy_dtoh_async(dst_host: int, src_device: int, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst_host, src_device, nbytes, kind, stream.raw), "cudaMemcpyAsync(DeviceToHost)")


def spec_nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


STAGES = ("h2d_ms", "compute_ms", "d2h_ms")


@dataclass
class CudaSlot:
    """One in-flight frame: its own stream, pinned host in/out, device in/out and 4 events
    (before H2D, after H2D, after compute, after D2H)."""

    stream: Stream
    host_in: dict[str, PinnedBuffer] = field(default_factory=dict)
    host_out: dict[str, PinnedBuffer] = field(default_factory=dict)
    dev_in: dict[str, DeviceBuffer] = field(default_factory=dict)
    dev_out: dict[str, DeviceBuffer] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    pending: bool = False
    extra: list[Any] = field(default_factory=list)  # keeps backend objects alive until synchronize


class CudaSlots:
    """N slots for ``inputs``/``outputs``. A backend drives a slot as
    ``upload`` -> its own compute on ``slot.stream`` -> ``download`` -> ``wait``.

    ``allocate_device=False`` skips cudaMalloc: the caller passes its own device pointers
    (torch tensors' ``data_ptr()``) to upload/download.
    """

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        num_slots: int = 2,
        allocate_device: bool = True,
    ) -> None:
        self.inputs, self.outputs, self.num_slots = list(inputs), list(outputs), int(num_slots)
        self.slots: list[CudaSlot] = []
        try:
            for _ in range(self.num_slots):
                # Filled in place, so close() frees whatever exists if an allocation fails.
                s = CudaSlot(stream=Stream())
                self.slots.append(s)
                for spec in self.inputs:
                    s.host_in[spec.name] = PinnedBuffer(spec.shape, spec.dtype)
                    if allocate_device:
                        s.dev_in[spec.name] = DeviceBuffer(spec_nbytes(spec))
                for spec in self.outputs:
                    s.host_out[spec.name] = PinnedBuffer(spec.shape, spec.dtype)
                    if allocate_device:
                        s.dev_out[spec.name] = DeviceBuffer(spec_nbytes(spec))
                s.events.extend(Event() for _ in range(4))
        except BaseException:
            self.close()
            raise

    def __getitem__(self, slot: int) -> CudaSlot:
        return self.slots[slot]

    def host_inputs(self, slot: int) -> dict[str, np.ndarray]:
        return {name: buf.array for name, buf in self.slots[slot].host_in.items()}

    def fill(self, slot: int, feeds: Mapping[str, np.ndarray]) -> None:
        """Copy caller arrays into the slot's pinned inputs, checking names and shapes."""
        host = self.slots[slot].host_in
        for spec in self.inputs:
            got = None if spec.name not in feeds else tuple(np.shape(feeds[spec.name]))
            if got != spec.shape:
                raise EngineError(f"input {spec.name!r}: engine expects shape {spec.shape}, got {got}")
            np.copyto(host[spec.name].array, feeds[spec.name], casting="same_kind")

    def upload(self, slot: int, device_ptrs: Mapping[str, int] | None = None) -> None:
        """Record the start event and queue H2D of every input on the slot's stream."""
        s = self.slots[slot]
        s.events[0].record(s.stream)
        for spec in self.inputs:
            dst = device_ptrs[spec.name] if device_ptrs is not None else s.dev_in[spec.name].ptr
            host = s.host_in[spec.name]
            memcpy_htod_async(dst, host.ptr, host.nbytes, s.stream)
        s.events[1].record(s.stream)
        s.pending = True

    def download(self, slot: int, device_ptrs: Mapping[str, int] | None = None) -> None:
        """Mark the end of compute and queue D2H of every output."""
        s = self.slots[slot]
        s.events[2].record(s.stream)
        for spec in self.outputs:
            src = device_ptrs[spec.name] if device_ptrs is not None else s.dev_out[spec.name].ptr
            host = s.host_out[spec.name]
            memcpy_dtoh_async(host.ptr, src, host.nbytes, s.stream)
        s.events[3].record(s.stream)

    def wait(self, slot: int) -> dict[str, np.ndarray]:
        """Wait for the slot's stream; return copies, since the pinned buffers are reused by the
        slot's next frame."""
        s = self.slots[slot]
        if not s.pending:
            raise EngineError(f"slot {slot} was synchronised without enqueue")
        s.stream.synchronize()
        s.pending = False
        s.extra.clear()
        return {name: buf.array.copy() for name, buf in s.host_out.items()}

    def timings(self, slot: int) -> dict[str, float]:
        """h2d/compute/d2h milliseconds of the slot's last completed frame."""
        ev = self.slots[slot].events
        return {stage: ev[i].elapsed_time(ev[i + 1]) for i, stage in enumerate(STAGES)}

    def timeline(self, slot: int, origin: Event) -> tuple[float, float, float, float]:
        """The slot's 4 event times in ms since ``origin``: to measure overlap across slots."""
        ev = self.slots[slot].events
        return tuple(origin.elapsed_time(e) for e in ev)  # type: ignore[return-value]

    def close(self) -> None:
        for s in self.slots:
            if s.stream.raw is not None:
                try:
                    s.stream.synchronize()
                except EngineError:
                    pass  # still free what we can
            for buf in [*s.host_in.values(), *s.host_out.values(), *s.dev_in.values(), *s.dev_out.values()]:
                buf.free()
            for ev in s.events:
                ev.destroy()
            s.stream.destroy()
        self.slots = []
