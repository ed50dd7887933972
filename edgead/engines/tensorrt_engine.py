"""TensorRT 10 backend: build an engine from ONNX on the target device, cache it, run it on slots.

Only TensorRT 10 APIs: named I/O tensors (``num_io_tensors``/``get_tensor_*``),
``set_input_shape``/``set_tensor_address``/``execute_async_v3``, ``build_serialized_network``,
``set_memory_pool_limit``. No bindings API, no INT8 calibrator: INT8 comes only from explicit
Q/DQ nodes in the ONNX. Data moves through :mod:`edgead.engines.cuda_rt` (cuda-python), not pycuda.

``tensorrt`` is imported lazily, so this module imports on machines without it.
tests/test_tensorrt_api_surface.py checks every TensorRT name used here against the stubs.
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

from edgead.core.contract import IMAGE, OUTPUT_NAMES
from edgead.core.engine import EngineError, TensorSpec
from edgead.core.wiring import Node, WiringError, check_wiring, run_wiring
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
def build_engine(
    onnx_path: str | Path, precision: str = "fp16", workspace_bytes: int = 1 << 30,
    timing_cache_path: str | Path | None = None, *, strongly_typed: bool = False,
    input_shapes: Shapes | None = None,
) -> bytes:
    """Parse the ONNX and build a serialised plan.

    Precision: fp16 sets ``BuilderFlag.FP16``. int8 needs Q/DQ nodes in the ONNX; in a weakly
    typed TensorRT 10 network a Q/DQ graph also needs ``BuilderFlag.INT8`` (else the build stops
    with "int8 is not configured", NVIDIA/TensorRT#4021), and FP16 lets the unquantised layers
    run in half precision. No calibrator is ever set, so the Q/DQ scales are the only INT8 source.
    ``strongly_typed`` takes every precision from the graph's types and sets no precision flag
    (TensorRT rejects them there). Both flags are deprecated in 10.12 and gone in TensorRT 11.
    """
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    trt = _trt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)  # explicit batch is always on in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    if not parsed or parser.num_errors:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or ["no parser message"]
        raise EngineError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    if precision == "int8" and not _has_qdq(trt, network):
        raise EngineError("int8 needs an ONNX with Q/DQ nodes (quantize_static, QDQ format); no calibrator is used")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not strongly_typed and precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if not strongly_typed and precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    _add_fixed_profile(builder, network, config, input_shapes)
    cache = _attach_timing_cache(config, timing_cache_path)  # keep alive until the build ends

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {onnx_path} at {precision} (see the TensorRT log)")
    if timing_cache_path is not None:
        _write_atomic(Path(timing_cache_path), bytes(config.get_timing_cache().serialize()))
    del cache
    return bytes(plan)


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


class TensorRTChain(TensorRTEngine):
    """A detector's component plans run back to back on the device, following its wiring.

    ``wiring`` lists the components in order (name, inputs, outputs: the manifest's
    ``components``). Each component's inputs are bound by name to the device buffer of any
    earlier tensor (the image, or any earlier component's output: a head reads ``image`` as well
    as ``reconstruction``), through the same interpreter that runs the wiring everywhere else
    (:func:`edgead.core.wiring.run_wiring`). Only ``image`` is uploaded and only ``score`` and
    ``anomaly_map`` are downloaded; every other tensor stays on the device.
    """

    def __init__(self, plans: Mapping[str, bytes], wiring: Sequence[Node], precision: str = "fp32",
                 num_slots: int = 2) -> None:
        self.precision = precision
        self._parts, self._scratch = [], []
        missing = [n.name for n in wiring if n.name not in plans]
        if missing:
            raise EngineError(f"no TensorRT plan for component(s) {missing}")
        try:
            self._parts = [_Component(plans[n.name], int(num_slots)) for n in wiring]
            specs = self._check_wiring(wiring)
            self._open_slots([specs[IMAGE]], [specs[o] for o in OUTPUT_NAMES], num_slots)
            for slot in range(self.num_slots):
                self._bind_slot(slot, wiring)
        except BaseException:
            self.close()
            raise

    def _check_wiring(self, wiring: Sequence[Node]) -> dict[str, TensorSpec]:
        """Every tensor's spec, checking that each plan's I/O matches the wiring it is placed in."""
        try:
            check_wiring(wiring, [IMAGE], OUTPUT_NAMES)
        except WiringError as exc:
            raise EngineError(f"TensorRT chain: {exc}") from exc
        specs: dict[str, TensorSpec] = {}
        for node, part in zip(wiring, self._parts):
            declared = (sorted(node.inputs), sorted(node.outputs))
            actual = (sorted(s.name for s in part.inputs), sorted(s.name for s in part.outputs))
            if declared != actual:
                raise EngineError(f"component {node.name!r}: plan I/O {actual[0]} -> {actual[1]} does not match "
                                  f"the wiring {declared[0]} -> {declared[1]}")
            for spec in part.inputs:
                if spec.name in specs and specs[spec.name] != spec:
                    raise EngineError(f"component {node.name!r} input {spec.name!r} is {spec}, upstream wrote "
                                      f"{specs[spec.name]}")
                specs.setdefault(spec.name, spec)
            specs.update({spec.name: spec for spec in part.outputs})
        return specs

    def _bind_slot(self, slot: int, wiring: Sequence[Node]) -> None:
        s = self.slots[slot]
        downloaded = {name: buf.ptr for name, buf in s.dev_out.items()}
        parts = dict(zip((n.name for n in wiring), self._parts))

        def bind(node: Node, input_ptrs: list[int]) -> tuple[int, ...]:
            part = parts[node.name]
            out_ptrs = []
            for spec in part.outputs:
                if spec.name in downloaded:
                    out_ptrs.append(downloaded[spec.name])
                else:
                    self._scratch.append(cuda_rt.DeviceBuffer(cuda_rt.spec_nbytes(spec)))
                    out_ptrs.append(self._scratch[-1].ptr)
            part.bind(slot, {**dict(zip(node.inputs, input_ptrs)), **{sp.name: p for sp, p in zip(part.outputs, out_ptrs)}})
            by_name = dict(zip((sp.name for sp in part.outputs), out_ptrs))
            return tuple(by_name[name] for name in node.outputs)

        run_wiring(wiring, {IMAGE: s.dev_in[IMAGE].ptr}, bind)

    def _release(self) -> None:
        for buf in self._scratch:
            buf.free()
        self._scratch = []
        super()._release()


# ---------------------------------------------------------------- cache + build
def cached_plan(
    onnx_path: str | Path, precision: str = "fp16", *, workspace_bytes: int = 1 << 30,
    input_shapes: Shapes | None = None, strongly_typed: bool = False,
    timing_cache_path: str | Path | None = None, rebuild: bool = False,
) -> bytes:
    """The plan for this ONNX on this GPU and TensorRT: from the cache when its key matches,
    else built (minutes on a Jetson) and cached beside the ONNX."""
    trt = _trt()
    onnx_path, dev = Path(onnx_path), cuda_rt.device_info()
    sha = sha256_file(onnx_path)
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
    """A ready :class:`TensorRTEngine`; a cached plan that fails to deserialise is rebuilt once."""
    try:
        return TensorRTEngine(cached_plan(onnx_path, precision, **build), precision, num_slots, build.get("input_shapes"))
    except StalePlanError as exc:
        if build.get("rebuild"):
            raise
        log.warning("cached engine for %s is unusable (%s); rebuilding", onnx_path, exc)
        plan = cached_plan(onnx_path, precision, **{**build, "rebuild": True})
        return TensorRTEngine(plan, precision, num_slots, build.get("input_shapes"))
