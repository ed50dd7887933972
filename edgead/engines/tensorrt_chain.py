"""A detector's component plans run back to back on the device, following its wiring.

The TensorRT chain of :mod:`edgead.engines.tensorrt_engine`: same plans, same slots, one upload of
``image`` and one download of ``score`` and ``anomaly_map``; every other tensor stays on the GPU.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from edgead.core.contract import IMAGE, OUTPUT_NAMES
from edgead.core.engine import EngineError, TensorSpec
from edgead.core.wiring import Node, WiringError, check_wiring, io_mismatch, run_wiring
from edgead.engines import cuda_rt
from edgead.engines.tensorrt_engine import TensorRTEngine, _Component


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
            mismatch = io_mismatch(node, (s.name for s in part.inputs), (s.name for s in part.outputs), "plan")
            if mismatch:
                raise EngineError(mismatch)
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
