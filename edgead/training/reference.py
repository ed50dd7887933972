"""The PyTorch reference engines: what every exported engine is compared with.

:class:`TorchEngine` is the FP32 eager reference on the CPU (or a GPU), behind the same
:class:`~edgead.core.engine.Engine` protocol as every backend; it wraps a whole detector
(``image -> score, anomaly_map``) or one component (its declared tensor names).
:class:`TorchCudaEngine` runs a module on the CUDA slot code of the TensorRT engine. Both live
with training because they import torch: the station's engines never do.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from edgead.core.contract import ANOMALY_MAP, IMAGE, OUTPUT_NAMES, SCORE
from edgead.core.engine import EngineError, SlottedEngine, TensorSpec
from edgead.engines import cuda_rt
from edgead.engines.cuda_slotted import CudaSlottedEngine
from edgead.models.base import Detector


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("torch backend: CUDA was asked for but torch sees no GPU")
    return dev


class TorchEngine(SlottedEngine):
    """The Engine protocol over an ``nn.Module`` in eval mode under ``torch.inference_mode``."""

    backend = "torch"

    def __init__(self, module: nn.Module, inputs: Sequence[TensorSpec], output_names: Sequence[str],
                 device: str | torch.device = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        if precision != "fp32":
            raise EngineError(f"torch backend runs the FP32 reference only, not {precision}")
        if threads:
            torch.set_num_threads(int(threads))
        self.precision = precision
        self.device = _device(device)
        self.module = module.to(self.device).eval()
        self._input_names = [s.name for s in inputs]
        self._output_names = list(output_names)
        # One dry run gives the output shapes (and warms the allocator).
        dry = self._forward({s.name: np.random.default_rng(0).random(s.shape, dtype=np.float32) for s in inputs})
        super().__init__(list(inputs), [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in dry.items()])

    @classmethod
    def from_detector(cls, detector: Detector, device: str | torch.device = "cpu", **kw: object) -> "TorchEngine":
        return cls(detector, [TensorSpec(IMAGE, detector.input_shape)], OUTPUT_NAMES, device, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_component(cls, detector: Detector, name: str, device: str | torch.device = "cpu",
                       **kw: object) -> "TorchEngine":
        comps = {c.name: c for c in detector.components()}
        if name not in comps:
            raise EngineError(f"detector {detector.name!r} has no component {name!r}; it has {sorted(comps)}")
        shapes = detector.component_shapes()
        comp = comps[name]
        return cls(comp.module, [TensorSpec(n, shapes[n]) for n in comp.inputs], comp.outputs, device, **kw)  # type: ignore[arg-type]

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", graph: str = "detector",
                 **kw: object) -> "TorchEngine":
        """The reference engine of a training run (``graph``: "detector" or a component name)."""
        from edgead.training.checkpoint import load_run

        detector, _, _ = load_run(run_dir, device="cpu")
        if graph == "detector":
            return cls.from_detector(detector, device, **kw)
        return cls.from_component(detector, graph, device, **kw)

    def _forward(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n], dtype=np.float32)).to(self.device)
                    for n in self._input_names]
            out = self.module(*args)
            out = out if isinstance(out, tuple) else (out,)
            # .cpu() waits for the device, so a timed run() includes the whole computation.
            return {n: t.detach().float().cpu().numpy() for n, t in zip(self._output_names, out)}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            return self._forward(feeds)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"torch backend failed: {exc}") from exc


def reference_outputs(run_dir: str | Path, images: np.ndarray, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
    """The run's detector on ``images`` (N, C, H, W), one at a time on the CPU, in ``dtype``:
    score (N,) and raw map (N, H, W). FP32 is the reference every engine is certified against;
    float64 is the yardstick of FP32 rounding (the noise-floor rule)."""
    from edgead.training.checkpoint import load_run

    detector, _, _ = load_run(run_dir, device="cpu")
    detector = detector.to(dtype).eval()
    scores, maps = [], []
    with torch.inference_mode():
        for image in images:
            score, amap = detector(torch.from_numpy(np.ascontiguousarray(image[None])).to(dtype))
            scores.append(float(score.reshape(-1)[0]))
            maps.append(amap.reshape(images.shape[-2:]).double().numpy())
    map_dtype = np.float32 if dtype == torch.float32 else np.float64
    return {SCORE: np.array(scores, np.float64), ANOMALY_MAP: np.stack(maps).astype(map_dtype)}


def graph_factory(run_dir: str | Path, threads: int | None = None) -> "Callable[[str], TorchEngine]":
    """graph name ("detector" or a component) -> the run's PyTorch FP32 engine for it."""
    return lambda graph: TorchEngine.from_run(run_dir, "cpu", graph=graph, threads=threads)


class TorchCudaEngine(CudaSlottedEngine):
    """``module(*inputs) -> tensor | tuple | dict`` run on each slot's own CUDA stream.

    The GPU verification engine: a torch module behind the very slot code the TensorRT engine
    uses (:class:`~edgead.engines.cuda_slotted.CudaSlottedEngine`), so a GPU without TensorRT
    checks the pinned buffers, async copies, streams and overlap a Jetson will use. Device inputs
    are torch tensors that ``cudaMemcpyAsync`` fills through ``data_ptr()``; the module runs under
    ``torch.cuda.ExternalStream(slot stream)``, so its kernels queue behind that upload; outputs
    are copied back from their ``data_ptr()`` on the same stream.
    """

    backend = "torch-cuda"

    def __init__(
        self,
        module: Any,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        *,
        num_slots: int = 2,
        device: int = 0,
        precision: str = "fp32",
        cuda_graph: bool = False,
    ) -> None:
        self._torch = torch
        if not torch.cuda.is_available():
            raise EngineError("CUDA is not available to torch")
        if precision not in ("fp32", "fp16"):
            raise EngineError(f"torch-cuda runs fp32 or fp16 (autocast), not {precision!r}")
        self.precision = precision
        self.device = torch.device("cuda", device)
        torch.cuda.set_device(self.device)
        torch.cuda.init()  # torch and cuda-python then share the device's primary context
        cuda_rt.set_device(device)
        self.module = module.to(self.device).eval()
        self._open_slots(inputs, outputs, num_slots, allocate_device=False)
        self._dev_in = [
            {s.name: torch.empty(s.shape, dtype=getattr(torch, np.dtype(s.dtype).name), device=self.device) for s in self.inputs}
            for _ in range(self.num_slots)
        ]
        self._streams = [torch.cuda.ExternalStream(self.slots[k].stream.handle, device=self.device) for k in range(self.num_slots)]
        torch.cuda.synchronize(self.device)  # the input tensors exist before other streams write them
        # A CUDA graph per slot makes enqueue one launch, as TensorRT's execute_async_v3 is: eager
        # torch on a fast GPU is bound by Python launching kernels, which hides any overlap.
        self._graphs = [self._capture(k) for k in range(self.num_slots)] if cuda_graph else []

    def _autocast(self) -> Any:
        torch = self._torch
        return torch.autocast("cuda", dtype=torch.float16) if self.precision == "fp16" else contextlib.nullcontext()

    def _capture(self, slot: int) -> tuple[Any, dict[str, Any]]:
        """Capture the module on the slot's input tensors; replays reuse its output tensors."""
        torch, args = self._torch, [self._dev_in[slot][s.name] for s in self.inputs]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._autocast():
            for _ in range(3):  # lazy init and library workspaces must happen outside the capture
                self._named(self.module(*args))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), self._autocast(), torch.cuda.graph(graph):
            outs = self._named(self.module(*args))
        torch.cuda.synchronize(self.device)
        return graph, outs

    def _input_pointers(self, slot: int) -> dict[str, int]:
        return {n: t.data_ptr() for n, t in self._dev_in[slot].items()}

    def _launch(self, slot: int, stream_handle: int) -> dict[str, int]:
        torch, tensors = self._torch, self._dev_in[slot]
        with torch.cuda.stream(self._streams[slot]), torch.inference_mode(), self._autocast():
            if self._graphs:
                graph, outs = self._graphs[slot]
                graph.replay()  # on the current stream: the slot's
            else:
                outs = self._named(self.module(*(tensors[s.name] for s in self.inputs)))
        # Keep the output tensors alive until synchronize: the D2H copies read their memory.
        self.slots[slot].extra.extend(outs.values())
        return {n: t.data_ptr() for n, t in outs.items()}

    def _named(self, result: Any) -> dict[str, Any]:
        torch = self._torch
        if isinstance(result, torch.Tensor):
            result = (result,)
        if isinstance(result, dict):
            items = [(s, result.get(s.name)) for s in self.outputs]
        else:
            if len(result) != len(self.outputs):
                raise EngineError(f"module returned {len(result)} outputs, expected {len(self.outputs)}")
            items = list(zip(self.outputs, result))
        outs = {}
        for spec, t in items:
            if t is None or tuple(t.shape) != spec.shape:
                raise EngineError(f"output {spec.name!r}: expected shape {spec.shape}, got {None if t is None else tuple(t.shape)}")
            # Still on the slot's stream: dtype cast and a contiguous layout for a flat D2H copy.
            outs[spec.name] = t.to(getattr(torch, np.dtype(spec.dtype).name)).contiguous()
        return outs

    def _release(self) -> None:
        self._dev_in, self._streams, self._graphs = [], [], []
