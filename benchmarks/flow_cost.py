"""Cost of the flow detectors (CFLOW-AD, PyramidFlow): parameters, GFLOPs, ORT FP32 and INT8
latency of the fused graph at batch 1, and the share of the first component (CFLOW's frozen VGG-19
encoder; PyramidFlow's whole flow) in each.

    python -m benchmarks.flow_cost --models cflow pyramidflow --sizes 128 256 --out results/cost_cpu_flows.json

Latency does not depend on trained weights, so freshly built detectors (ImageNet VGG-19, flows
at their init) are timed; the INT8 graphs are calibrated on a few synthetic normal images.
Measured on a shared, loaded CPU: compare rows of one run as ratios, not as absolute figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _median_ms(path: Path, feed: dict[str, np.ndarray], repeats: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(2):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _flops(module, *inputs) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / 1e9


def measure(model: str, size: int, config: dict[str, Any], repeats: int, calib: np.ndarray) -> dict[str, Any]:
    import torch

    from edgead.export.int8 import quantize_int8
    from edgead.export.onnx_export import export_detector
    from edgead.models import registry

    detector = registry.create(model, image_size=size, **config).eval()
    first = detector.components()[0]
    x = torch.from_numpy(calib[:1])
    row: dict[str, Any] = {"model": model, "image_size": size, "config": config,
                           "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
                           "first_component": first.name,
                           "first_params_m": sum(p.numel() for p in first.module.parameters()) / 1e6,
                           "gflops": _flops(detector, x), "first_gflops": _flops(first.module, x)}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_detector(detector, tmp, components=[first.name])
        feed = {"image": calib[:1]}
        calib_feeds = [{"image": calib[i:i + 1]} for i in range(len(calib))]
        for graph, key in (("detector", "ort"), (first.name, "first_ort")):
            fp32 = Path(tmp) / manifest["graphs"][graph]["fp32"]
            int8 = Path(tmp) / f"{graph}.int8.onnx"
            row[f"{key}_fp32_ms"] = _median_ms(fp32, feed, repeats)
            try:
                quantize_int8(fp32, int8, calib_feeds)
                row[f"{key}_int8_ms"] = _median_ms(int8, feed, repeats)
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                row[f"{key}_int8_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.quality import CPU_OVERRIDES
    from edgead.core.machine import describe
    from edgead.data import synth

    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["cflow", "pyramidflow"])
    parser.add_argument("--sizes", nargs="*", type=int, default=[128, 256])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calib", type=int, default=8, help="synthetic normal images for INT8 calibration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/cost_cpu_flows.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for size in args.sizes:
        bgr = np.stack([synth.render_normal("fabric", np.random.default_rng(i), size) for i in range(args.calib)])
        calib = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), np.float32) / 255.0
        for model in args.models:
            rows.append(measure(model, size, dict(CPU_OVERRIDES.get(model, {})), args.repeats, calib))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": describe(), "threads": args.threads, "batch": 1,
                               "note": "shared, loaded 2-core CPU; compare as ratios", "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
