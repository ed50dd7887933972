"""Latency, trtexec-style (``edgead bench latency BUNDLE --backend ... --precision ...``).

trtexec-style: warm up for ``--warmup-ms`` (200 ms), then ``--iterations N`` or ``--duration S``
(default: at least 10 iterations over 3 s); min / mean / median / p90 / p95 / p99 / max latency
and throughput, batch 1. H2D / compute / D2H come from engines that report them (TensorRT's
``last_timings``). Every run also times the PyTorch-eager FP32 model of the same detector, and
every engine is reported as a speed-up over it; that baseline comes in as an engine factory, so
this module runs without torch (then there is no baseline column). Each component graph is timed on its own, which
gives its share of the frame (how the VGG scorer's cost is reported).

Inputs are uniform random in [0, 1] (seeded), never zeros: zeros would hit shortcuts and, on
CPUs, denormal-free fast paths that real images don't.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgead.core import machine
from edgead.core.bundle import FUSED, Bundle, load_bundle
from edgead.core.engine import Engine
from edgead.engines import EngineError, engine_precisions, open_engine

CPU_THREADED = ("onnxruntime", "openvino")  # backends whose CPU threads --threads sets
EngineFactory = Callable[[str], Engine]  # graph name ("detector" or a component) -> engine


def random_feeds(engine: Any, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.random(s.shape, dtype=np.float32).astype(s.dtype) for s in engine.inputs}


def _stats(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a)),
            "p90": float(np.quantile(a, 0.90)), "p95": float(np.quantile(a, 0.95)),
            "p99": float(np.quantile(a, 0.99)), "max": float(a.max())}


def measure(engine: Any, warmup_ms: float = 200.0, iterations: int | None = None, duration_s: float = 3.0,
            min_iterations: int = 10, seed: int = 0) -> dict[str, Any]:
    """Time ``engine.run`` on random inputs; returns latency stats (ms), throughput and timings."""
    feeds = random_feeds(engine, seed)
    start = time.perf_counter()
    engine.run(feeds)
    while (time.perf_counter() - start) * 1e3 < warmup_ms:
        engine.run(feeds)
    samples: list[float] = []
    parts: dict[str, list[float]] = {}
    timed = hasattr(engine, "last_timings")
    began = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        engine.run(feeds)
        samples.append((time.perf_counter() - t0) * 1e3)
        if timed:
            for key, value in engine.last_timings(0).items():
                parts.setdefault(key, []).append(float(value))
        n = len(samples)
        if iterations is not None:
            if n >= iterations:
                break
        elif n >= min_iterations and time.perf_counter() - began >= duration_s:
            break
    total = time.perf_counter() - began
    result: dict[str, Any] = {"iterations": len(samples), "latency_ms": _stats(samples),
                              "throughput_fps": len(samples) / total}
    if parts:
        result["timings_ms"] = {k: {"mean": float(np.mean(v)), "median": float(np.median(v))} for k, v in parts.items()}
    return result


def engine_factory(bundle: Bundle, backend: str, precision: str, threads: int | None) -> EngineFactory:
    """Opens each graph of ``bundle`` on ``backend`` at ``precision``."""
    kw: dict[str, Any] = {"intra_op_num_threads": threads} if backend in CPU_THREADED and threads else {}
    return lambda graph: open_engine(bundle, backend, precision, graph, **kw)


def bench_engine(bundle: Bundle, open_graph: EngineFactory, settings: dict[str, Any],
                 components: bool = True) -> dict[str, Any]:
    """Latency of the fused graph, and of each component graph on its own (its share)."""
    engine = open_graph(FUSED)
    try:
        result = measure(engine, **settings)
        if components:
            result.update(_components(bundle, engine, open_graph, settings))
    finally:
        engine.close()
    return result


def _components(bundle: Bundle, engine: Any, open_graph: EngineFactory, settings: dict[str, Any]) -> dict[str, Any]:
    """Each component graph timed on its own. A chain (OpenVINO BF16) times its own components, at the
    precision each of them runs."""
    chain = getattr(engine, "parts", None)
    comps: dict[str, Any] = {}
    for comp in bundle.manifest["components"]:
        name = comp["name"]
        part = chain[name] if chain else open_graph(name)
        try:
            comps[name] = {"graph": str(getattr(part, "path", "") or "") or None, **measure(part, **settings)}
            if chain:
                comps[name]["precision"] = part.precision
        finally:
            if not chain:
                part.close()
    total = sum(c["latency_ms"]["median"] for c in comps.values())
    for c in comps.values():
        c["share"] = c["latency_ms"]["median"] / total if total > 0 else float("nan")
    return {"components": comps, "components_sum_median_ms": total}


def add_roofline(row: dict[str, Any], gflops: float | None, peak: dict[str, Any], precision: str) -> None:
    """GFLOPs (GOPs) per frame, the rate reached and its fraction of this CPU's measured peak
    (nothing for a bundle exported before the work was counted)."""
    if gflops is None:
        return
    kind, rate = ("int8_gops", peak["int8_gops"]) if precision == "int8" else ("fp32_gflops", peak["fp32_gflops"])
    achieved = gflops / (row["latency_ms"]["median"] / 1e3)
    row["roofline"] = {"gflops_per_frame": gflops, "achieved_per_s": achieved, "peak": kind,
                       "fraction_of_peak": achieved / rate if rate > 0 else float("nan")}


def benchmark(bundle_dir: str | Path, backends: Sequence[str] = ("onnxruntime",), precisions: Sequence[str] | None = None,
              warmup_ms: float = 200.0, iterations: int | None = None, duration_s: float = 3.0,
              threads: int | None = None, baseline: EngineFactory | None = None,
              components: bool = True, roofline: bool = True) -> dict[str, Any]:
    """Latency of every backend x precision, beside the PyTorch-eager FP32 ``baseline`` (if given)
    with speed-ups over it; with ``roofline``, this CPU's GEMM peaks measured in the same run and
    each row's work per frame and fraction of peak (:mod:`edgead.certify.roofline`)."""
    from edgead.certify import roofline as rf

    bundle = load_bundle(bundle_dir)
    peak = rf.peaks(threads) if roofline else None
    settings = {"warmup_ms": warmup_ms, "iterations": iterations, "duration_s": duration_s}
    base = bench_engine(bundle, baseline, settings, components) if baseline is not None else None
    results: dict[str, Any] = {}
    for backend in backends:
        for precision in precisions or engine_precisions(bundle, backend):
            key = f"{backend}/{precision}"
            try:
                r = bench_engine(bundle, engine_factory(bundle, backend, precision, threads), settings, components)
            except EngineError as exc:
                results[key] = {"skipped": str(exc)}
                continue
            if base is not None:
                r["speedup_vs_torch"] = {"median": base["latency_ms"]["median"] / r["latency_ms"]["median"],
                                         "p99": base["latency_ms"]["p99"] / r["latency_ms"]["p99"]}
            if peak is not None:
                add_roofline(r, rf.graph_gflops(bundle, FUSED, precision), peak, precision)
            fallbacks = bundle.manifest.get("precision_fallbacks", {}).get(precision)
            if fallbacks:
                r["precision_fallbacks"] = fallbacks
            results[key] = r
    report = {"bundle": str(Path(bundle_dir).resolve()), "detector": bundle.detector,
              "input_shape": list(bundle.input_shape), "batch": 1, "host": machine.describe(),
              "settings": {**settings, "threads": threads, "input": "uniform random [0, 1], seed 0"},
              "results": results}
    if base is not None:
        report["baseline"] = {"backend": "torch", "precision": "fp32", "mode": "eager", **base}
        if peak is not None:
            add_roofline(report["baseline"], rf.graph_gflops(bundle, FUSED, "fp32"), peak, "fp32")
    if peak is not None:
        report["peak"] = peak
    return report


def print_table(report: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout  # looked up per call: a default bound at import outlives a redirected stdout
    host = report["host"]
    flags = " ".join(f for f, on in host.get("isa", {}).items() if on)
    print(f"{report['detector']} {report['input_shape']} batch 1 on {host['cpu']} ({host['cores']} cores; {flags})",
          file=file)
    if "peak" in report:
        p = report["peak"]
        print(f"measured peak: {p['fp32_gflops']:.1f} GFLOP/s FP32, {p['int8_gops']:.1f} GOP/s INT8 ({p['gemm']})",
              file=file)
    print(f"{'engine':<22}{'median ms':>10}{'p99 ms':>9}{'min ms':>9}{'fps':>8}{'× torch':>9}{'GFLOP':>7}{'% peak':>8}"
          f"  components (share)", file=file)
    rows = ([("torch/fp32 (eager)", report["baseline"])] if "baseline" in report else []) + list(report["results"].items())
    for key, r in rows:
        if "skipped" in r:
            print(f"{key:<22}  skipped: {r['skipped']}", file=file)
            continue
        lat = r["latency_ms"]
        speed = r.get("speedup_vs_torch", {}).get("median", 1.0)
        comps = "  ".join(f"{n}{'@' + c['precision'] if c.get('precision') else ''} {c['share']:.0%}" for n, c in r.get("components", {}).items())
        roof = r.get("roofline")
        work = f"{roof['gflops_per_frame']:>7.2f}{roof['fraction_of_peak']:>8.1%}" if roof else " " * 15
        print(f"{key:<22}{lat['median']:>10.2f}{lat['p99']:>9.2f}{lat['min']:>9.2f}{r['throughput_fps']:>8.1f}"
              f"{speed:>8.2f}×{work}  {comps}", file=file)
        if "timings_ms" in r:
            t = r["timings_ms"]
            print("    " + "  ".join(f"{k} {v['median']:.3f} ms" for k, v in t.items()), file=file)
