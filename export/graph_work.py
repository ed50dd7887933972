"""Work per frame of each exported graph, counted once at export for the latency report's roofline.

2 x the multiply-accumulates of every Conv, ConvTranspose, Gemm and MatMul (and their integer
twins), from shape inference. Stored in the manifest as ``work_gflops[graph][precision]`` so that
the station, which has ONNX Runtime but not ``onnx``, never parses a graph to count it. The two
GEMM graphs the station times for its peaks (``edgead/certify/gemm``) are built here too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

import edgead
from onnx import TensorProto, helper

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "ConvInteger")
GEMM_DIR = Path(edgead.__file__).resolve().parent / "certify" / "gemm"


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:  # ORT's symbolic inference also follows computed sizes (a reflect Pad's pads)
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - e.g. an op it does not know: ONNX's own inference
        model = onnx.shape_inference.infer_shapes(model)
    dims: dict[str, list[int]] = {}
    for vi in (*model.graph.value_info, *model.graph.input, *model.graph.output):
        dims[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        dims[init.name] = list(init.dims)
    for node in model.graph.node:  # weights behind an Identity (torch exports shared ones so)
        if node.op_type == "Identity" and not dims.get(node.output[0]) and node.input[0] in dims:
            dims[node.output[0]] = dims[node.input[0]]
    return dims


def graph_gflops(onnx_path: str | Path) -> float:
    """2 x MACs of the weighted layers of one frame, in GFLOP (GOP for integer layers)."""
    model = onnx.load(str(onnx_path))
    dims = _shapes(model)
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        out, w, x = dims.get(node.output[0]), dims.get(node.input[1]), dims.get(node.input[0])
        if not out or not w or not x or 0 in out or 0 in w:
            continue
        if node.op_type in ("Conv", "ConvInteger"):  # out (N, Co, H, W), w (Co, Ci/g, kh, kw)
            total += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # each input pixel scatters Ci x Co/g x kh x kw MACs
            total += 2.0 * float(np.prod(x)) * float(np.prod(w[1:]))
        else:  # (.., M, K) x (K, N)
            total += 2.0 * float(np.prod(out)) * float(x[-1])
    return total / 1e9


def work_table(out: Path, graphs: dict[str, dict[str, str]]) -> dict[str, dict[str, float]]:
    """``{graph: {precision: GFLOP per frame}}`` for every graph file of a bundle."""
    return {g: {p: graph_gflops(out / f) for p, f in by_precision.items()} for g, by_precision in graphs.items()}


def gemm_model(kind: str) -> onnx.ModelProto:
    """An n x n x n GEMM with a free size n: ``MatMul`` (fp32) or ``MatMulInteger`` (uint8 x int8 -> int32)."""
    if kind == "fp32":
        a, b, y, op = TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    else:
        a, b, y, op = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger"
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], f"gemm_{kind}",
                              [helper.make_tensor_value_info("a", a, ["n", "n"]),
                               helper.make_tensor_value_info("b", b, ["n", "n"])],
                              [helper.make_tensor_value_info("y", y, ["n", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgead")
    model.ir_version = 8  # readable by every onnxruntime >= 1.17
    return model


def write_gemm_models(folder: Path = GEMM_DIR) -> None:
    """Regenerate the shipped GEMM graphs (tests check the shipped bytes equal these)."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("fp32", "int8"):
        (folder / f"{kind}.onnx").write_bytes(gemm_model(kind).SerializeToString())


if __name__ == "__main__":
    write_gemm_models()
