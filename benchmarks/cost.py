"""Cost of the feature-embedding and flow detectors: parameters, GFLOPs, memory bank, and ONNX
Runtime FP32 and INT8 latency of the fused graph at batch 1, with the share of the first
component (the frozen VGG-19 ``encoder``; PyramidFlow's whole ``flow``).

    python -m benchmarks.cost --models patchcore pni simplenet cflow pyramidflow --sizes 128 256 \
        --out results/cost_cpu.json

Latency does not depend on trained weights, so freshly built detectors are timed (ImageNet
VGG-19, heads at their init). A memory bank is sized as the quality run's training builds it:
``coreset_ratio`` of the patches of 170 training images at that size (its contents do not change
the search's cost). INT8 graphs are Q/DQ (``edgead.export.int8``, ``--int8-layout``, default the
cpu layout a CPU station exports) calibrated on a few synthetic normal images, timed whether or not
they would pass the export's per-component check (PatchCore's encoder does not: its bundles run
that component in FP32). The four graphs of a row are timed in interleaved rounds, medians reported: the
machine is shared, so compare within a row, as ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

TRAIN_IMAGES = 170  # the synthetic set's training split (benchmarks/quality.py)
BANKED = ("patchcore", "patchcore_distilled", "pni")


def median_ms(run: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``run()`` in ms after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def interleaved_ms(runs: dict[str, Callable[[], Any]], repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median over ``rounds`` alternating passes of each run's median: load drifts hit every run alike."""
    for run in runs.values():
        run()
    per_round: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            per_round[key].append(median_ms(run, max(1, repeats // rounds), warmup=0))
    return {k: float(np.median(v)) for k, v in per_round.items()}


def torch_gflops(module, *inputs) -> float:
    """GFLOPs of one forward pass (torch's FLOP counter, no grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() / 1e9


def bank_config(model: str, size: int, config: dict[str, Any]) -> dict[str, Any]:
    """The bank rows training on TRAIN_IMAGES at ``size`` gives (coreset of the stride-4 grid's patches)."""
    if model not in BANKED:
        return config
    from edgead.models import registry

    ratio = registry.create(model, image_size=size, **config).config.coreset_ratio
    grid = size // 4  # relu3_4, the finer of the two taps
    return {**config, "bank_rows": int(math.ceil(ratio * TRAIN_IMAGES * grid * grid))}


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(model: str, size: int, config: dict[str, Any], repeats: int, calib: np.ndarray,
            threads: int = 1, layout: str = "cpu") -> dict[str, Any]:
    import torch

    from edgead.export.int8 import quantize_int8
    from edgead.export.onnx_export import export_detector
    from edgead.models import registry

    detector = registry.create(model, image_size=size, **config).eval()
    first = detector.components()[0]
    x = torch.from_numpy(calib[:1])
    row: dict[str, Any] = {"model": model, "image_size": size, "config": config, "int8_layout": layout,
                           "params_m": sum(p.numel() for p in detector.parameters()) / 1e6,
                           "first_component": first.name,
                           "first_params_m": sum(p.numel() for p in first.module.parameters()) / 1e6,
                           "gflops": torch_gflops(detector, x), "first_gflops": torch_gflops(first.module, x),
                           **({"memory_bank": detector.manifest_extras()["memory_bank"]} if model in BANKED else {})}
    runs: dict[str, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_detector(detector, tmp, components=[first.name])
        feed = {"image": calib[:1]}
        calib_feeds = [{"image": calib[i:i + 1]} for i in range(len(calib))]
        for graph, key in (("detector", "ort"), (first.name, "first_ort")):
            fp32 = Path(tmp) / manifest["graphs"][graph]["fp32"]
            int8 = Path(tmp) / f"{graph}.int8.onnx"
            runs[f"{key}_fp32_ms"] = (lambda s: lambda: s.run(None, feed))(ort_session(fp32, threads))
            try:
                quantize_int8(fp32, int8, calib_feeds, layout=layout)
                runs[f"{key}_int8_ms"] = (lambda s: lambda: s.run(None, feed))(ort_session(int8, threads))
            except Exception as exc:  # noqa: BLE001 - recorded in the row
                row[f"{key}_int8_error"] = f"{type(exc).__name__}: {exc}"
        row.update(interleaved_ms(runs, repeats))
    for precision in ("fp32", "int8"):
        if f"ort_{precision}_ms" in row and f"first_ort_{precision}_ms" in row:
            row[f"first_share_{precision}"] = row[f"first_ort_{precision}_ms"] / row[f"ort_{precision}_ms"]
    print(json.dumps(row), flush=True)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<12}{'size':>5}{'params M':>9}{'GFLOPs':>8}{'bank rows':>10}{'bank MB':>8}"
          f"{'FP32 ms':>9}{'INT8 ms':>9}{'enc share FP32':>15}{'INT8':>6}")
    for r in rows:
        bank = r.get("memory_bank", {})
        int8 = r.get("ort_int8_ms")
        print(f"{r['model']:<12}{r['image_size']:>5}{r['params_m']:>9.2f}{r['gflops']:>8.2f}"
              f"{bank.get('rows', ''):>10}{bank.get('mb', ''):>8}{r['ort_fp32_ms']:>9.1f}"
              f"{(f'{int8:.1f}' if int8 else 'fail'):>9}{r.get('first_share_fp32', math.nan):>15.0%}"
              f"{r.get('first_share_int8', math.nan):>6.0%}")


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.quality import CPU_OVERRIDES
    from benchmarks.report import write_report
    from edgead.data import synth

    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["patchcore", "pni", "simplenet", "cflow", "pyramidflow"])
    parser.add_argument("--sizes", nargs="*", type=int, default=[128, 256])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--calib", type=int, default=8, help="synthetic normal images for INT8 calibration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--int8-layout", default="cpu", choices=("cpu", "tensorrt"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config fields for every model, e.g. 'taps=[\"relu3_4\"]' (values parsed as JSON)")
    parser.add_argument("--out", default="results/cost_cpu.json")
    args = parser.parse_args(argv)
    from edgead.cli import parse_kv

    overrides = parse_kv(args.set)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for size in args.sizes:
        bgr = np.stack([synth.render_normal("fabric", np.random.default_rng(i), size) for i in range(args.calib)])
        calib = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), np.float32) / 255.0
        for model in args.models:
            config = bank_config(model, size, {**CPU_OVERRIDES.get(model, {}), **overrides})
            rows.append(measure(model, size, config, args.repeats, calib, args.threads, args.int8_layout))
    print_table(rows)
    write_report(args.out, {"threads": args.threads, "batch": 1, "config_set": overrides,
                            "note": "shared, loaded 2-core CPU; compare within a row, as ratios", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
