"""The TensorRT backend against an asynchronous CUDA double (no GPU, no TensorRT).

The double of test_tensorrt_contract runs every copy and every ``execute_async_v3`` at once, so a
missing ``cudaStreamSynchronize`` would go unnoticed there. This one queues them per stream, as a
GPU does, and runs a stream's queue only when that stream is synchronised:

- a result read before its stream is synchronised is stale (what the host buffer held before);
- freeing memory (device or pinned) that queued work still reads or writes is recorded as a
  violation, as a use-after-free on a GPU would corrupt or crash.
"""

from __future__ import annotations

import ctypes
import sys
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edgead.engines import cuda_rt, tensorrt_engine  # noqa: E402
from edgead.engines.tensorrt_engine import TensorRTEngine, build_engine  # noqa: E402
from test_tensorrt_contract import FakeCudaRuntime, FakeTensorRT, _Err, _Kind, detector_onnx, image, ort_run  # noqa: E402


class AsyncCudaRuntime(FakeCudaRuntime):
    """Copies (and, through :class:`AsyncTensorRT`, kernels) wait in their stream's queue."""

    def __init__(self) -> None:
        super().__init__()
        self.queues: dict[int, list[tuple[Callable[[], Any], frozenset[int]]]] = {}
        self.violations: list[str] = []

    def defer(self, stream: int, work: Callable[[], Any], pointers: set[int]) -> None:
        self.queues.setdefault(int(stream), []).append((work, frozenset(pointers)))

    def queued(self, ptr: int | None = None) -> int:
        return sum(1 for q in self.queues.values() for _, ptrs in q if ptr is None or ptr in ptrs)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: _Kind, stream: Any) -> tuple:
        if kind == _Kind.cudaMemcpyHostToDevice:
            ok = dst in self.device and count <= self.device[dst].nbytes
        else:
            ok = src in self.device and count <= self.device[src].nbytes
        if not ok:
            return (_Err.cudaErrorInvalidValue,)
        run = super().cudaMemcpyAsync
        self.defer(int(stream), lambda: run(dst, src, count, kind, stream), {dst, src})
        return (_Err.cudaSuccess,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple:
        for work, _ in self.queues.pop(int(stream), []):
            work()
        return (_Err.cudaSuccess,)

    def _free(self, ptr: int, call: str) -> None:
        if self.queued(ptr):
            self.violations.append(f"{call}({ptr:#x}) with {self.queued(ptr)} queued operation(s) using it")

    def cudaFree(self, ptr: int) -> tuple:
        self._free(ptr, "cudaFree")
        return super().cudaFree(ptr)

    def cudaFreeHost(self, ptr: int) -> tuple:
        self._free(ptr, "cudaFreeHost")
        return super().cudaFreeHost(ptr)


class AsyncTensorRT(FakeTensorRT):
    """``execute_async_v3`` queues the kernel on the stream instead of running it."""

    def _module(self):
        m = super()._module()
        cuda = self.cuda
        deserialize = m.Runtime.deserialize_cuda_engine

        def deserialize_async(runtime, plan):
            engine = deserialize(runtime, plan)
            if engine is None:
                return None
            create = engine.create_execution_context

            def create_async():
                ctx = create()
                run_now = ctx.execute_async_v3

                def execute_async_v3(stream_handle: int) -> bool:
                    cuda.defer(stream_handle, lambda: run_now(stream_handle), set(ctx.addresses.values()))
                    return True

                ctx.execute_async_v3 = execute_async_v3
                return ctx

            engine.create_execution_context = create_async
            return engine

        m.Runtime.deserialize_cuda_engine = deserialize_async
        return m


@pytest.fixture
def fakes(monkeypatch):
    cuda = AsyncCudaRuntime()
    trt = AsyncTensorRT(cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module)
    monkeypatch.setattr(tensorrt_engine, "_LOGGERS", {})
    return SimpleNamespace(cuda=cuda, trt=trt)


def test_the_double_queues_until_the_stream_is_synchronised(fakes):
    """The double itself: nothing moves before synchronize, and a free under queued work is caught."""
    host = cuda_rt.PinnedBuffer((4,), "float32")
    dev = cuda_rt.DeviceBuffer(16)
    stream = cuda_rt.Stream()
    host.array[...] = [1, 2, 3, 4]
    cuda_rt.memcpy_htod_async(dev.ptr, host.ptr, 16, stream)
    assert not fakes.cuda.device[dev.ptr].any() and fakes.cuda.queued() == 1
    stream.synchronize()
    np.testing.assert_array_equal(fakes.cuda.device[dev.ptr].view(np.float32), [1, 2, 3, 4])
    cuda_rt.memcpy_dtoh_async(host.ptr, dev.ptr, 16, stream)
    dev.free()
    assert fakes.cuda.violations and "cudaFree" in fakes.cuda.violations[0]
    host.free()
    stream.destroy()


def test_results_are_read_only_after_the_stream_is_synchronised(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    engine = TensorRTEngine(build_engine(onnx_path, "fp16"), "fp16", num_slots=2)
    frames = [image(i) for i in range(6)]
    results = {}
    engine.host_inputs(0)["image"][...] = frames[0]
    engine.enqueue(0)
    stale = engine.slots[0].host_out["score"].array.copy()  # read before synchronize: nothing there yet
    for i in range(1, len(frames)):  # pipelined like the runtime: the next slot queued first
        slot = i % 2
        engine.host_inputs(slot)["image"][...] = frames[i]
        engine.enqueue(slot)
        assert fakes.cuda.queued() > 0
        results[i - 1] = engine.synchronize(1 - slot)
    results[len(frames) - 1] = engine.synchronize((len(frames) - 1) % 2)
    assert not stale.any()
    for i, frame in enumerate(frames):
        ref = ort_run(onnx_path, {"image": frame})
        np.testing.assert_array_equal(results[i]["score"], ref["score"])
        np.testing.assert_array_equal(results[i]["anomaly_map"], ref["anomaly_map"])
    assert fakes.cuda.queued() == 0
    engine.close()
    assert not fakes.cuda.violations and not fakes.cuda.device and not fakes.cuda.host


def test_run_returns_this_frames_result_not_the_previous_one(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    engine = TensorRTEngine(build_engine(onnx_path, "fp16"), "fp16", num_slots=1)
    for i in range(3):
        out = engine.run({"image": image(i)})
        np.testing.assert_array_equal(out["anomaly_map"], ort_run(onnx_path, {"image": image(i)})["anomaly_map"])
    engine.close()


def test_close_with_work_queued_waits_before_freeing(fakes, tmp_path):
    engine = TensorRTEngine(build_engine(detector_onnx(tmp_path / "det.onnx"), "fp16"), "fp16", num_slots=2)
    for slot in (0, 1):
        engine.host_inputs(slot)["image"][...] = image(slot)
        engine.enqueue(slot)  # never synchronised: a station stopping mid-frame
    assert fakes.cuda.queued() > 0
    engine.close()
    assert fakes.cuda.violations == [], fakes.cuda.violations
    assert fakes.cuda.queued() == 0 and not fakes.cuda.device and not fakes.cuda.host
