"""A roofline for the latency report: this CPU's measured GEMM peaks and each graph's work.

* Peaks, measured in the same run as the engines: ONNX Runtime's FP32 ``MatMul`` and its INT8
  ``MatMulInteger`` (uint8 x int8, the VNNI path) on square matrices of a fixed size, median of
  several runs, at the engine's thread count.
* Work per frame: 2 x multiply-accumulates of every Conv, ConvTranspose, Gemm and MatMul of the
  graph, counted at export (``manifest.work_gflops``; Q/DQ graphs count the same layers: a GOP
  is a GFLOP's twin), so the station never parses a graph and needs no ``onnx``.

A row's fraction of peak is (work / median latency) / peak, the INT8 peak for INT8 graphs. The
convolutions a detector runs are smaller and thinner than a big GEMM, so fractions well under 1
are expected; they say how much of the machine an engine leaves unused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgead.core.bundle import ENGINE_ONLY_PRECISIONS

GEMM_SIZE = 1024
GEMM_DIR = Path(__file__).resolve().parent / "gemm"


def _gemm_model(kind: str) -> bytes:
    """The shipped GEMM graph (built by ``edgead.export.graph_work``: the station has no ``onnx``)."""
    return (GEMM_DIR / f"{kind}.onnx").read_bytes()


def gemm_peak(kind: str = "fp32", n: int = GEMM_SIZE, threads: int | None = None, runs: int = 7) -> float:
    """Measured G(FL)OP/s of an n x n x n ``MatMul`` (fp32) or ``MatMulInteger`` (int8) on ORT's CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    sess = ort.InferenceSession(_gemm_model(kind), opts, providers=["CPUExecutionProvider"])
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


def graph_gflops(bundle: Any, graph: str, precision: str) -> float | None:
    """GFLOP (GOP) per frame of a bundle's graph, as counted at export (None for older bundles); bf16
    does the work of the FP32 graph it compiles."""
    value = bundle.manifest.get("work_gflops", {}).get(graph, {}).get(ENGINE_ONLY_PRECISIONS.get(precision, precision))
    return float(value) if value is not None else None
