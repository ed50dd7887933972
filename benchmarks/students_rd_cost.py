"""Cost of Reverse Distillation, RD++ and Uninformed Students against their VGG-19 teacher.

    python -m benchmarks.students_rd_cost --sizes 128 256 --out results/cost_students_rd.json

For each detector (built as the quality run builds it: ``CPU_OVERRIDES``; random weights, since
cost does not depend on them) and image size: parameters and GFLOPs of the inference graph
(torch's FLOP counter, batch 1), ONNX Runtime FP32 and INT8 (Q/DQ, ``edgead.export.int8``,
calibrated on procedural textures) latency of the fused graph, and the latency of the VGG-19
alone: the ``encoder`` component for RD/RD++ (its share of the frame), and for Uninformed Students
the VGG-19 up to relu4_1 that its teacher is distilled from (it never runs at inference: the
ratio is what the students save). The machine is shared, so every graph of one size is timed in
interleaved rounds and the medians are compared as ratios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.cost import interleaved_ms, ort_session, torch_gflops

MODELS = ("rd", "rdpp", "students")


def _export(model: str, size: int, out: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Export ``model`` at ``size`` (config: ``CPU_OVERRIDES`` + ``overrides``); returns its cost row and the graphs to time."""
    import torch

    from benchmarks.quality import CPU_OVERRIDES, model_cost
    from edgead.export.int8 import quantize_int8
    from edgead.export.onnx_export import export_detector, export_onnx
    from edgead.models import registry
    from edgead.models.students import VGG_TAP, render_textures
    from edgead.models.vgg import FrozenVGG19

    detector = registry.create(model, image_size=size, **{**CPU_OVERRIDES.get(model, {}), **overrides}).eval()
    row: dict[str, Any] = {"model": model, "image_size": size, "config_set": overrides, **model_cost(detector, size)}
    manifest = export_detector(detector, out / model)
    fused = out / model / manifest["graphs"]["detector"]["fp32"]
    calib = render_textures(("fabric", "metal", "wood"), 8, size, seed=1)
    quantize_int8(fused, out / model / "detector.int8.onnx", [{"image": x[None]} for x in calib])
    graphs = {"fp32": fused, "int8": out / model / "detector.int8.onnx"}
    if model == "students":
        vgg = FrozenVGG19([VGG_TAP[p] for p in detector.config.patch_sizes]).eval()
        names = [f"vgg_{t}" for t in vgg.tap_names]
        export_onnx(vgg, [torch.rand(1, 3, size, size)], ["image"], names, out / "vgg.onnx")
        graphs["vgg19_teacher_source"] = out / "vgg.onnx"
        row["vgg19_params_m"] = sum(p.numel() for p in vgg.parameters()) / 1e6
        row["vgg19_gflops"] = torch_gflops(vgg, torch.rand(1, 3, size, size))
    else:
        graphs["vgg19_encoder"] = out / model / manifest["graphs"]["encoder"]["fp32"]
        row["vgg19_params_m"] = sum(p.numel() for p in detector.encoder.parameters()) / 1e6
    return {"row": row, "graphs": graphs}


def _time(sessions: dict[str, Any], size: int, rounds: int, repeats: int) -> dict[str, float]:
    """Median ms per graph, timed in interleaved rounds (load drifts hit every graph alike)."""
    feed = {"image": np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)}
    runs = {k: (lambda s: lambda: s.run(None, feed))(s) for k, s in sessions.items()}
    return interleaved_ms(runs, rounds * repeats, rounds)


def measure(size: int, threads: int, rounds: int, repeats: int, models: tuple[str, ...] = MODELS,
            overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        built = {m: _export(m, size, Path(tmp), overrides or {}) for m in models}
        sessions = {(m, g): ort_session(p, threads) for m, b in built.items() for g, p in b["graphs"].items()}
        flat = _time({f"{m}/{g}": s for (m, g), s in sessions.items()}, size, rounds, repeats)
    rows = []
    for m, b in built.items():
        row = dict(b["row"])
        row.update({f"ort_{g}_ms": flat[f"{m}/{g}"] for g in b["graphs"]})
        vgg_key = next(k for k in row if k.startswith("ort_vgg19"))
        row["vgg19_latency_ratio"] = row[vgg_key] / row["ort_fp32_ms"]
        if m == "students":
            row["vgg19_gflops_ratio"] = row["vgg19_gflops"] / row["gflops"]
            row["vgg19_params_ratio"] = row["vgg19_params_m"] / row["params_m"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[128, 256])
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config fields for every model measured, e.g. 'patch_sizes=[33]' for the students")
    parser.add_argument("--out", default="results/cost_students_rd.json")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.report import write_report

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from edgead.cli import parse_kv

    overrides = parse_kv(args.set)
    rows = [r for size in args.sizes
            for r in measure(size, args.threads, args.rounds, args.repeats, tuple(args.models), overrides)]
    write_report(args.out, {"threads": args.threads, "batch": 1,
                            "note": "ORT CPUExecutionProvider, medians of interleaved rounds on a shared, "
                                    "loaded 2-core machine: compare ratios within one size",
                            "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
