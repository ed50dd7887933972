"""OpenVINO backend (``--backend openvino``, extra ``edgead[openvino]``): the bundle's ONNX graphs
compiled for this CPU by OpenVINO's CPU plugin. No torch.

* Precisions: ``fp32``; ``int8`` from the very Q/DQ graph ONNX Runtime and TensorRT run (OpenVINO
  turns Q/DQ pairs into INT8 kernels, on AMD as on Intel); ``fp16`` only where the CPU computes in
  FP16 (``OPTIMIZATION_CAPABILITIES`` lists FP16: AVX512-FP16, AMX-FP16, ARM), else refused,
  since it would silently run as FP32.
* ``bf16``: the FP32 graph at BF16 inference precision, where the CPU computes BF16 (AVX512-BF16,
  AMX-BF16), with its FP32 islands (``/fp32_`` scopes and the reductions the FP16 export keeps FP32)
  marked ``precise`` so the plugin keeps them f32. The compiled model is then read back: an island
  op that still runs in BF16 makes the graph refused (:class:`IslandInBf16`), never silently
  reduced. A bundle's fused detector runs as a chain of its components
  (:mod:`edgead.engines.openvino_chain`), each in BF16 where its islands hold, else FP32.
* The inference precision is explicit (``INFERENCE_PRECISION_HINT``): on a CPU with BF16 the plugin
  would otherwise pick BF16 for an FP32 graph. FP32 and the float parts of INT8 run f32.
* ``PERFORMANCE_HINT`` LATENCY (one stream, batch 1) and ``INFERENCE_NUM_THREADS``.
* Compiled-model cache (``CACHE_DIR``) beside the ONNX, one folder per key, named like the TensorRT
  cache: ``<stem>.ov<version>.<device>.<isa>.<threads>.<sha12>.ovcache``; its key (ONNX SHA-256,
  OpenVINO version, CPU and ISA, precision, threads) is written beside it as JSON.
* Slots: one infer request per slot; ``enqueue`` starts it asynchronously, ``synchronize`` waits.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import html
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgead.core import machine
from edgead.core.contract import FP32_SCOPE
from edgead.core.engine import EngineError, SlottedEngine, TensorSpec

# edgead precision -> OpenVINO inference precision of the float parts
INFERENCE_PRECISION = {"fp32": "f32", "int8": "f32", "fp16": "f16", "bf16": "bf16"}
# The ONNX op types edgead.export.fp16.FP32_OPS keeps FP32, as OpenVINO's ONNX frontend names them
# (a test checks that every one is mapped).
FP32_OPS_OV = {"ReduceMean": "ReduceMean", "ReduceSum": "ReduceSum", "ReduceSumSquare": "ReduceSum",
               "ReduceL1": "ReduceL1", "ReduceL2": "ReduceL2", "ReduceLogSumExp": "ReduceSum",
               "ReduceMax": "ReduceMax", "ReduceMin": "ReduceMin", "ReduceProd": "ReduceProd", "Pow": "Power",
               "Sqrt": "Sqrt", "TopK": "TopK", "Softmax": "Softmax", "LogSoftmax": "LogSoftmax",
               "InstanceNormalization": "MVN", "GroupNormalization": "GroupNormalization",
               "LayerNormalization": "MVN", "Exp": "Exp", "Log": "Log"}
_ISLAND_TYPES = set(FP32_OPS_OV.values())
_NOT_COMPUTE = {"Parameter", "Constant", "Result"}
PRECISE = "precise"  # OpenVINO's runtime attribute that keeps a node out of reduced inference precision
_PRECISE_KEY = "DisablePrecisionConversion_0"  # how the attribute reads back in rt_info
_LAYER = re.compile(r'<layer id="\d+" name="([^"]*)".*?</layer>', re.S)

_OV_TYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32", "i8": "int8",
             "u8": "uint8", "boolean": "bool"}


class IslandInBf16(EngineError):
    """OpenVINO would run an FP32 island of the graph in BF16."""


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
    name = (f"{onnx_path.stem}.ov{version}.{key['precision']}.{_slug(key['cpu'])}.{isa}.t{key['threads']}"
            f".{key['onnx_sha256'][:12]}.ovcache")
    return onnx_path.with_name(name)


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def thread_signal_stack_kept() -> Iterator[None]:
    """Give the calling thread its own alternate signal stack back after OpenVINO's CPU plugin.

    Compiling a model installs an alternate signal stack on the compiling thread and leaves it
    there. On a CPU with AMX, a later SIGINT or SIGTERM on that thread then killed the process with
    SIGSEGV: the kernel could not write the signal frame (si_code SI_KERNEL), so Ctrl-C lost the
    run's summary. Linux only; elsewhere nothing is changed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _SignalStack()
        ok = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    except (OSError, AttributeError):  # not Linux/glibc: nothing to restore
        ok = False
    try:
        yield
    finally:
        if ok:
            libc.sigaltstack(ctypes.byref(saved), None)


def island_ops(model: Any) -> list[str]:
    """Friendly names of the compute ops of an OpenVINO model that must stay FP32."""
    return sorted({op.get_friendly_name() for op in model.get_ops() if op.get_type_name() not in _NOT_COMPUTE
                   and (FP32_SCOPE in op.get_friendly_name() or op.get_type_name() in _ISLAND_TYPES)})


def _mark_precise(layer: re.Match[str], names: set[str]) -> str:
    text = layer.group(0)
    if html.unescape(layer.group(1)) not in names:
        return text
    attribute = f'<attribute name="{PRECISE}" version="0" />'
    if "<rt_info>" in text:
        return text.replace("<rt_info>", f"<rt_info>{attribute}", 1)
    return text.replace("</layer>", f"<rt_info>{attribute}</rt_info></layer>")


def with_precise_islands(ov: Any, core: Any, onnx_path: Path) -> tuple[Any, list[str]]:
    """The graph as an OpenVINO model whose FP32 islands carry the ``precise`` attribute.

    The Python API cannot attach that attribute, so the model goes through OpenVINO's own IR in a
    private folder, the attribute is written into the islands' layers, and the IR is read back."""
    model = core.read_model(str(onnx_path))
    names = island_ops(model)
    with tempfile.TemporaryDirectory(prefix="edgead-ov-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        xml.write_text(_LAYER.sub(lambda m: _mark_precise(m, set(names)), xml.read_text()))
        marked = core.read_model(str(xml))
        marked.get_ops()  # the weights are read now, while the folder exists
        unmarked = [op.get_friendly_name() for op in marked.get_ops()
                    if op.get_friendly_name() in names and _PRECISE_KEY not in op.get_rt_info()]
        if unmarked:
            raise IslandInBf16(f"{onnx_path.name}: OpenVINO {ov.get_version()} dropped the {PRECISE!r} attribute of "
                               f"FP32 island op(s) {unmarked[:3]}; use --precision fp32")
        return marked, names


def islands_in_bf16(compiled: Any, model: Any, islands: list[str]) -> list[str]:
    """The executed ops of ``compiled`` that run in BF16 but may not: those built from an island op,
    and those whose origin the plugin renamed (a fusion that may have swallowed one: the kNN
    search's MatMul comes back as a FullyConnected named after a Multiply it created). An op the
    plugin split off one of the graph's own ops keeps that op's name as a prefix
    (``/candidates/MatMul/transpose_a``); it is allowed when that op is."""
    allowed = {op.get_friendly_name() for op in model.get_ops()} - set(islands)
    offending = []
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if str(rt["runtimePrecision"].astype(str)) != "bf16":
            continue
        origins = {n for n in str(rt["originalLayersNames"].astype(str)).split(",") if n}
        # a reorder has no origin: a conversion, not a computation
        if not all(_split_off(n, allowed) for n in origins):
            offending.append(f"{op.get_friendly_name()} ({rt['layerType'].astype(str)})")
    return offending


def _split_off(origin: str, allowed: set[str]) -> bool:
    """``origin`` is an ``allowed`` op (a graph op outside the islands), or a piece the plugin split off one."""
    return origin in allowed or origin.rsplit("/", 1)[0] in allowed


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
        with thread_signal_stack_kept():  # the plugin leaves its own on this thread (see there)
            self._open(onnx_path, precision, threads, num_slots, cache, device)

    def _open(self, onnx_path: str | Path, precision: str, threads: int | None, num_slots: int, cache: bool,
              device: str) -> None:
        ov = _ov()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: no such ONNX file")
        if precision not in INFERENCE_PRECISION:
            raise EngineError(f"unknown precision {precision!r}; OpenVINO runs {', '.join(INFERENCE_PRECISION)}")
        self.precision, self.num_slots, self.threads = precision, int(num_slots), threads
        self.fp32_islands: list[str] = []
        self.backend_version = ov.get_version()
        core = ov.Core()
        self.device_name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        caps = [str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES")]
        if precision == "fp16" and "FP16" not in caps:
            raise EngineError(f"OpenVINO's {device} plugin computes no FP16 on this {self.device_name} (capabilities: "
                              f"{', '.join(caps)}): an FP16 graph would run as FP32; use fp32 or int8")
        if precision == "bf16" and "BF16" not in caps:
            raise EngineError(f"OpenVINO's {device} plugin computes no BF16 on this {self.device_name} (capabilities: "
                              f"{', '.join(caps)}): it would emulate it, slower than FP32; use fp32 or int8")
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
        self.compiled = self._compile(ov, core, device, config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what the plugin chose: f32, bf16...
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        super().__init__([_spec(p) for p in self.compiled.inputs], [_spec(p) for p in self.compiled.outputs])
        self._requests = [self.compiled.create_infer_request() for _ in range(self.num_slots)]
        self._sync = self.compiled.create_infer_request()
        self._started = [False] * self.num_slots

    def _compile(self, ov: Any, core: Any, device: str, config: dict[str, Any]) -> Any:
        """The compiled model; at bf16 with its FP32 islands marked and checked after compilation."""
        try:
            if self.precision != "bf16":
                return core.compile_model(str(self.path), device, config)
            model, islands = with_precise_islands(ov, core, self.path)
            compiled = core.compile_model(model, device, config)
        except IslandInBf16:
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise EngineError(f"{self.path}: OpenVINO could not compile the graph: {exc}") from exc
        offending = islands_in_bf16(compiled, model, islands)
        if offending:
            raise IslandInBf16(f"{self.path.name}: OpenVINO runs FP32 island op(s) {offending[:3]} in BF16 "
                               f"({len(offending)} in all); this graph can only run at fp32 on OpenVINO")
        self.fp32_islands = islands
        return compiled

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
