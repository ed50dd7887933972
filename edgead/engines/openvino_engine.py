"""OpenVINO backend (``--backend openvino``, extra ``edgead[openvino]``): the bundle's ONNX graphs
compiled for this CPU by OpenVINO's CPU plugin. No torch.

* Precisions: ``fp32``; ``int8`` from the very Q/DQ graph ONNX Runtime and TensorRT run (OpenVINO
  turns Q/DQ pairs into INT8 kernels, on AMD as on Intel); ``fp16`` only where the CPU computes in
  FP16 (``OPTIMIZATION_CAPABILITIES`` lists FP16: AVX512-FP16, AMX-FP16, ARM), else refused,
  since it would silently run as FP32.
* The inference precision is explicit (``INFERENCE_PRECISION_HINT``): on a CPU with BF16 the plugin
  would otherwise pick BF16 for an FP32 graph. FP32 and the float parts of INT8 run f32.
* ``PERFORMANCE_HINT`` LATENCY (one stream, batch 1) and ``INFERENCE_NUM_THREADS``.
* Compiled-model cache (``CACHE_DIR``) beside the ONNX, one folder per key, named like the TensorRT
  cache: ``<stem>.ov<version>.<device>.<isa>.<threads>.<sha12>.ovcache``; its key (ONNX SHA-256,
  OpenVINO version, CPU and ISA, precision, threads) is written beside it as JSON.
* Slots: one infer request per slot; ``enqueue`` starts it asynchronously, ``synchronize`` waits.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgead.core import machine
from edgead.core.engine import EngineError, SlottedEngine, TensorSpec

# edgead precision -> OpenVINO inference precision of the float parts
INFERENCE_PRECISION = {"fp32": "f32", "int8": "f32", "fp16": "f16"}
_OV_TYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32", "i8": "int8",
             "u8": "uint8", "boolean": "bool"}


def _ov() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise EngineError("OpenVINO backend unavailable: pip install 'edgead[openvino]' (the openvino wheel)") from exc
    return openvino


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def cache_key(onnx_sha256: str, precision: str, version: str, threads: int | None, device: str = "CPU") -> dict[str, Any]:
    """Everything a compiled model depends on (OpenVINO keys its own blobs too; this names the folder)."""
    info = machine.describe()
    return {"onnx_sha256": onnx_sha256, "precision": precision, "inference_precision": INFERENCE_PRECISION[precision],
            "openvino_version": version, "device": device, "cpu": info["cpu"],
            "isa": sorted(f for f, on in info["isa"].items() if on), "threads": threads or 0,
            "performance_hint": "LATENCY"}


def cache_dir(onnx_path: Path, key: dict[str, Any]) -> Path:
    isa = hashlib.sha256(" ".join(key["isa"]).encode()).hexdigest()[:6]
    version = key["openvino_version"].split("-")[0]
    name = (f"{onnx_path.stem}.ov{version}.{_slug(key['cpu'])}.{isa}.t{key['threads']}"
            f".{key['onnx_sha256'][:12]}.ovcache")
    return onnx_path.with_name(name)


def _spec(port: Any) -> TensorSpec:
    shape = port.get_partial_shape()
    if shape.is_dynamic:
        raise EngineError(f"tensor {port.any_name!r} has a dynamic shape {shape}; edgead graphs are static")
    dtype = _OV_TYPES.get(port.get_element_type().get_type_name(), port.get_element_type().get_type_name())
    return TensorSpec(port.any_name, tuple(int(d) for d in port.get_shape()), dtype)


class OpenVinoEngine(SlottedEngine):
    """The Engine protocol over an ONNX file compiled by OpenVINO for the CPU."""

    backend = "openvino"

    def __init__(self, onnx_path: str | Path, precision: str = "fp32", threads: int | None = None,
                 num_slots: int = 2, cache: bool = True, device: str = "CPU") -> None:
        ov = _ov()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: no such ONNX file")
        if precision not in INFERENCE_PRECISION:
            raise EngineError(f"unknown precision {precision!r}; OpenVINO runs {', '.join(INFERENCE_PRECISION)}")
        self.precision, self.num_slots, self.threads = precision, int(num_slots), threads
        self.backend_version = ov.get_version()
        core = ov.Core()
        self.device_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        caps = [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
        if precision == "fp16" and "FP16" not in caps:
            raise EngineError(f"OpenVINO's {device} plugin computes no FP16 on this {self.device_name} (capabilities: "
                              f"{', '.join(caps)}): an FP16 graph would run as FP32; use fp32 or int8")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY",
                                  "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.cache_path: Path | None = None
        if cache:
            key = cache_key(hashlib.sha256(self.path.read_bytes()).hexdigest(), precision, self.backend_version,
                            threads, device)
            self.cache_path = cache_dir(self.path, key)
            try:
                self.cache_path.mkdir(exist_ok=True)
                self.cache_path.with_name(self.cache_path.name + ".json").write_text(json.dumps(key, indent=2) + "\n")
                config["CACHE_DIR"] = str(self.cache_path)
            except OSError:  # a read-only bundle folder: compile every time rather than fail
                self.cache_path = None
        try:
            self.compiled = core.compile_model(str(self.path), device, config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise EngineError(f"{self.path}: OpenVINO could not compile the graph: {exc}") from exc
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin chose: f32, bf16...
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        super().__init__([_spec(p) for p in self.compiled.inputs], [_spec(p) for p in self.compiled.outputs])
        self._requests = [self.compiled.create_infer_request() for _ in range(self.num_slots)]
        self._sync = self.compiled.create_infer_request()
        self._started = [False] * self.num_slots

    def _outputs(self, request: Any) -> dict[str, np.ndarray]:
        # copies: the request's output tensors are overwritten by its next inference
        return {spec.name: np.array(request.get_tensor(spec.name).data, copy=True) for spec in self.outputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            self._sync.infer({s.name: np.ascontiguousarray(feeds[s.name], dtype=s.dtype) for s in self.inputs})
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self.path.name}: OpenVINO inference failed: {exc}") from exc
        return self._outputs(self._sync)

    def enqueue(self, slot: int) -> None:
        request, host = self._requests[slot], self._host[slot]
        try:
            request.start_async({s.name: host[s.name] for s in self.inputs})
            self._started[slot], self._errors[slot] = True, None
        except Exception as exc:  # noqa: BLE001 - reported at synchronize, as the slot protocol says
            self._started[slot], self._errors[slot] = False, exc

    def synchronize(self, slot: int) -> dict[str, np.ndarray]:
        error, started = self._errors[slot], self._started[slot]
        self._errors[slot], self._started[slot] = None, False
        if error is not None:
            raise EngineError(f"openvino engine failed: {error}") from error
        if not started:
            raise EngineError(f"slot {slot} was synchronised without enqueue")
        try:
            self._requests[slot].wait()
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"openvino engine failed: {exc}") from exc
        return self._outputs(self._requests[slot])

    def close(self) -> None:
        self._requests, self._sync, self.compiled = [], None, None  # type: ignore[assignment]
