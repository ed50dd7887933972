"""A roofline for the latency report: this CPU's measured GEMM peaks and each graph's work.

* Peaks, measured in the same run as the engines: ONNX Runtime's FP32 ``MatMul`` and its INT8
  ``MatMulInteger`` (uint8 x int8, the VNNI path) on square matrices of a fixed size, median of
  several runs, at the engine's thread count.
* Work per frame: 2 x multiply-accumulates of every Conv, ConvTranspose, Gemm and MatMul of the
  graph, from ONNX shape inference (Q/DQ graphs count the same layers: a GOP is a GFLOP's twin).

A row's fraction of peak is (work / median latency) / peak, the INT8 peak for INT8 graphs. The
convolutions a detector runs are smaller and thinner than a big GEMM, so fractions well under 1
are expected; they say how much of the machine an engine leaves unused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

GEMM_SIZE = 1024
WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger", "ConvInteger")


def _gemm_model(kind: str, n: int) -> bytes:
    from onnx import TensorProto, helper

    if kind == "fp32":
        a, b, out, op = TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT, "MatMul"
    else:
        a, b, out, op = TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, "MatMulInteger"
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", a, [n, n]),
                               helper.make_tensor_value_info("b", b, [n, n])],
                              [helper.make_tensor_value_info("y", out, [n, n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def gemm_peak(kind: str = "fp32", n: int = GEMM_SIZE, threads: int | None = None, runs: int = 7) -> float:
    """Measured G(FL)OP/s of an n x n x n ``MatMul`` (fp32) or ``MatMulInteger`` (int8) on ORT's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(_gemm_model(kind, n), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    if kind == "fp32":
        feeds = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
    else:
        feeds = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / float(np.median(times)) / 1e9


def peaks(threads: int | None = None, n: int = GEMM_SIZE) -> dict[str, Any]:
    return {"fp32_gflops": gemm_peak("fp32", n, threads), "int8_gops": gemm_peak("int8", n, threads),
            "gemm": f"{n}x{n}x{n}, onnxruntime MatMul (fp32) / MatMulInteger (uint8 x int8)", "threads": threads}


def graph_gflops(onnx_path: str | Path) -> float:
    """2 x MACs of the weighted layers of one frame, in GFLOP (GOP for integer layers)."""
    import onnx

    model = onnx.load(str(onnx_path))
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
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in WEIGHTED:
            continue
        out, w = dims.get(node.output[0]), dims.get(node.input[1])
        x = dims.get(node.input[0])
        if not out or not w or not x or 0 in out or 0 in w:
            continue
        if node.op_type in ("Conv", "ConvInteger"):  # out (N, Co, H, W), w (Co, Ci/g, kh, kw)
            total += 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":  # each input pixel scatters Ci x Co/g x kh x kw MACs
            total += 2.0 * float(np.prod(x)) * float(np.prod(w[1:]))
        else:  # (.., M, K) x (K, N)
            total += 2.0 * float(np.prod(out)) * float(x[-1])
    return total / 1e9
