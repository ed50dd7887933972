"""FP32 ONNX -> mixed FP16 ONNX with FP32 islands, FP32 inputs and outputs.

onnxconverter-common converts every float tensor to FP16 except the nodes we block; Casts are
inserted at the borders. Blocked (kept FP32):

* every node whose scope path contains ``/fp32_`` (the detectors' convention: input
  normalisation, distance and score reductions);
* reductions, powers, square roots, norms, TopK and Softmax anywhere: sums of squares overflow
  FP16 (max 65504; TensorRT#1954), means over a 256² map lose the small residuals that make up
  the score, and TopK must rank the FP32 map the threshold was calibrated on;
* normalisation layers that compute a variance (Instance/Group/LayerNorm) for the same reason,
  and Exp/Log (exp overflows FP16 above ~11: a VAE's log-variance);
* data-movement ops (Flatten, Reshape...) that only carry an FP32 island's output onwards.

Fixes to the converter's output (onnxconverter-common 1.16), each checked by the tests:

* initializers shared by a blocked and an unblocked node (onnxsim de-duplicates constants such as
  ``1.0``) are split first, or the converter types one of the consumers wrongly
  ("Type parameter (T) of Optype (Add) bound to different types");
* a graph output that other nodes also read (the map feeds TopK) is routed through an Identity
  first: the converter inserts no Cast for a blocked node reading a graph output;
* graph outputs produced by a blocked node come back FP16-typed despite ``keep_io_types``;
  they are restored to FP32;
* Cast pairs FP32->FP16->FP32 (an FP32 island feeding a graph output or another island) are
  collapsed, so the map and score leave the graph at FP32 precision instead of being rounded to
  FP16 and back.

The result is re-typed by strict shape inference and must pass the full ONNX checker.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import onnx
from onnx import TensorProto, helper
from onnxconverter_common import float16

from edgead.core.contract import FP32_SCOPE

FP32_MARKER = FP32_SCOPE
# Op types kept in FP32 wherever they appear (see the module docstring for why).
FP32_OPS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
            "ReduceMax", "ReduceMin", "ReduceProd", "Pow", "Sqrt", "TopK", "Softmax", "LogSoftmax",
            "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Exp", "Log")


# Data-movement ops that join an FP32 island when they read from it (a Flatten between the FP32
# map and the FP32 TopK would otherwise round the map to FP16 on the way).
LAYOUT_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Slice", "Gather", "Concat")


def fp32_node_names(model: onnx.ModelProto, extra_ops: Iterable[str] = ()) -> list[str]:
    """Names of the nodes that must stay FP32 in reduced-precision engines: ``/fp32_`` scopes,
    :data:`FP32_OPS`, and layout ops fed only by those."""
    ops = set(FP32_OPS) | set(extra_ops)
    blocked = {n.name for n in model.graph.node if FP32_MARKER in n.name or n.op_type in ops}
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    changed = True
    while changed:
        changed = False
        for n in model.graph.node:
            if n.name in blocked or n.op_type not in LAYOUT_OPS:
                continue
            sources = [producer.get(i) for i in n.input if i and i not in inits]
            if sources and all(src is not None and src.name in blocked for src in sources):
                blocked.add(n.name)
                changed = True
    return [n.name for n in model.graph.node if n.name in blocked]


def split_shared_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node its own copy of each initializer it reads (no-op where unshared)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    seen: set[str] = set()
    count = 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                count += 1
                copy.name = f"{name}__copy{count}"
                graph.initializer.append(copy)
                node.input[k] = copy.name
            seen.add(name)
    return model


def separate_graph_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Where a graph output also feeds other nodes (the map feeds TopK), read it through an
    Identity: the converter inserts no Cast for a blocked node reading a graph output."""
    graph = model.graph
    consumed = {i for n in graph.node for i in n.input}
    for out in graph.output:
        if out.name not in consumed:
            continue
        value = f"{out.name}__value"
        for n in graph.node:
            n.output[:] = [value if o == out.name else o for o in n.output]
            n.input[:] = [value if i == out.name else i for i in n.input]
        graph.node.append(helper.make_node("Identity", [value], [out.name], name=f"{out.name}__output"))
    return model


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def collapse_cast_pairs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Cast(x->fp16) -> Cast(->fp32) becomes Identity(x) (x was FP32, so this only removes a
    rounding); Cast(x->fp32) -> Cast(->fp16) of an FP16 x is exact either way and is removed too."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inverse = {TensorProto.FLOAT: TensorProto.FLOAT16, TensorProto.FLOAT16: TensorProto.FLOAT}
    for node in list(graph.node):
        to = _cast_to(node)
        first = producer.get(node.input[0]) if to is not None else None
        if first is None or _cast_to(first) != inverse.get(to):
            continue
        if to == TensorProto.FLOAT16 and not _is_fp16(model, first.input[0]):
            continue  # fp64/other -> fp32 -> fp16 is not a round trip
        identity = helper.make_node("Identity", [first.input[0]], list(node.output), name=node.name)
        graph.node.insert(list(graph.node).index(node), identity)
        graph.node.remove(node)
    drop_dead_nodes(graph)
    remove_identities(graph)
    return model


def remove_identities(graph: onnx.GraphProto) -> None:
    """Drop Identity nodes left by the passes above (the engines would drop them anyway; this
    keeps the graph readable). A graph output keeps its name."""
    outputs = {o.name for o in graph.output}
    fixed = {i.name for i in graph.input} | {i.name for i in graph.initializer} | outputs
    for node in [n for n in graph.node if n.op_type == "Identity"]:
        src, dst = node.input[0], node.output[0]
        graph.node.remove(node)
        if dst not in outputs:
            old, new = dst, src
        elif src not in fixed:  # the producer writes the graph output (other readers may share it)
            old, new = src, dst
        else:
            graph.node.append(node)  # input -> output pass-through: needed
            continue
        for n in graph.node:
            n.input[:] = [new if i == old else i for i in n.input]
            n.output[:] = [new if o == old else o for o in n.output]


def _is_fp16(model: onnx.ModelProto, tensor: str) -> bool:
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        if vi.name == tensor:
            return vi.type.tensor_type.elem_type == TensorProto.FLOAT16
    init = next((i for i in model.graph.initializer if i.name == tensor), None)
    return init is not None and init.data_type == TensorProto.FLOAT16


def drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads, then unused initializers."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def restore_io_types(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """Make the graph's inputs and outputs FP32 again where the converter left them FP16.

    keep_io_types misses outputs produced by a blocked node: it casts them to FP16 and retypes the
    output (seen with a scorer component whose last op is an FP32 ReduceMean).
    """
    graph = converted.graph
    want = {vi.name: vi.type.tensor_type.elem_type for vi in (*original.graph.input, *original.graph.output)}
    producer = {o: n for n in graph.node for o in n.output}
    for out in graph.output:
        if want.get(out.name) != TensorProto.FLOAT or out.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        node = producer.get(out.name)
        inner = f"{out.name}__fp16"  # the FP16 value keeps feeding any FP16 consumers
        for n in graph.node:
            n.output[:] = [inner if o == out.name else o for o in n.output]
            n.input[:] = [inner if i == out.name else i for i in n.input]
        if node is not None and _cast_to(node) == TensorProto.FLOAT16:
            # an FP32 value cast down only to leave the graph: hand out the FP32 value itself
            graph.node.append(helper.make_node("Identity", [node.input[0]], [out.name], name=f"{out.name}__fp32"))
        else:
            graph.node.append(helper.make_node("Cast", [inner], [out.name], name=f"{out.name}__to_fp32",
                                               to=TensorProto.FLOAT))
        out.type.tensor_type.elem_type = TensorProto.FLOAT
    for inp in graph.input:
        if want.get(inp.name) == TensorProto.FLOAT and inp.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = f"{inp.name}__fp16"
            for n in graph.node:
                n.input[:] = [inner if i == inp.name else i for i in n.input]
            graph.node.insert(0, helper.make_node("Cast", [inp.name], [inner], name=f"{inp.name}__to_fp16",
                                                  to=TensorProto.FLOAT16))
            inp.type.tensor_type.elem_type = TensorProto.FLOAT


def convert_fp16(model: onnx.ModelProto, extra_block: Iterable[str] = ()) -> onnx.ModelProto:
    """The mixed-precision model (FP32 I/O, FP32 islands); validated with the ONNX checker."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never mutate the caller's
    model = split_shared_initializers(model)
    model = separate_graph_outputs(model)
    block = fp32_node_names(model) + list(extra_block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "float32 number ... will be truncated": tiny weights, expected
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=block,
            op_block_list=float16.DEFAULT_OP_BLOCK_LIST + list(FP32_OPS))
    restore_io_types(model, converted)
    converted = onnx.shape_inference.infer_shapes(converted)
    converted = collapse_cast_pairs(converted)
    # Renamed tensors leave stale value_info; rebuild it, then check types end to end.
    del converted.graph.value_info[:]
    converted = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
    onnx.checker.check_model(converted, full_check=True)
    return converted


def export_fp16(fp32_path: str | Path, out_path: str | Path) -> onnx.ModelProto:
    model = convert_fp16(onnx.load(str(fp32_path)))
    onnx.save(model, str(out_path))
    return model
