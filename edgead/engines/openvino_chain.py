"""A bundle's fused detector on OpenVINO as a chain of its component graphs, each at its own precision.

OpenVINO applies one inference precision to a whole compiled model, and its CPU plugin does not
honour the ``precise`` attribute on every op (the kNN search's MatMul, once it is a FullyConnected,
runs in BF16 whatever it carries). So the BF16 detector is compiled component by component, following
the manifest's wiring: each component in BF16 where OpenVINO keeps its FP32 islands f32 (the
encoder's convolutions, with its FP32 input normalisation), and in FP32 where it would not (the
memory's nearest-neighbour search, the head's reductions). The precision of each component is
recorded on the engine (``component_precisions``) and printed by the tools. Tensors pass between
components on the host; they are small next to the encoder's work.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgead.core.bundle import FUSED, Bundle
from edgead.core.contract import IMAGE, OUTPUT_NAMES
from edgead.core.engine import EngineError, SlottedEngine
from edgead.core.wiring import Node, WiringError, check_wiring, io_mismatch, run_wiring
from edgead.engines.openvino_engine import IslandInBf16, OpenVinoEngine


def _open_part(bundle: Bundle, node: Node, precision: str, kw: dict[str, Any]) -> tuple[OpenVinoEngine, str]:
    """(engine, why it is not at ``precision``, or "") for one component."""
    path = bundle.graph_path(node.name, "fp32")
    try:
        return OpenVinoEngine(path, precision=precision, num_slots=1, **kw), ""
    except IslandInBf16 as exc:
        return OpenVinoEngine(path, precision="fp32", num_slots=1, **kw), str(exc)


class OpenVinoChain(SlottedEngine):
    """The Engine protocol over a bundle's components compiled by OpenVINO, run in wiring order."""

    backend = "openvino"

    def __init__(self, bundle: Bundle, precision: str = "bf16", num_slots: int = 2, **kw: Any) -> None:
        wiring = [Node.from_dict(c) for c in bundle.manifest["components"]]
        try:
            check_wiring(wiring, [IMAGE], OUTPUT_NAMES)
        except WiringError as exc:
            raise EngineError(f"{bundle.root}: OpenVINO chain: {exc}") from exc
        self.precision, self.num_slots, self.wiring = precision, int(num_slots), wiring
        self.path = bundle.graph_path(FUSED, precision)  # what the chain stands for (certificates, reports)
        self.parts: dict[str, OpenVinoEngine] = {}
        self.fallbacks: dict[str, str] = {}
        try:
            for node in wiring:
                self.parts[node.name], why = _open_part(bundle, node, precision, kw)
                if why:
                    self.fallbacks[node.name] = why
                self._check_part(node)
        except BaseException:
            self.close()
            raise
        first = self.parts[wiring[0].name]
        self.backend_version, self.device_name, self.threads = first.backend_version, first.device_name, first.threads
        self.inference_precision = precision
        specs = {s.name: s for part in self.parts.values() for s in (*part.inputs, *part.outputs)}
        super().__init__([specs[IMAGE]], [specs[name] for name in OUTPUT_NAMES])

    def _check_part(self, node: Node) -> None:
        part = self.parts[node.name]
        mismatch = io_mismatch(node, (s.name for s in part.inputs), (s.name for s in part.outputs))
        if mismatch:
            raise EngineError(mismatch)

    @property
    def component_precisions(self) -> dict[str, str]:
        return {name: part.precision for name, part in self.parts.items()}

    def _call(self, node: Node, args: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        out = self.parts[node.name].run(dict(zip(node.inputs, args)))
        return tuple(out[name] for name in node.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        values = run_wiring(self.wiring, {IMAGE: np.asarray(feeds[IMAGE], np.float32)}, self._call)
        return {name: values[name] for name in OUTPUT_NAMES}

    def close(self) -> None:
        for part in self.parts.values():
            part.close()
        self.parts = {}
