"""Contract tests of the TensorRT backend against test doubles (no GPU, no TensorRT).

- a fake ``tensorrt`` module implementing just the TensorRT 10 calls the backend makes; "building"
  wraps the ONNX bytes in a plan header and "executing" runs ONNX Runtime on them;
- a fake ``cuda.bindings.runtime``: pinned memory is real host memory, device pointers are ints
  keyed into a dict of numpy arrays, memcpy copies, and every stream logs its operations.

Both are injected through ``sys.modules``, which is where the backend's lazy imports look.
The real API names are checked separately against the TensorRT stubs (test_tensorrt_api_surface).
"""

from __future__ import annotations

import ctypes
import enum
import json
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgead.engines import cuda_rt, tensorrt_engine  # noqa: E402
from edgead.core.engine import Engine, EngineError  # noqa: E402
from edgead.core.wiring import Node  # noqa: E402
from edgead.engines.tensorrt_chain import TensorRTChain  # noqa: E402
from edgead.engines.tensorrt_engine import (  # noqa: E402
    BUILD_MESSAGE,
    TensorRTEngine,
    build_engine,
    engine_cache_path,
    load_or_build,
    sidecar_path,
)

S = 8  # image size of the tiny test models


# ============================================================== fake CUDA runtime
class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2


class _Kind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class _Handle:
    """Like cudaStream_t / cudaEvent_t: an opaque object that converts to int."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value


class FakeCudaRuntime:
    cudaError_t = _Err
    cudaMemcpyKind = _Kind
    cudaStreamNonBlocking = 1

    def __init__(self) -> None:
        self.device: dict[int, np.ndarray] = {}
        self.host: dict[int, Any] = {}
        self.log: dict[int, list[tuple[str, Any]]] = {}  # stream handle -> operations in order
        self.event_time: dict[int, float] = {}
        self.fail: set[str] = set()
        self.gpu = SimpleNamespace(name=b"Orin (nvgpu)", major=8, minor=7)
        self._next = 0x7F00_0000_0000
        self.clock = 0.0

    def _id(self, size: int = 0) -> int:
        self._next += max(size, 1) + 256
        return self._next

    def _ok(self, call: str, *values: Any) -> tuple:
        return (_Err.cudaErrorMemoryAllocation if call in self.fail else _Err.cudaSuccess, *values)

    def cudaGetErrorName(self, err: _Err) -> tuple:
        return (_Err.cudaSuccess, err.name.encode())

    def cudaGetErrorString(self, err: _Err) -> tuple:
        return (_Err.cudaSuccess, b"fake error")

    def cudaGetDevice(self) -> tuple:
        return self._ok("cudaGetDevice", 0)

    def cudaSetDevice(self, index: int) -> tuple:
        return self._ok("cudaSetDevice")

    def cudaGetDeviceProperties(self, index: int) -> tuple:
        return self._ok("cudaGetDeviceProperties", self.gpu)

    def cudaMallocHost(self, size: int) -> tuple:
        buf = (ctypes.c_uint8 * size)()
        self.host[ctypes.addressof(buf)] = buf
        return self._ok("cudaMallocHost", ctypes.addressof(buf))

    def cudaFreeHost(self, ptr: int) -> tuple:
        return (_Err.cudaSuccess,) if self.host.pop(ptr, None) is not None else (_Err.cudaErrorInvalidValue,)

    def cudaMalloc(self, size: int) -> tuple:
        if "cudaMalloc" in self.fail:
            return (_Err.cudaErrorMemoryAllocation, 0)
        ptr = self._id(size)
        self.device[ptr] = np.zeros(size, np.uint8)
        return (_Err.cudaSuccess, ptr)

    def cudaFree(self, ptr: int) -> tuple:
        return (_Err.cudaSuccess,) if self.device.pop(ptr, None) is not None else (_Err.cudaErrorInvalidValue,)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple:
        assert flags == self.cudaStreamNonBlocking, "slots must use non-blocking streams"
        handle = self._id()
        self.log[handle] = []
        return (_Err.cudaSuccess, _Handle(handle))

    def cudaStreamSynchronize(self, stream: _Handle) -> tuple:
        return (_Err.cudaSuccess,)

    def cudaStreamDestroy(self, stream: _Handle) -> tuple:
        return (_Err.cudaSuccess,)

    def cudaEventCreate(self) -> tuple:
        return (_Err.cudaSuccess, _Handle(self._id()))

    def cudaEventRecord(self, event: _Handle, stream: _Handle) -> tuple:
        self.clock += 1.0
        self.event_time[int(event)] = self.clock
        self.log[int(stream)].append(("event", int(event)))
        return (_Err.cudaSuccess,)

    def cudaEventSynchronize(self, event: _Handle) -> tuple:
        return (_Err.cudaSuccess,)

    def cudaEventElapsedTime(self, start: _Handle, end: _Handle) -> tuple:
        return (_Err.cudaSuccess, self.event_time[int(end)] - self.event_time[int(start)])

    def cudaEventDestroy(self, event: _Handle) -> tuple:
        return (_Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: _Kind, stream: _Handle) -> tuple:
        if kind == _Kind.cudaMemcpyHostToDevice and dst in self.device and count <= self.device[dst].nbytes:
            ctypes.memmove(self.device[dst].ctypes.data, src, count)
            self.log[int(stream)].append(("H2D", dst))
        elif kind == _Kind.cudaMemcpyDeviceToHost and src in self.device and count <= self.device[src].nbytes:
            ctypes.memmove(dst, self.device[src].ctypes.data, count)
            self.log[int(stream)].append(("D2H", src))
        else:
            return (_Err.cudaErrorInvalidValue,)
        return (_Err.cudaSuccess,)

    # helpers for the fake TensorRT
    def read(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.device[ptr][:n].view(dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        self.device[ptr][: raw.size] = raw


# ============================================================== fake TensorRT
class DataType(enum.IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}
_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int64)": DataType.INT64,
        "tensor(int32)": DataType.INT32, "tensor(uint8)": DataType.UINT8, "tensor(int8)": DataType.INT8}


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    INT8 = 1
    TF32 = 2


class BuilderFlag11(enum.IntEnum):
    """TensorRT 11: FP16, INT8, BF16, FP8, INT4, FP4, OBEY/PREFER_PRECISION_CONSTRAINTS are gone."""

    TF32 = 2


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class TensorIOMode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class LayerType(enum.IntEnum):
    CONVOLUTION = 0
    QUANTIZE = 32
    DEQUANTIZE = 33
    OTHER = 99


_LAYER = {"QuantizeLinear": LayerType.QUANTIZE, "DequantizeLinear": LayerType.DEQUANTIZE, "Conv": LayerType.CONVOLUTION}


class FakeTensorRT:
    """State of the fake; ``module`` is what ``import tensorrt`` returns."""

    def __init__(self, cuda: FakeCudaRuntime, version: str = "10.3.0") -> None:
        self.cuda, self.version = cuda, version
        self.major = int(version.split(".")[0])
        self.builds: list[dict[str, Any]] = []
        self.timing_cache_in: list[bytes] = []
        self.unsupported_ops: set[str] = set()
        self.fail_build = False
        self.execute_result = True
        self.contexts: list[Any] = []
        self.module = self._module()

    def _module(self) -> types.ModuleType:
        fake = self
        m = types.ModuleType("tensorrt")
        m.__version__ = self.version

        class Logger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = list(Severity)

            def __init__(self, min_severity: Severity = Severity.WARNING) -> None:
                self.min_severity = min_severity

        class Tensor:
            def __init__(self, name: str, shape: tuple[int, ...]) -> None:
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.model, self.inputs, self.layers = flags, None, [], []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

            @property
            def num_layers(self) -> int:
                return len(self.layers)

            def get_layer(self, i: int) -> Any:
                return self.layers[i]

        class ParserError:
            def __init__(self, text: str) -> None:
                self.text = text

            def __str__(self) -> str:
                return self.text

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                assert isinstance(logger, Logger)
                self.network, self.errors = network, []

            def parse_from_file(self, path: str) -> bool:
                try:
                    model = onnx.load(path)
                    onnx.checker.check_model(model)
                except Exception as exc:  # noqa: BLE001
                    self.errors.append(ParserError(f"ModelImporter.cpp: failed to parse ONNX model: {exc}"))
                    return False
                for node in model.graph.node:
                    if node.op_type in fake.unsupported_ops:
                        self.errors.append(ParserError(f"node {node.name} ({node.op_type}): No importer registered for op: {node.op_type}"))
                if self.errors:
                    return False
                inits = {i.name for i in model.graph.initializer}
                self.network.model = model
                self.network.inputs = [
                    Tensor(i.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim))
                    for i in model.graph.input if i.name not in inits
                ]
                self.network.layers = [SimpleNamespace(type=_LAYER.get(n.op_type, LayerType.OTHER)) for n in model.graph.node]
                return True

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> ParserError:
                return self.errors[i]

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = bytes(data)

            def serialize(self) -> bytes:
                return self.data

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                assert tuple(lo) == tuple(opt) == tuple(hi)
                self.shapes[name] = tuple(opt)

        class BuilderConfig:
            def __init__(self) -> None:
                self.flags: set[BuilderFlag] = set()
                self.pools: dict[MemoryPoolType, int] = {}
                self.cache: TimingCache | None = None
                self.profiles: list[Profile] = []

            def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
                self.pools[pool] = size

            def set_flag(self, flag: BuilderFlag) -> None:
                self.flags.add(flag)

            def create_timing_cache(self, data: bytes) -> TimingCache:
                return TimingCache(data)

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                assert ignore_mismatch is False
                if cache.data and not cache.data.startswith(b"FAKETC"):
                    return False  # "timed on another device"
                fake.timing_cache_in.append(cache.data)
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.cache

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Builder:
            def __init__(self, logger: Logger) -> None:
                assert isinstance(logger, Logger)

            def create_network(self, flags: int = 0) -> Network:
                return Network(flags)

            def create_builder_config(self) -> BuilderConfig:
                return BuilderConfig()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
                strongly_typed = bool(network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
                strongly_typed = strongly_typed or fake.major >= 11  # 11: every network is strongly typed
                if strongly_typed and config.flags:
                    return None  # TensorRT refuses precision flags on a strongly typed network
                fake.builds.append({"flags": set(config.flags), "strongly_typed": strongly_typed,
                                    "workspace": config.pools.get(MemoryPoolType.WORKSPACE)})
                if fake.fail_build:
                    return None
                if config.cache is not None:  # "timing" adds an entry
                    config.cache.data = b"FAKETC" + b"+" * (len(config.cache.data.removeprefix(b"FAKETC")) + 1)
                shapes = {k: list(v) for p in config.profiles for k, v in p.shapes.items()}
                header = json.dumps({"version": m.__version__, "shapes": shapes}).encode()
                return b"FAKEPLAN\n" + header + b"\n" + network.model.SerializeToString()

        class Engine:
            def __init__(self, onnx_bytes: bytes, shapes: dict[str, list[int]]) -> None:
                self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
                self.io = [(i, TensorIOMode.INPUT) for i in self.session.get_inputs()]
                self.io += [(o, TensorIOMode.OUTPUT) for o in self.session.get_outputs()]
                self.by_name = {a.name: (a, mode) for a, mode in self.io}
                self.profile_shapes = shapes

            @property
            def num_io_tensors(self) -> int:
                return len(self.io)

            def get_tensor_name(self, i: int) -> str:
                return self.io[i][0].name

            def get_tensor_mode(self, name: str) -> TensorIOMode:
                return self.by_name[name][1]

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                return tuple(d if isinstance(d, int) else -1 for d in self.by_name[name][0].shape)

            def get_tensor_dtype(self, name: str) -> DataType:
                return _ORT[self.by_name[name][0].type]

            def create_execution_context(self) -> "Context":
                ctx = Context(self)
                fake.contexts.append(ctx)
                return ctx

        class Context:
            def __init__(self, engine: Engine) -> None:
                self.engine, self.shapes, self.addresses = engine, {}, {}

            def set_input_shape(self, name: str, shape: Any) -> bool:
                declared = self.engine.get_tensor_shape(name)
                ok = len(declared) == len(shape) and all(d in (-1, s) for d, s in zip(declared, shape))
                if -1 in declared:
                    ok = ok and list(shape) == self.engine.profile_shapes.get(name)
                self.shapes[name] = tuple(shape)
                return ok

            def _feeds(self, read: Any) -> dict[str, np.ndarray]:
                return {a.name: read(a) for a, mode in self.engine.io if mode == TensorIOMode.INPUT}

            def get_tensor_shape(self, name: str) -> tuple[int, ...]:
                if self.engine.get_tensor_mode(name) == TensorIOMode.INPUT:
                    return self.shapes[name]
                zeros = self._feeds(lambda a: np.zeros(self.shapes[a.name], _NP[_ORT[a.type]]))
                return self.engine.session.run([name], zeros)[0].shape

            def set_tensor_address(self, name: str, ptr: int) -> bool:
                self.addresses[name] = ptr
                return ptr in fake.cuda.device

            def execute_async_v3(self, stream_handle: int) -> bool:
                assert isinstance(stream_handle, int)
                fake.cuda.log[stream_handle].append(("execute", id(self)))
                if not fake.execute_result or len(self.addresses) != len(self.engine.io):
                    return False
                feeds = self._feeds(lambda a: fake.cuda.read(self.addresses[a.name], self.shapes[a.name], _NP[_ORT[a.type]]))
                names = [a.name for a, mode in self.engine.io if mode == TensorIOMode.OUTPUT]
                for name, value in zip(names, self.engine.session.run(names, feeds)):
                    fake.cuda.write(self.addresses[name], value)
                return True

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                assert isinstance(logger, Logger)

            def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
                if not bytes(plan).startswith(b"FAKEPLAN\n"):
                    return None
                _, header, onnx_bytes = bytes(plan).split(b"\n", 2)
                meta = json.loads(header)
                if meta["version"] != m.__version__:
                    return None  # "Version tag does not match"
                return Engine(onnx_bytes, meta["shapes"])

        for name, value in dict(
            Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime,
            NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
            BuilderFlag=BuilderFlag11 if self.major >= 11 else BuilderFlag,
            MemoryPoolType=MemoryPoolType, TensorIOMode=TensorIOMode, DataType=DataType, LayerType=LayerType,
            nptype=lambda t: _NP[t],
        ).items():
            setattr(m, name, value)
        return m


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    cuda = FakeCudaRuntime()
    trt = FakeTensorRT(cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module)
    monkeypatch.setattr(tensorrt_engine, "_LOGGERS", {})
    return SimpleNamespace(cuda=cuda, trt=trt)


# ============================================================== tiny ONNX models
def _conv(name: str, x: str, y: str, cin: int, cout: int, seed: int) -> tuple[Any, Any]:
    w = np.random.default_rng(seed).standard_normal((cout, cin, 3, 3)).astype(np.float32) * 0.3
    return helper.make_node("Conv", [x, name + "_w"], [y], name=name, pads=[1, 1, 1, 1]), numpy_helper.from_array(w, name + "_w")


def _save(path: Path, nodes: list, inits: list, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _vi(name: str, shape: list) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def head_nodes(x: str, cin: int, seed: int) -> tuple[list, list]:
    conv, w = _conv("head", x, "anomaly_map", cin, 1, seed)
    flat = helper.make_node("Flatten", ["anomaly_map"], ["flat"], name="flat", axis=1)
    mean = helper.make_node("ReduceMean", ["flat"], ["score"], name="mean", axes=[1], keepdims=0)
    return [conv, flat, mean], [w]


def detector_onnx(path: Path, seed: int = 0, batch: int | str = 1) -> Path:
    """image (1,3,S,S) -> Conv -> Relu -> Conv -> anomaly_map (1,1,S,S); score (1,) = its mean."""
    c1, w1 = _conv("body", "image", "body_out", 3, 4, seed)
    relu = helper.make_node("Relu", ["body_out"], ["features"], name="relu")
    head, winit = head_nodes("features", 4, seed + 1)
    return _save(path, [c1, relu, *head], [w1, *winit], [_vi("image", [batch, 3, S, S])],
                 [_vi("score", [batch]), _vi("anomaly_map", [batch, 1, S, S])])


def body_onnx(path: Path, seed: int = 0) -> Path:
    c1, w1 = _conv("body", "image", "body_out", 3, 4, seed)
    relu = helper.make_node("Relu", ["body_out"], ["features"], name="relu")
    return _save(path, [c1, relu], [w1], [_vi("image", [1, 3, S, S])], [_vi("features", [1, 4, S, S])])


def head_onnx(path: Path, seed: int = 1, input_name: str = "features") -> Path:
    head, winit = head_nodes(input_name, 4, seed)
    return _save(path, head, winit, [_vi(input_name, [1, 4, S, S])], [_vi("score", [1]), _vi("anomaly_map", [1, 1, S, S])])


def qdq_onnx(path: Path) -> Path:
    """An explicitly quantised graph: Q/DQ on the input, as quantize_static (QDQ) writes them."""
    scale = numpy_helper.from_array(np.array(1 / 127, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    q = helper.make_node("QuantizeLinear", ["image", "scale", "zero"], ["image_q"], name="q")
    dq = helper.make_node("DequantizeLinear", ["image_q", "scale", "zero"], ["image_dq"], name="dq")
    head, winit = head_nodes("image_dq", 3, 0)
    return _save(path, [q, dq, *head], [scale, zero, *winit], [_vi("image", [1, 3, S, S])],
                 [_vi("score", [1]), _vi("anomaly_map", [1, 1, S, S])])


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, S, S), dtype=np.float32)


# ============================================================== build + cache
def test_first_run_builds_then_loads_from_cache(fakes, tmp_path, caplog):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    caplog.set_level("INFO")
    engine = load_or_build(onnx_path, "fp16")
    assert BUILD_MESSAGE in caplog.text
    assert len(fakes.trt.builds) == 1
    assert isinstance(engine, Engine) and engine.backend == "tensorrt"

    path = engine_cache_path(onnx_path, "fp16", "10.3.0", "Orin (nvgpu)", "87", None)
    assert path.exists() and path.parent == tmp_path
    assert path.name.startswith("det.fp16.trt10.3.0.orin-nvgpu.sm87.static.") and path.name.endswith(".engine")
    key = json.loads(sidecar_path(path).read_text())
    assert key["onnx_sha256"] == tensorrt_engine.sha256_file(onnx_path)
    assert (key["trt_version"], key["device_name"], key["compute_capability"], key["precision"]) == ("10.3.0", "Orin (nvgpu)", "87", "fp16")
    assert path.name.split(".")[-2] == key["onnx_sha256"][:12]
    engine.close()

    caplog.clear()
    again = load_or_build(onnx_path, "fp16")
    assert len(fakes.trt.builds) == 1, "a matching cached engine must not be rebuilt"
    assert BUILD_MESSAGE not in caplog.text
    np.testing.assert_array_equal(again.run({"image": image()})["score"], ort_run(onnx_path, {"image": image()})["score"])
    again.close()


def _change_onnx(fakes, path):
    detector_onnx(path, seed=5)


def _change_version(fakes, path):
    fakes.trt.module.__version__ = "10.4.0"


def _change_gpu(fakes, path):
    fakes.cuda.gpu = SimpleNamespace(name=b"NVIDIA H100 80GB HBM3", major=9, minor=0)


def _change_cc(fakes, path):
    fakes.cuda.gpu = SimpleNamespace(name=b"Orin (nvgpu)", major=8, minor=6)


@pytest.mark.parametrize("change", [_change_onnx, _change_version, _change_gpu, _change_cc], ids=["onnx", "trt", "gpu", "cc"])
def test_changed_key_rebuilds(fakes, tmp_path, caplog, change):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    load_or_build(onnx_path, "fp16").close()
    change(fakes, onnx_path)
    caplog.clear()
    caplog.set_level("INFO")
    engine = load_or_build(onnx_path, "fp16")
    assert len(fakes.trt.builds) == 2
    assert BUILD_MESSAGE in caplog.text
    np.testing.assert_allclose(engine.run({"image": image()})["anomaly_map"], ort_run(onnx_path, {"image": image()})["anomaly_map"])
    engine.close()


def test_changed_precision_rebuilds(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    load_or_build(onnx_path, "fp16").close()
    load_or_build(onnx_path, "fp32").close()
    assert len(fakes.trt.builds) == 2
    assert fakes.trt.builds[0]["flags"] == {BuilderFlag.FP16} and fakes.trt.builds[1]["flags"] == set()


def test_sidecar_key_mismatch_is_stale(fakes, tmp_path, caplog):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    load_or_build(onnx_path, "fp16").close()
    path = engine_cache_path(onnx_path, "fp16", "10.3.0", "Orin (nvgpu)", "87", None)
    key = json.loads(sidecar_path(path).read_text())
    sidecar_path(path).write_text(json.dumps({**key, "onnx_sha256": "0" * 64}))  # same name, other key
    caplog.set_level("INFO")
    load_or_build(onnx_path, "fp16").close()
    assert len(fakes.trt.builds) == 2 and BUILD_MESSAGE in caplog.text
    sidecar_path(path).unlink()  # an engine without its sidecar is not trusted either
    load_or_build(onnx_path, "fp16").close()
    assert len(fakes.trt.builds) == 3


def test_undeserialisable_cached_engine_is_rebuilt_once(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    load_or_build(onnx_path, "fp16").close()
    path = engine_cache_path(onnx_path, "fp16", "10.3.0", "Orin (nvgpu)", "87", None)
    path.write_bytes(b"garbage")
    engine = load_or_build(onnx_path, "fp16")
    assert len(fakes.trt.builds) == 2 and path.read_bytes().startswith(b"FAKEPLAN")
    engine.close()


def test_timing_cache_written_and_reused(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    cache = tmp_path / "timing.cache"
    build_engine(onnx_path, "fp16", 1 << 20, cache)
    assert fakes.trt.timing_cache_in == [b""]
    first = cache.read_bytes()
    assert first.startswith(b"FAKETC")
    build_engine(onnx_path, "fp32", 1 << 20, cache)
    assert fakes.trt.timing_cache_in[-1] == first, "the saved cache must be loaded by the next build"
    assert len(cache.read_bytes()) > len(first)
    assert fakes.trt.builds[0]["workspace"] == 1 << 20


def test_load_or_build_keeps_a_timing_cache_beside_the_onnx(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    load_or_build(onnx_path, "fp16").close()
    caches = list(tmp_path.glob("timing.trt10.3.0.orin-nvgpu.sm87.cache"))
    assert len(caches) == 1 and caches[0].read_bytes().startswith(b"FAKETC")


def test_foreign_timing_cache_is_replaced(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    build_engine(onnx_path, "fp16", 1 << 20, cache)
    assert cache.read_bytes().startswith(b"FAKETC")


def test_parser_errors_are_listed(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    fakes.trt.unsupported_ops = {"Relu", "ReduceMean"}
    with pytest.raises(EngineError) as info:
        build_engine(onnx_path, "fp16")
    message = str(info.value)
    assert "No importer registered for op: Relu" in message and "No importer registered for op: ReduceMean" in message
    assert str(onnx_path) in message


def test_unreadable_onnx_is_an_engine_error(fakes, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EngineError, match="failed to parse ONNX model"):
        load_or_build(bad, "fp16")


def test_failed_build_is_an_engine_error(fakes, tmp_path):
    fakes.trt.fail_build = True
    with pytest.raises(EngineError, match="failed to build"):
        build_engine(detector_onnx(tmp_path / "det.onnx"), "fp16")


def test_precision_flags(fakes, tmp_path):
    det, qdq = detector_onnx(tmp_path / "det.onnx"), qdq_onnx(tmp_path / "qdq.onnx")
    build_engine(det, "fp32")
    build_engine(det, "fp16")
    build_engine(qdq, "int8")
    build_engine(qdq, "int8", strongly_typed=True)
    flags = [b["flags"] for b in fakes.trt.builds]
    assert flags == [set(), {BuilderFlag.FP16}, {BuilderFlag.FP16, BuilderFlag.INT8}, set()]
    assert [b["strongly_typed"] for b in fakes.trt.builds] == [False, False, False, True]
    with pytest.raises(EngineError, match="Q/DQ"):
        build_engine(det, "int8")  # no calibrator: INT8 only from explicit Q/DQ nodes
    with pytest.raises(EngineError, match="unknown precision"):
        build_engine(det, "int4")


def test_int8_qdq_engine_matches_ort(fakes, tmp_path):
    qdq = qdq_onnx(tmp_path / "qdq.onnx")
    engine = TensorRTEngine(build_engine(qdq, "int8"), "int8")
    out = engine.run({"image": image(3)})
    np.testing.assert_array_equal(out["anomaly_map"], ort_run(qdq, {"image": image(3)})["anomaly_map"])
    engine.close()


def test_dynamic_batch_needs_input_shapes(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "dyn.onnx", batch="batch")
    with pytest.raises(EngineError, match="input_shapes"):
        build_engine(onnx_path, "fp16")
    engine = load_or_build(onnx_path, "fp16", input_shapes={"image": (1, 3, S, S)})
    assert engine.inputs[0].shape == (1, 3, S, S) and engine.outputs[1].shape == (1, 1, S, S)
    assert ".1x3x8x8." in engine_cache_path(onnx_path, "fp16", "10.3.0", "x", "87", {"image": (1, 3, S, S)}).name
    np.testing.assert_allclose(engine.run({"image": image()})["score"], ort_run(onnx_path, {"image": image()})["score"])
    engine.close()


# ============================================================== running
def test_outputs_equal_onnxruntime(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    engine = TensorRTEngine(build_engine(onnx_path, "fp32"), "fp32")
    assert [s.name for s in engine.inputs] == ["image"]
    assert {s.name: s.shape for s in engine.outputs} == {"score": (1,), "anomaly_map": (1, 1, S, S)}
    for seed in range(3):
        out, ref = engine.run({"image": image(seed)}), ort_run(onnx_path, {"image": image(seed)})
        for name in ref:
            np.testing.assert_array_equal(out[name], ref[name])
    with pytest.raises(EngineError, match="shape"):
        engine.run({"image": np.zeros((1, 3, 4, 4), np.float32)})
    engine.close()
    assert not fakes.cuda.device, "close() frees every device buffer"
    assert not fakes.cuda.host, "close() frees every pinned buffer"


def test_slot_stream_order_is_h2d_execute_d2h(fakes, tmp_path):
    engine = TensorRTEngine(build_engine(detector_onnx(tmp_path / "det.onnx"), "fp16"), "fp16")
    for slot in range(engine.num_slots):
        engine.host_inputs(slot)["image"][...] = image(slot)
        engine.enqueue(slot)
        engine.synchronize(slot)
        stream = engine._slots[slot].stream.handle
        ops = [op for op, _ in fakes.cuda.log[stream]]
        assert ops == ["event", "H2D", "event", "execute", "event", "D2H", "D2H", "event"]
        timings = engine.last_timings(slot)
        assert set(timings) == {"h2d_ms", "compute_ms", "d2h_ms"} and all(v >= 0 for v in timings.values())
    engine.close()


def test_two_slots_are_independent(fakes, tmp_path):
    onnx_path = detector_onnx(tmp_path / "det.onnx")
    engine = TensorRTEngine(build_engine(onnx_path, "fp16"), "fp16", num_slots=2)
    a, b = engine._slots[0], engine._slots[1]
    assert a.stream.handle != b.stream.handle
    ptrs = [buf.ptr for s in (a, b) for buf in [*s.dev_in.values(), *s.dev_out.values(), *s.host_in.values(), *s.host_out.values()]]
    assert len(set(ptrs)) == len(ptrs), "slots share a buffer"
    ctx0, ctx1 = engine._parts[0].contexts
    assert ctx0 is not ctx1 and set(ctx0.addresses.values()).isdisjoint(ctx1.addresses.values())

    # Pipelined like the runtime: slot 1 is enqueued before slot 0 is collected.
    frames = [image(i) for i in range(6)]
    results = {}
    engine.host_inputs(0)["image"][...] = frames[0]
    engine.enqueue(0)
    for i in range(1, len(frames)):
        slot = i % 2
        engine.host_inputs(slot)["image"][...] = frames[i]
        engine.enqueue(slot)
        results[i - 1] = engine.synchronize(1 - slot)
    results[len(frames) - 1] = engine.synchronize((len(frames) - 1) % 2)
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(results[i]["score"], ort_run(onnx_path, {"image": frame})["score"])
    for slot, ctx in enumerate((ctx0, ctx1)):  # each slot's stream ran its own context
        executed = {who for op, who in fakes.cuda.log[engine._slots[slot].stream.handle] if op == "execute"}
        assert executed == {id(ctx)}
    engine.close()


def test_results_survive_the_next_frame_on_the_slot(fakes, tmp_path):
    engine = TensorRTEngine(build_engine(detector_onnx(tmp_path / "det.onnx"), "fp16"), "fp16")
    first = engine.run({"image": image(0)})
    kept = first["anomaly_map"].copy()
    engine.run({"image": image(1)})
    np.testing.assert_array_equal(first["anomaly_map"], kept)
    engine.close()


def test_execute_failure_is_an_engine_error(fakes, tmp_path):
    engine = TensorRTEngine(build_engine(detector_onnx(tmp_path / "det.onnx"), "fp16"), "fp16")
    fakes.trt.execute_result = False
    with pytest.raises(EngineError, match="execute_async_v3"):
        engine.run({"image": image()})
    fakes.trt.execute_result = True
    assert engine.run({"image": image()})["score"].shape == (1,), "the slot stays usable after a failure"
    with pytest.raises(EngineError, match="without enqueue"):
        engine.synchronize(1)
    engine.close()


def test_chain_runs_on_device_with_one_upload_and_one_download(fakes, tmp_path):
    full = detector_onnx(tmp_path / "full.onnx", seed=0)
    body = body_onnx(tmp_path / "body.onnx", seed=0)
    head = head_onnx(tmp_path / "head.onnx", seed=1)
    plans = {"body": build_engine(body, "fp16"), "head": build_engine(head, "fp16")}
    wiring = [Node("body", ("image",), ("features",)), Node("head", ("features",), ("score", "anomaly_map"))]
    chain = TensorRTChain(plans, wiring, precision="fp16")
    assert isinstance(chain, Engine)
    assert [s.name for s in chain.inputs] == ["image"] and [s.name for s in chain.outputs] == ["score", "anomaly_map"]

    out = chain.run({"image": image(7)})
    log = fakes.cuda.log[chain._slots[0].stream.handle]
    transfers = [(op, ptr) for op, ptr in log if op in ("H2D", "D2H")]
    s0 = chain._slots[0]
    assert transfers == [("H2D", s0.dev_in["image"].ptr), ("D2H", s0.dev_out["score"].ptr), ("D2H", s0.dev_out["anomaly_map"].ptr)]
    assert [op for op, _ in log if op != "event"] == ["H2D", "execute", "execute", "D2H", "D2H"]
    body_ctx, head_ctx = chain._parts[0].contexts[0], chain._parts[1].contexts[0]
    assert body_ctx.addresses["features"] == head_ctx.addresses["features"], "the intermediate stays on the device"

    ref = ort_run(full, {"image": image(7)})
    np.testing.assert_allclose(out["anomaly_map"], ref["anomaly_map"], rtol=1e-6, atol=1e-6)
    # ... and the same as running the two components separately with a host round trip
    body_engine, head_engine = TensorRTEngine(plans["body"]), TensorRTEngine(plans["head"])
    separate = head_engine.run({"features": body_engine.run({"image": image(7)})["features"]})
    for name in ("score", "anomaly_map"):
        np.testing.assert_array_equal(out[name], separate[name])
    for engine in (chain, body_engine, head_engine):
        engine.close()
    assert not fakes.cuda.device


def test_chain_rejects_unmatched_wiring(fakes, tmp_path):
    body = build_engine(body_onnx(tmp_path / "body.onnx"), "fp16")
    head = build_engine(head_onnx(tmp_path / "head.onnx", input_name="head_in"), "fp16")
    wiring = [Node("body", ("image",), ("features",)), Node("head", ("head_in",), ("score", "anomaly_map"))]
    with pytest.raises(EngineError, match="head_in"):
        TensorRTChain({"body": body, "head": head}, wiring)  # nobody writes "head_in"
    wrong = [Node("body", ("image",), ("features",)), Node("head", ("features",), ("score", "anomaly_map"))]
    with pytest.raises(EngineError, match="does not match the wiring"):
        TensorRTChain({"body": body, "head": head}, wrong)  # the plan reads head_in, the wiring says features


# ============================================================== missing packages and CUDA errors
def test_missing_tensorrt_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EngineError, match=r"pip install 'edgead\[tensorrt\]'"):
        build_engine(tmp_path / "x.onnx", "fp16")


def test_missing_cuda_python_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    with pytest.raises(EngineError, match=r"cuda-python is not installed: pip install 'edgead\[tensorrt\]'"):
        cuda_rt.Stream()


def test_cuda_errors_name_the_call(fakes, tmp_path):
    fakes.cuda.fail = {"cudaMalloc"}
    with pytest.raises(EngineError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cuda_rt.DeviceBuffer(16)
    plan = build_engine(detector_onnx(tmp_path / "det.onnx"), "fp16")
    with pytest.raises(EngineError, match="cudaMalloc"):
        TensorRTEngine(plan)
    assert not fakes.cuda.host and not fakes.cuda.device, "a failed construction frees what it allocated"


def test_pinned_buffer_is_a_numpy_view(fakes):
    buf = cuda_rt.PinnedBuffer((2, 3), "float32")
    buf.array[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = (ctypes.c_float * 6).from_address(buf.ptr)
    assert list(raw) == [0, 1, 2, 3, 4, 5]
    buf.free()
    assert not fakes.cuda.host


def test_importing_the_backends_needs_neither_tensorrt_nor_cuda_nor_torch():
    code = (
        "import sys\n"
        "sys.modules['tensorrt'] = None; sys.modules['cuda.bindings.runtime'] = None; sys.modules['torch'] = None\n"
        "import edgead.engines.tensorrt_engine, edgead.engines.cuda_rt, edgead.engines.cuda_slotted\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
