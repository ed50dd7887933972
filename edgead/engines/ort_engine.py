"""ONNX Runtime backend: one ``InferenceSession`` over one ONNX file. No torch.

Providers: ``"cpu"`` (default), ``"cuda"`` / ``"tensorrt"`` where onnxruntime-gpu offers them,
or ``"auto"`` (TensorRT > CUDA > CPU, whatever is available). The CPU provider is always kept
as the last fallback, as ONNX Runtime recommends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgead.core.engine import EngineError, SlottedEngine, TensorSpec

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a base dependency
        raise EngineError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def resolve_providers(providers: str | Sequence[str] = "cpu") -> list[str]:
    """Provider names for ``providers``; a named GPU provider that this onnxruntime lacks is an error."""
    available = _ort().get_available_providers()
    if isinstance(providers, str):
        if providers == "auto":
            chosen = [p for p in (PROVIDERS["tensorrt"], PROVIDERS["cuda"]) if p in available]
        elif providers in PROVIDERS:
            chosen = [PROVIDERS[providers]]
        else:
            raise EngineError(f"unknown providers {providers!r}; choose auto, {', '.join(PROVIDERS)}")
    else:
        chosen = list(providers)
    for p in chosen:
        if p not in available:
            raise EngineError(f"onnxruntime has no {p} here (available: {available}); "
                              "install onnxruntime-gpu for CUDA/TensorRT, or use providers='cpu'")
    # Fallbacks for nodes a GPU provider doesn't take: TensorRT -> CUDA -> CPU.
    if chosen[:1] == [PROVIDERS["tensorrt"]] and PROVIDERS["cuda"] in available and PROVIDERS["cuda"] not in chosen:
        chosen.append(PROVIDERS["cuda"])
    if PROVIDERS["cpu"] not in chosen:
        chosen.append(PROVIDERS["cpu"])
    return chosen


def _shape(raw: Sequence[Any], name: str) -> tuple[int, ...]:
    if any(not isinstance(d, int) or d < 0 for d in raw):
        raise EngineError(f"tensor {name!r} has a dynamic shape {list(raw)}; edgead graphs are static")
    return tuple(int(d) for d in raw)


class OrtEngine(SlottedEngine):
    """The Engine protocol over an ONNX file. ``run`` is synchronous; slots run at ``enqueue``."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, precision: str = "fp32", providers: str | Sequence[str] = "cpu",
                 intra_op_num_threads: int | None = None, num_slots: int = 2,
                 graph_optimization: str = "all", provider_options: Sequence[dict[str, Any]] | None = None) -> None:
        ort = _ort()
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise EngineError(f"{self.path}: no such ONNX file")
        self.precision = precision
        self.num_slots = int(num_slots)
        self.threads = int(intra_op_num_threads) if intra_op_num_threads else None  # None: ORT's own choice
        opts = ort.SessionOptions()
        if intra_op_num_threads:
            opts.intra_op_num_threads = int(intra_op_num_threads)
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        opts.graph_optimization_level = levels[graph_optimization]
        self.providers = resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers,
                                                provider_options=provider_options)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise EngineError(f"{self.path}: onnxruntime could not load the graph: {exc}") from exc
        inputs = [TensorSpec(i.name, _shape(i.shape, i.name), _ORT_TYPES.get(i.type, i.type))
                  for i in self.session.get_inputs()]
        outputs = [TensorSpec(o.name, _shape(o.shape, o.name), _ORT_TYPES.get(o.type, o.type))
                   for o in self.session.get_outputs()]
        super().__init__(inputs, outputs)
        self._output_names = [o.name for o in outputs]

    @property
    def active_providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            # asarray: no copy when the dtype already matches; float64 arrays are converted
            values = self.session.run(self._output_names,
                                      {s.name: np.asarray(feeds[s.name], dtype=s.dtype) for s in self.inputs})
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self.path.name}: onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
