"""PyTorch -> ONNX: the fused detector graph and one graph per component.

The TorchScript exporter (``dynamo=False``) gives static shapes at batch 1 and scope-path node
names (``/head/fp32_score/ReduceMean``); the FP16 export relies on those names to keep the
``fp32_*`` modules in FP32. Opset 17 is what TensorRT 10.3 (JetPack 6) parses.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import onnx
import onnxsim
import torch
from torch import Tensor, nn

from edgead.core.bundle import FUSED
from edgead.core.contract import IMAGE, OUTPUT_NAMES
from edgead.models.base import Component, Detector

OPSET = 17


class ExportError(RuntimeError):
    """A graph could not be exported, simplified or validated; the message names the graph."""


class _Tupled(nn.Module):
    """Calls ``module`` with positional inputs and always returns a tuple, so every component
    exports the same way whatever its arity. The attribute name ``module`` adds ``/module`` to
    node scopes, which keeps ``/fp32_`` substrings intact."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        out = self.module(*inputs)
        return out if isinstance(out, tuple) else (out,)


def export_onnx(module: nn.Module, example_inputs: Sequence[Tensor], input_names: Sequence[str],
                output_names: Sequence[str], path: str | Path, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``module`` at the example inputs' static shapes, simplify, check, save to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter restores the wrapper's train/eval mode afterwards, recursively: a fresh wrapper
    # is in train mode, so without .eval() on it the caller's detector would come back training.
    was_training = module.training
    wrapper = _Tupled(module).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice, on purpose
            torch.onnx.export(wrapper, tuple(example_inputs), str(path),
                              input_names=list(input_names), output_names=list(output_names),
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the graph's name
        raise ExportError(f"{path.name}: torch.onnx.export failed: {exc}") from exc
    finally:
        module.train(was_training)
    model = onnx.load(str(path))
    # onnxsim folds constants and shape arithmetic; it keeps the scope-path node names.
    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise ExportError(f"{path.name}: onnx-simplifier could not validate the simplified graph")
    _check_io(simplified, input_names, output_names, path)
    onnx.checker.check_model(simplified, full_check=True)
    onnx.save(simplified, str(path))
    return simplified


def _check_io(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str], path: Path) -> None:
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(inputs) or got_out != list(outputs):
        # e.g. an input the module never reads is dropped by the exporter
        raise ExportError(f"{path.name}: graph I/O {got_in} -> {got_out}, declared {list(inputs)} -> {list(outputs)}")


def example_tensors(shapes: dict[str, tuple[int, ...]], names: Sequence[str], seed: int = 0,
                    device: torch.device | str = "cpu") -> list[Tensor]:
    """Random example tensors for ``names``; values in [0, 1] (the image range), never zeros,
    so no branch of the graph is traced on a degenerate input."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(shapes[n], generator=gen).to(device) for n in names]


def not_exportable_reason(detector: Detector) -> str:
    """Why the fused graph can't be exported; a detector may explain itself in ``export_note``."""
    why = getattr(detector, "export_note", None) or "its score is not one forward graph (an iterative search)"
    return (f"detector {detector.name!r} is not exportable: {why}. Its components can still be exported "
            "one by one (fused=False), or score it with the PyTorch backend")


def export_detector(detector: Detector, out_dir: str | Path, opset: int = OPSET,
                    fused: bool = True, components: Sequence[str] | None = None) -> dict[str, Any]:
    """Write ``detector.fp32.onnx`` (image -> score, anomaly_map) and ``<component>.fp32.onnx``.

    Returns ``{"graphs": {graph: {"fp32": filename}}, "components": [...], "shapes": {...}}``.
    ``components`` limits the per-component graphs (default all). A detector with
    ``exportable = False`` raises :class:`ExportError` for the fused graph; pass ``fused=False``
    to export what it lists in ``exportable_components()`` (AnoGAN's generator) alone.
    """
    if fused and not detector.exportable:
        raise ExportError(not_exportable_reason(detector))
    was_training = detector.training
    try:
        return _export_detector(detector.eval(), Path(out_dir), opset, fused, components)
    finally:
        detector.train(was_training)


def _export_detector(detector: Detector, out: Path, opset: int, fused: bool,
                     components: Sequence[str] | None) -> dict[str, Any]:
    shapes = detector.component_shapes()
    device = detector.device
    graphs: dict[str, dict[str, str]] = {}
    if fused:
        name = f"{FUSED}.fp32.onnx"
        export_onnx(detector, example_tensors(shapes, [IMAGE], device=device), [IMAGE],
                    list(OUTPUT_NAMES), out / name, opset)
        graphs[FUSED] = {"fp32": name}
    # A non-exportable detector (AnoGAN) lists what does export on its own.
    comps = detector.components() if detector.exportable else list(getattr(detector, "exportable_components", list)())
    wanted = set(components) if components is not None else {c.name for c in comps}
    unknown = wanted - {c.name for c in comps}
    if unknown:
        raise ExportError(f"detector {detector.name!r} has no component(s) {sorted(unknown)}; "
                          f"it has {[c.name for c in comps]}")
    for comp in comps:
        if comp.name not in wanted:
            continue
        name = f"{comp.name}.fp32.onnx"
        export_onnx(comp.module, example_tensors(shapes, comp.inputs, device=device), comp.inputs,
                    comp.outputs, out / name, opset)
        graphs[comp.name] = {"fp32": name}
    return {"graphs": graphs, "components": [component_entry(c, shapes) for c in comps if c.name in wanted],
            "shapes": {k: list(v) for k, v in shapes.items()}}


def component_entry(comp: Component, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The manifest's description of one component: wiring and static shapes."""
    return {"name": comp.name, "inputs": list(comp.inputs), "outputs": list(comp.outputs),
            "shapes": {n: list(shapes[n]) for n in (*comp.inputs, *comp.outputs)}}


def _prefixed(comp: str, name: str) -> str:
    return f"{comp}{name}" if name.startswith("/") else f"{comp}/{name}"


def chain_graphs(parts: Sequence[tuple[str, onnx.ModelProto]], inputs: Sequence[str],
                 outputs: Sequence[str]) -> onnx.ModelProto:
    """One graph from component graphs wired by tensor name (component I/O names are global).

    Every internal tensor, initializer and node of component ``c`` gets the prefix ``c`` (node
    names keep their ``/fp32_`` scopes). Used for the mixed-precision fused graph: each component
    keeps the precision it was certified at.
    """
    nodes, inits, value_info = [], [], []
    graph_inputs: dict[str, onnx.ValueInfoProto] = {}
    graph_outputs: dict[str, onnx.ValueInfoProto] = {}
    opsets: dict[str, int] = {}
    for comp, model in parts:
        g = model.graph
        io = {i.name for i in g.input} | {o.name for o in g.output}

        def rename(name: str, comp: str = comp, io: set[str] = io) -> str:
            return name if (not name or name in io) else _prefixed(comp, name)

        for node in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise ExportError(f"component {comp!r}: subgraphs (If/Loop) are not supported when chaining")
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = _prefixed(comp, node.name)
            new.input[:] = [rename(i) for i in node.input]
            new.output[:] = [rename(o) for o in node.output]
            nodes.append(new)
        for init in g.initializer:
            new_init = onnx.TensorProto()
            new_init.CopyFrom(init)
            new_init.name = rename(init.name)
            inits.append(new_init)
        for vi in g.value_info:
            if vi.name not in io:
                new_vi = onnx.ValueInfoProto()
                new_vi.CopyFrom(vi)
                new_vi.name = rename(vi.name)
                value_info.append(new_vi)
        graph_inputs.update({i.name: i for i in g.input if i.name in inputs})
        graph_outputs.update({o.name: o for o in g.output if o.name in outputs})
        for op in model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    missing = [n for n in (*inputs, *outputs) if n not in graph_inputs and n not in graph_outputs]
    if missing:
        raise ExportError(f"chained graph: no component provides {missing}")
    graph = onnx.helper.make_graph(nodes, "detector", [graph_inputs[n] for n in inputs],
                                   [graph_outputs[n] for n in outputs], inits, value_info=value_info)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                   producer_name="edgead")
    model.ir_version = max(m.ir_version for _, m in parts)
    onnx.checker.check_model(model, full_check=True)
    return model
