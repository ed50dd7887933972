"""TensorRT backend (10.x and 11.x): build an engine from ONNX on the target device, cache it,
run it on slots.

Only named-tensor APIs: ``num_io_tensors``/``get_tensor_*``, ``set_input_shape``/
``set_tensor_address``/``execute_async_v3``, ``build_serialized_network``,
``set_memory_pool_limit``. No bindings API, no INT8 calibrator: INT8 comes only from explicit
Q/DQ nodes in the ONNX. Data moves through :mod:`edgead.engines.cuda_rt` (cuda-python), not pycuda.

Two build paths (:func:`typing_mode`):

- **strongly typed**, always on TensorRT 11 (which removed weak typing with ``BuilderFlag.FP16``/
  ``INT8``/..., the calibrators and ``OBEY_PRECISION_CONSTRAINTS``) and on request on 10.x: every
  precision comes from the graph's own types. FP16 is the bundle's FP16 ONNX (FP32 islands stay
  FP32 exactly), INT8 its Q/DQ ONNX. No precision flag is ever set.
- **weakly typed**, the default on 10.x (JetPack 6 ships 10.3): the same graphs, plus the flag
  10.x needs: ``FP16`` for the FP16 graph, ``FP16 + INT8`` for the Q/DQ graph (without INT8 a
  weakly typed 10.x build stops with "int8 is not configured", NVIDIA/TensorRT#4021). Only
  :func:`_weak_precision_flags` names those flags, and only this path calls it.

``tensorrt`` is imported lazily, so this module imports on machines without it.
tests/test_tensorrt_api_surface.py checks every TensorRT name used here against the stubs, and
that no name removed in TensorRT 11 is reachable on the strongly typed path.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edgead.core.engine import EngineError, TensorSpec
from edgead.engines import cuda_rt
from edgead.engines.cuda_slotted import CudaSlottedEngine

log = logging.getLogger(__name__)

BUILD_MESSAGE = "building engine (first run on this device)"
INSTALL_HINT = "TensorRT is not installed: pip install 'edgead[tensorrt]' (on Jetson it ships with JetPack)"
PRECISIONS = ("fp32", "fp16", "int8")
Shapes = Mapping[str, Sequence[int]]

_LOGGERS: dict[int, Any] = {}


class StalePlanError(EngineError):
    """A plan this TensorRT cannot deserialise (another version or GPU, or a damaged file)."""


def _trt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineError(INSTALL_HINT) from exc


def _logger(trt: Any) -> Any:
    # One ILogger per process: TensorRT warns when builder and runtime get different loggers.
    if id(trt) not in _LOGGERS:
        _LOGGERS[id(trt)] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[id(trt)]


# ---------------------------------------------------------------- cache keys
def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _shape_tag(input_shapes: Shapes | None) -> str:
    if not input_shapes:
        return "static"
    return "_".join("x".join(str(int(d)) for d in input_shapes[n]) for n in sorted(input_shapes))


def cache_key(
    onnx_sha256: str, precision: str, trt_version: str, device_name: str, compute_capability: str,
    input_shapes: Shapes | None = None, strongly_typed: bool = False,
) -> dict[str, Any]:
    """Everything an engine depends on: plans are not portable across GPUs or TensorRT versions."""
    return {
        "onnx_sha256": onnx_sha256, "precision": precision, "trt_version": str(trt_version),
        "device_name": device_name, "compute_capability": str(compute_capability),
        "input_shapes": {n: [int(d) for d in s] for n, s in sorted((input_shapes or {}).items())},
        "strongly_typed": bool(strongly_typed),
    }


def engine_cache_path(
    onnx_path: str | Path, precision: str, trt_version: str, device_name: str, compute_capability: str,
    input_shapes: Shapes | None = None, onnx_sha256: str | None = None,
) -> Path:
    """``<stem>.<precision>.trt<version>.<device>.sm<cc>.<shape>.<sha12>.engine`` beside the ONNX
    (in the spirit of jetson-inference's cache names); the full key goes in :func:`sidecar_path`."""
    onnx_path = Path(onnx_path)
    sha = onnx_sha256 or sha256_file(onnx_path)
    name = (f"{onnx_path.stem}.{precision}.trt{trt_version}.{_slug(device_name)}.sm{compute_capability}"
            f".{_shape_tag(input_shapes)}.{sha[:12]}.engine")
    return onnx_path.with_name(name)


def sidecar_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def _write_atomic(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated engine that looks valid.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------- build
def major_version(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise EngineError(f"cannot read the TensorRT version {trt.__version__!r}") from None


def typing_mode(trt: Any, strongly_typed: bool | None = None) -> bool:
    """True for a strongly typed build: always on TensorRT 11+, on request (default off) on 10.x."""
    if major_version(trt) >= 11:
        if strongly_typed is False:
            raise EngineError(f"TensorRT {trt.__version__} has no weakly typed networks; every build is "
                              "strongly typed (precision from the ONNX graph's types)")
        return True
    return bool(strongly_typed)


def build_engine(
    onnx_path: str | Path, precision: str = "fp16", workspace_bytes: int = 1 << 30,
    timing_cache_path: str | Path | None = None, *, strongly_typed: bool | None = None,
    input_shapes: Shapes | None = None,
) -> bytes:
    """Parse the ONNX and build a serialised plan.

    The ONNX is the bundle's graph of ``precision`` (FP16 graph, Q/DQ graph). ``strongly_typed``
    (None: TensorRT 11 yes, 10.x no, see :func:`typing_mode`) takes every precision from the
    graph's types; the weakly typed 10.x build adds the precision flags. No calibrator is ever
    set, so the Q/DQ scales are the only INT8 source.
    """
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    trt = _trt()
    strong = typing_mode(trt, strongly_typed)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 11 accepts and ignores STRONGLY_TYPED (strong typing is unconditional there); 10.x needs it.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)  # explicit batch is always on since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    if not parsed or parser.num_errors:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no parser message"]
        raise EngineError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    if precision == "int8" and not _has_qdq(trt, network):
        raise EngineError("int8 needs an ONNX with Q/DQ nodes (quantize_static, QDQ format); no calibrator is used")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not strong:
        _weak_precision_flags(trt, config, precision)
    _add_fixed_profile(builder, network, config, input_shapes)
    cache = _attach_timing_cache(config, timing_cache_path)  # keep alive until the build ends

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {onnx_path} at {precision} (see the TensorRT log)")
    if timing_cache_path is not None:
        _write_atomic(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))
    del cache
    return bytes(plan)


def _weak_precision_flags(trt: Any, config: Any, precision: str) -> None:
    """TensorRT 10.x weak typing only (these flags do not exist in 11): FP16 lets layers run in
    half precision; INT8 lets the Q/DQ layers run as INT8 kernels."""
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)


def _has_qdq(trt: Any, network: Any) -> bool:
    kinds = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _add_fixed_profile(builder: Any, network: Any, config: Any, input_shapes: Shapes | None) -> None:
    """Dynamic ONNX inputs get one profile with min = opt = max: the station runs one shape."""
    dynamic = [t for t in (network.get_input(i) for i in range(network.num_inputs)) if any(d < 0 for d in t.shape)]
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        shape = tuple((input_shapes or {}).get(tensor.name, ()))
        if not shape:
            raise EngineError(f"input {tensor.name!r} has a dynamic shape {tuple(tensor.shape)}: pass input_shapes")
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)


def _attach_timing_cache(config: Any, path: str | Path | None) -> Any:
    data = Path(path).read_bytes() if path is not None and Path(path).exists() else b""
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache timed on another GPU is refused, not silently reused.
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this device; starting a fresh one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


# ---------------------------------------------------------------- run
class _Component:
    """One deserialised engine with one execution context per slot: a context runs one enqueue
    at a time, so overlapping slots need their own."""

    def __init__(self, plan: bytes, num_slots: int, input_shapes: Shapes | None = None) -> None:
        trt = _trt()
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise StalePlanError("TensorRT could not deserialise the plan (another TensorRT version or GPU?)")
        self.contexts = [self.engine.create_execution_context() for _ in range(num_slots)]
        if any(c is None for c in self.contexts):
            raise EngineError("TensorRT could not create an execution context (out of device memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        dtype = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name for n in names}
        self.inputs: list[TensorSpec] = []
        for name in (n for n in names if is_input[n]):
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                shape = tuple(int(d) for d in (input_shapes or {}).get(name, ()))
                if not shape:
                    raise EngineError(f"input {name!r} is dynamic: pass input_shapes")
            for ctx in self.contexts:
                if not ctx.set_input_shape(name, shape):
                    raise EngineError(f"set_input_shape({name!r}, {shape}) was refused")
            self.inputs.append(TensorSpec(name, shape, dtype[name]))
        # Output shapes are known once every input shape is set.
        self.outputs = [TensorSpec(n, tuple(int(d) for d in self.contexts[0].get_tensor_shape(n)), dtype[n])
                        for n in names if not is_input[n]]

    def bind(self, slot: int, addresses: Mapping[str, int]) -> None:
        # Addresses stay fixed per slot, so they are set once, not per frame.
        for name, ptr in addresses.items():
            if not self.contexts[slot].set_tensor_address(name, int(ptr)):
                raise EngineError(f"set_tensor_address({name!r}) was refused")

    def launch(self, slot: int, stream_handle: int) -> None:
        if not self.contexts[slot].execute_async_v3(stream_handle):
            raise EngineError(f"execute_async_v3 failed on slot {slot} (see the TensorRT log)")

    def close(self) -> None:
        self.contexts, self.engine, self.runtime = [], None, None  # contexts before engine before runtime


class TensorRTEngine(CudaSlottedEngine):
    """The :class:`~edgead.core.engine.Engine` protocol on one TensorRT plan: per slot, async
    H2D, ``execute_async_v3``, async D2H, all on the slot's own stream."""

    backend = "tensorrt"

    def __init__(self, plan: bytes, precision: str = "fp32", num_slots: int = 2, input_shapes: Shapes | None = None) -> None:
        self.precision = precision
        self._parts: list[_Component] = []
        try:
            self._parts = [_Component(plan, int(num_slots), input_shapes)]
            self._open_slots(self._parts[0].inputs, self._parts[0].outputs, num_slots)
            for slot in range(self.num_slots):
                s = self.slots[slot]
                self._parts[0].bind(slot, {**{n: b.ptr for n, b in s.dev_in.items()},
                                           **{n: b.ptr for n, b in s.dev_out.items()}})
        except BaseException:
            self.close()
            raise

    def _launch(self, slot: int, stream_handle: int) -> None:
        for part in self._parts:  # back to back on one stream: no host round trip between them
            part.launch(slot, stream_handle)
        return None

    def _release(self) -> None:
        for part in self._parts:
            part.close()
        self._parts = []


# ---------------------------------------------------------------- cache + build
def cached_plan(
    onnx_path: str | Path, precision: str = "fp16", *, workspace_bytes: int = 1 << 30,
    input_shapes: Shapes | None = None, strongly_typed: bool | None = None,
    timing_cache_path: str | Path | None = None, rebuild: bool = False,
) -> bytes:
    """The plan for this ONNX on this GPU and TensorRT: from the cache when its key matches,
    else built (minutes on a Jetson) and cached beside the ONNX."""
    trt = _trt()
    onnx_path, dev = Path(onnx_path), cuda_rt.device_info()
    sha = sha256_file(onnx_path)
    strongly_typed = typing_mode(trt, strongly_typed)
    key = cache_key(sha, precision, trt.__version__, dev.name, dev.compute_capability, input_shapes, strongly_typed)
    path = engine_cache_path(onnx_path, precision, trt.__version__, dev.name, dev.compute_capability, input_shapes, sha)
    meta = sidecar_path(path)
    if not rebuild and path.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        return path.read_bytes()
    log.warning("%s: %s -> %s", BUILD_MESSAGE, onnx_path.name, path.name)
    if timing_cache_path is None:
        timing_cache_path = onnx_path.with_name(f"timing.trt{trt.__version__}.{_slug(dev.name)}.sm{dev.compute_capability}.cache")
    plan = build_engine(onnx_path, precision, workspace_bytes, timing_cache_path,
                        strongly_typed=strongly_typed, input_shapes=input_shapes)
    _write_atomic(path, plan)
    _write_atomic(meta, json.dumps(key, indent=1).encode())  # last: no sidecar means no valid engine
    return plan


def load_or_build(onnx_path: str | Path, precision: str = "fp16", *, num_slots: int = 2, **build: Any) -> TensorRTEngine:
    """A ready :class:`TensorRTEngine`; a cached plan that fails to deserialise is rebuilt once.

    The engine records what a device certificate is keyed by: ``plan_sha256`` (the engine
    file), ``backend_version``, ``device_name`` and ``compute_capability``."""
    try:
        plan = cached_plan(onnx_path, precision, **build)
        engine = TensorRTEngine(plan, precision, num_slots, build.get("input_shapes"))
    except StalePlanError as exc:
        if build.get("rebuild"):
            raise
        log.warning("cached engine for %s is unusable (%s); rebuilding", onnx_path, exc)
        plan = cached_plan(onnx_path, precision, **{**build, "rebuild": True})
        engine = TensorRTEngine(plan, precision, num_slots, build.get("input_shapes"))
    dev = cuda_rt.device_info()
    engine.plan_sha256 = hashlib.sha256(plan).hexdigest()
    engine.backend_version, engine.device_name, engine.compute_capability = _trt().__version__, dev.name, dev.compute_capability
    return engine
