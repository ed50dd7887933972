"""PyTorch backend: the FP32 eager reference that every exported engine is compared with.

The only backend that imports torch. Wraps a whole :class:`~edgead.models.base.Detector`
(``image -> score, anomaly_map``) or one component module (its declared tensor names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edgead.core.engine import EngineError, SlottedEngine, TensorSpec
from edgead.core.contract import IMAGE, OUTPUT_NAMES
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
