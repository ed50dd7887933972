"""The station's inference engines behind one protocol (:mod:`edgead.core.engine`).

Torch-free (import-linter checks it): backends are imported only when opened, so a station with
onnxruntime alone never loads TensorRT. The PyTorch reference engines live with training
(:mod:`edgead.training.reference`), because they import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgead.core import machine
from edgead.core.bundle import ENGINE_ONLY_PRECISIONS, FUSED, Bundle, BundleError, load_bundle
from edgead.core.engine import Engine, EngineError, SlottedEngine, TensorSpec

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# Precisions computed by one backend from another precision's graph (edgead.core.bundle.ENGINE_ONLY_PRECISIONS)
BACKEND_PRECISIONS = {"bf16": "openvino"}

__all__ = ["BACKENDS", "BundleError", "Engine", "EngineError", "SlottedEngine", "TensorSpec", "available_backends",
           "engine_precisions", "open_engine", "resolve_graph"]


def engine_precisions(bundle: Bundle, backend: str, graph: str = FUSED) -> list[str]:
    """The precisions ``backend`` can run of ``graph`` here: the bundle's graphs, plus OpenVINO's BF16
    of the FP32 graph where this CPU computes BF16."""
    found = bundle.precisions(graph)
    extra = [p for p, b in BACKEND_PRECISIONS.items()
             if b == backend and ENGINE_ONLY_PRECISIONS[p] in found and machine.has_native_bf16()]
    return found + extra


def resolve_graph(bundle_or_path: Bundle | str | Path, precision: str = "fp32", graph: str = FUSED,
                  verify: bool = True) -> tuple[Bundle | None, Path]:
    """(bundle or None, ONNX file) for a bundle (object or folder) or a bare ``.onnx`` file."""
    if isinstance(bundle_or_path, Bundle):
        return bundle_or_path, bundle_or_path.graph_path(graph, precision)
    path = Path(bundle_or_path)
    if path.is_file() and path.suffix == ".onnx":
        return None, path
    bundle = load_bundle(path, verify=verify)
    return bundle, bundle.graph_path(graph, precision)


def open_engine(bundle_or_path: Bundle | str | Path, backend: str = "onnxruntime", precision: str = "fp32",
                graph: str = FUSED, **kw: Any) -> Engine:
    """Open ``graph`` at ``precision`` of a bundle on ``backend``.

    * ``onnxruntime``: kw go to :class:`~edgead.engines.ort_engine.OrtEngine` (``providers``,
      ``intra_op_num_threads``...).
    * ``openvino``: :class:`~edgead.engines.openvino_engine.OpenVinoEngine` on this CPU; kw
      ``threads`` (or ``intra_op_num_threads``), ``cache``, ``num_slots``. ``bf16`` of a bundle's
      fused graph: :class:`~edgead.engines.openvino_chain.OpenVinoChain` of its components.
    * ``tensorrt``: builds (or loads the cached) plan of the precision's ONNX on this GPU via
      ``tensorrt_engine.load_or_build``; kw go to it.

    ``verify=False`` skips the SHA-256 check of a bundle folder (it is on by default).
    """
    verify = bool(kw.pop("verify", True))
    if precision in BACKEND_PRECISIONS and backend != BACKEND_PRECISIONS[precision]:
        raise EngineError(f"precision {precision} runs on --backend {BACKEND_PRECISIONS[precision]} only, not {backend}")
    bundle, path = resolve_graph(bundle_or_path, precision, graph, verify)
    if backend == "tensorrt" and precision == "int8" and bundle is not None:
        layout = bundle.manifest.get("quantization", {}).get("int8", {}).get("layout", "tensorrt")
        if layout != "tensorrt":  # int32 bias DequantizeLinear: TensorRT's parser rejects it
            raise EngineError(f"{bundle.root}: its INT8 graphs have the {layout!r} Q/DQ layout (ONNX Runtime, "
                              "OpenVINO); for TensorRT re-export with `edgead export --int8-layout tensorrt`")
    if backend == "onnxruntime":
        from edgead.engines.ort_engine import OrtEngine

        return OrtEngine(path, precision=precision, **kw)
    if backend == "openvino":
        from edgead.engines.openvino_engine import OpenVinoEngine

        if "intra_op_num_threads" in kw:  # the runtime's thread option, whatever the backend
            kw["threads"] = kw.pop("intra_op_num_threads")
        if precision == "bf16" and bundle is not None and graph == FUSED and bundle.manifest.get("components"):
            from edgead.engines.openvino_chain import OpenVinoChain

            return OpenVinoChain(bundle, precision, **kw)
        return OpenVinoEngine(path, precision=precision, **kw)
    if backend == "tensorrt":
        try:
            from edgead.engines.tensorrt_engine import load_or_build
        except ImportError as exc:
            raise EngineError(f"TensorRT backend unavailable: {exc}") from exc
        return load_or_build(path, precision, **kw)
    raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Backends that can run here (without building anything)."""
    import importlib.util

    found = ["onnxruntime"] if importlib.util.find_spec("onnxruntime") else []
    if importlib.util.find_spec("openvino"):
        found.append("openvino")
    if importlib.util.find_spec("tensorrt") and importlib.util.find_spec("cuda"):
        found.append("tensorrt")
    return found

