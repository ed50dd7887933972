"""The TensorRT backend under TensorRT 11, against the test double of test_tensorrt_contract.

The double's 11.x module has no ``BuilderFlag.FP16``/``INT8`` (nor the other removed flags) and
makes every network strongly typed, as TensorRT 11 does; a build that touched a removed flag
would raise AttributeError. FP16 comes from an FP16-typed ONNX (as the bundle's
``detector.fp16.onnx``, made by onnxconverter-common with FP32 I/O), INT8 from a Q/DQ ONNX.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")

import test_tensorrt_contract as double  # noqa: E402  (the sibling test module: its fakes and tiny graphs)

from edgead.core.engine import EngineError  # noqa: E402
from edgead.engines import tensorrt_engine  # noqa: E402
from edgead.engines.tensorrt_engine import (  # noqa: E402
    build_engine,
    engine_cache_path,
    load_or_build,
    sidecar_path,
    typing_mode,
)


@pytest.fixture
def fakes11(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    cuda = double.FakeCudaRuntime()
    trt = double.FakeTensorRT(cuda, version="11.4.1")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module)
    monkeypatch.setattr(tensorrt_engine, "_LOGGERS", {})
    return SimpleNamespace(cuda=cuda, trt=trt)


def fp16_onnx(tmp_path: Path) -> Path:
    """An FP16-typed graph with FP32 inputs and outputs, made by the exporter's own FP16 pass."""
    from edgead.export.fp16 import export_fp16

    path = tmp_path / "det.fp16.onnx"
    export_fp16(double.detector_onnx(tmp_path / "det.fp32.onnx"), path)
    return path


def test_the_double_has_no_weak_typing_flags(fakes11):
    flags = fakes11.trt.module.BuilderFlag
    for removed in ("FP16", "INT8", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS"):
        assert not hasattr(flags, removed)


def test_every_precision_builds_strongly_typed_without_flags(fakes11, tmp_path):
    fp32, half, qdq = double.detector_onnx(tmp_path / "det.onnx"), fp16_onnx(tmp_path), double.qdq_onnx(tmp_path / "q.onnx")
    for path, precision in ((fp32, "fp32"), (half, "fp16"), (qdq, "int8")):
        engine = tensorrt_engine.TensorRTEngine(build_engine(path, precision), precision)
        feeds = {"image": double.image(4)}
        np.testing.assert_array_equal(engine.run(feeds)["anomaly_map"], double.ort_run(path, feeds)["anomaly_map"])
        engine.close()
    assert [b["strongly_typed"] for b in fakes11.trt.builds] == [True, True, True]
    assert [b["flags"] for b in fakes11.trt.builds] == [set(), set(), set()]


def test_fp16_engine_keeps_the_graphs_types(fakes11, tmp_path):
    half = fp16_onnx(tmp_path)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(str(half)).graph.initializer)
    engine = load_or_build(half, "fp16")
    out = engine.run({"image": double.image(2)})
    assert out["anomaly_map"].dtype == np.float32  # FP32 I/O around FP16 layers
    ref = double.ort_run(double.detector_onnx(tmp_path / "ref.onnx"), {"image": double.image(2)})
    np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], rtol=2e-2, atol=2e-2)
    engine.close()


def test_weak_typing_is_refused_and_int8_needs_qdq(fakes11, tmp_path):
    det = double.detector_onnx(tmp_path / "det.onnx")
    with pytest.raises(EngineError, match="no weakly typed networks"):
        build_engine(det, "fp16", strongly_typed=False)
    with pytest.raises(EngineError, match="Q/DQ"):
        build_engine(det, "int8")
    assert typing_mode(fakes11.trt.module) is True


def test_cache_is_keyed_by_version_and_typing(fakes11, tmp_path):
    qdq = double.qdq_onnx(tmp_path / "q.onnx")
    engine = load_or_build(qdq, "int8")
    path = engine_cache_path(qdq, "int8", "11.4.1", "Orin (nvgpu)", "87", None)
    assert path.is_file() and "trt11.4.1" in path.name
    assert json.loads(sidecar_path(path).read_text())["strongly_typed"] is True
    # what a device certificate is keyed by
    assert engine.backend_version == "11.4.1" and engine.device_name == "Orin (nvgpu)"
    assert engine.compute_capability == "87" and len(engine.plan_sha256) == 64
    engine.close()
    again = load_or_build(qdq, "int8")
    assert len(fakes11.trt.builds) == 1 and again.plan_sha256 == engine.plan_sha256
    again.close()


def test_tensorrt10_keeps_its_flags_and_can_opt_in_to_strong_typing(tmp_path, monkeypatch):
    cuda = double.FakeCudaRuntime()
    trt = double.FakeTensorRT(cuda, version="10.3.0")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module)
    half, qdq = fp16_onnx(tmp_path), double.qdq_onnx(tmp_path / "q.onnx")
    build_engine(half, "fp16")
    build_engine(qdq, "int8")
    build_engine(half, "fp16", strongly_typed=True)
    assert [b["flags"] for b in trt.builds] == [{double.BuilderFlag.FP16},
                                                {double.BuilderFlag.FP16, double.BuilderFlag.INT8}, set()]
    assert [b["strongly_typed"] for b in trt.builds] == [False, False, True]
