"""GPU checks of the CUDA slot machinery through TorchCudaEngine (marker ``gpu``).

They need torch with CUDA, a GPU and cuda-python, and skip cleanly otherwise (always in CI).
TorchCudaEngine moves data with the same CudaSlots code as the TensorRT engine, so these check
on a real GPU: pinned memory, cudaMemcpyAsync into torch storage, compute on the slot's stream
through ExternalStream, event timings, and two slots in flight.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")

from torch import nn  # noqa: E402

from edgead.engines import cuda_rt  # noqa: E402
from edgead.core.engine import Engine, EngineError, TensorSpec  # noqa: E402
from edgead.training.reference import TorchCudaEngine  # noqa: E402

S = 64


class TinyDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1), nn.Sigmoid())

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly_map = (image - self.body(image)).abs().mean(dim=1, keepdim=True)
        return anomaly_map.flatten(1).mean(dim=1), anomaly_map


SPECS_IN = [TensorSpec("image", (1, 3, S, S))]
SPECS_OUT = [TensorSpec("score", (1,)), TensorSpec("anomaly_map", (1, 1, S, S))]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return TinyDetector().cuda().eval()


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, S, S), dtype=np.float32)


def reference(model: nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        score, anomaly_map = model(torch.from_numpy(x).cuda())
    return {"score": score.cpu().numpy(), "anomaly_map": anomaly_map.cpu().numpy()}


def test_one_slot_equals_torch(model):
    engine = TorchCudaEngine(model, SPECS_IN, SPECS_OUT, num_slots=1)
    assert isinstance(engine, Engine)
    for seed in range(3):
        out, ref = engine.run({"image": frame(seed)}), reference(model, frame(seed))
        for name in ref:
            np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-6)
    timings = engine.last_timings(0)
    assert set(timings) == {"h2d_ms", "compute_ms", "d2h_ms"} and all(v >= 0 for v in timings.values())
    engine.close()


def test_two_slots_in_flight_equal_torch(model):
    engine = TorchCudaEngine(model, SPECS_IN, SPECS_OUT, num_slots=2)
    frames = [frame(i) for i in range(10)]
    results = {}
    engine.host_inputs(0)["image"][...] = frames[0]
    engine.enqueue(0)
    for i in range(1, len(frames)):  # frame i uploads while frame i-1 may still compute
        slot = i % 2
        engine.host_inputs(slot)["image"][...] = frames[i]
        engine.enqueue(slot)
        results[i - 1] = engine.synchronize(1 - slot)
    results[len(frames) - 1] = engine.synchronize((len(frames) - 1) % 2)
    for i, x in enumerate(frames):
        ref = reference(model, x)
        np.testing.assert_allclose(results[i]["anomaly_map"], ref["anomaly_map"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(results[i]["score"], ref["score"], rtol=1e-5, atol=1e-6)
    assert engine._slots[0].stream.handle != engine._slots[1].stream.handle
    engine.close()


def test_cuda_graph_slots_equal_torch(model):
    engine = TorchCudaEngine(model, SPECS_IN, SPECS_OUT, num_slots=2, cuda_graph=True)
    frames = [frame(i) for i in range(4)]
    for i in range(0, 4, 2):  # both slots in flight, each replaying its own graph
        for slot in (0, 1):
            engine.host_inputs(slot)["image"][...] = frames[i + slot]
            engine.enqueue(slot)
        for slot in (0, 1):
            out, ref = engine.synchronize(slot), reference(model, frames[i + slot])
            np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], rtol=1e-5, atol=1e-6)
    engine.close()


def test_synchronize_without_enqueue_is_an_error(model):
    engine = TorchCudaEngine(model, SPECS_IN, SPECS_OUT, num_slots=2)
    with pytest.raises(EngineError):
        engine.synchronize(1)
    engine.close()


def test_cuda_rt_round_trip():
    """Pinned -> device -> pinned through cuda-python alone."""
    spec = TensorSpec("x", (4, 5))
    src, dst = cuda_rt.PinnedBuffer(spec.shape), cuda_rt.PinnedBuffer(spec.shape)
    dev, stream = cuda_rt.DeviceBuffer(cuda_rt.spec_nbytes(spec)), cuda_rt.Stream()
    src.array[...] = np.arange(20, dtype=np.float32).reshape(4, 5)
    cuda_rt.memcpy_htod_async(dev.ptr, src.ptr, src.nbytes, stream)
    cuda_rt.memcpy_dtoh_async(dst.ptr, dev.ptr, dst.nbytes, stream)
    stream.synchronize()
    np.testing.assert_array_equal(dst.array, src.array)
    info = cuda_rt.device_info()
    assert info.name and info.compute_capability.isdigit()
    for resource in (src, dst, dev):
        resource.free()
    stream.destroy()


def test_benchmark_script_runs(tmp_path):
    from benchmarks import gpu_stream_check

    out = tmp_path / "gpu_stream.json"
    assert gpu_stream_check.main(["--size", str(S), "--frames", "20", "--warmup", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["outputs_match_torch"] and set(report["results"]) == {"serial", "overlapped"}
    assert report["results"]["overlapped"]["fps"] > 0
    assert gpu_stream_check.main(["--size", str(S), "--frames", "20", "--warmup", "3", "--cuda-graph", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["cuda_graph"] is True
