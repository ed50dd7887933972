"""Post-processing on the engine against post-processing on the host, side by side in one run.

    python -m benchmarks.engine_postprocess [--model BUNDLE] [--size 256] [--frames 300]
                                            [--threads N] [--out results/engine_postprocess_cpu.json]

The bundle needs the ``detector_post`` graph (``edgead export --postprocess``); by default one is
built: an SSIM-AE (width 32) at ``--size``, random weights, calibrated on synthetic normal parts
(latency does not depend on training). Rounds alternate four measurements, medians reported:

1. engine only, ``detector`` (raw map) and ``detector_post`` (smoothing and normalisation in the
   graph): what the post-processing costs the engine;
2. the full pipeline (frame in, verdict out, native core when built) with the host smoothing the
   raw map, and with the engine's smoothed map: each against its own engine-only throughput.

On a CPU station both run on the same cores, so the engine's share grows by what the host loses;
the win it is built for is a GPU station, where the smoothing leaves the slow ARM cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.native import machine
from benchmarks.pipeline import engine_only, full_pipeline
from edgead.core.bundle import FUSED
from edgead.core.contract import POSTPROCESS_GRAPH
from edgead.runtime.infer import load_checked_bundle, open_bundle_engine


def build_bundle(root: Path, size: int) -> Path:
    """A calibrated SSIM-AE bundle with ``detector_post``, certified here from its golden outputs."""
    from edgead.certify.parity import certify_golden
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample
    from edgead.export.bundle_writer import export_run
    from edgead.models import create
    from edgead.training.checkpoint import save_run
    from edgead.training.trainer import calibrate_detector

    detector = create("ssim_ae", image_size=size, channels=3, width=32, latent_dim=100).eval()
    val = np.stack([to_model_input(sample("metal", i, size=size, stream="val")[0], size, 3) for i in range(16)])
    save_run(root / "run", detector, {"data": {"layout": "synthetic", "category": "metal"}},
             calibrate_detector(detector, val))
    out = Path(export_run(root / "run", root / "bundle", precisions=["fp32"], postprocess=True, golden_count=32,
                          golden_normal=16))
    certify_golden(out, precisions=("fp32",))
    return out


def _medians(rounds: list[dict[str, Any]], key: str = "fps") -> float:
    return float(np.median([r[key] for r in rounds]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine_postprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="bundle with a detector_post graph (default: build one)")
    p.add_argument("--size", type=int, default=256, help="input side of the built bundle")
    p.add_argument("--frames", type=int, default=300, help="frames per measurement, split over the rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: its own choice)")
    p.add_argument("--out", default="results/engine_postprocess_cpu.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_bundle(Path(tmp), args.size)
        result = measure(model, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def measure(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    graphs = {"host": FUSED, "engine": POSTPROCESS_GRAPH}
    bundles = {where: load_checked_bundle(str(model), "onnxruntime", "fp32", graph=g) for where, g in graphs.items()}
    engines = {where: open_bundle_engine(bundles[where], "onnxruntime", "fp32", args.threads, g)
               for where, g in graphs.items()}
    category = bundles["host"].manifest.get("data", {}).get("category") or "metal"
    eng: dict[str, list[dict[str, Any]]] = {w: [] for w in graphs}
    pipe: dict[str, list[dict[str, Any]]] = {w: [] for w in graphs}
    per_round = max(1, args.frames // args.rounds)
    try:
        for r in range(args.rounds):
            warm = args.warmup if r == 0 else 0
            for where in graphs:
                eng[where].append(engine_only(engines[where], per_round, warm))
                pipe[where].append(full_pipeline(bundles[where], engines[where], category, per_round, warm,
                                                 on_engine=where == "engine"))
    finally:
        for engine in engines.values():
            engine.close()
    rows = {}
    for where in graphs:
        e_fps, e_p50 = _medians(eng[where]), _medians(eng[where], "p50_ms")
        p_fps = _medians(pipe[where])
        rows[where] = {"engine_fps": round(e_fps, 2), "engine_p50_ms": round(e_p50, 3), "pipeline_fps": round(p_fps, 2),
                       "pipeline_ratio": round(p_fps / e_fps, 3),
                       "postprocess_stage_p50_ms": pipe[where][-1]["latency_ms"]["postprocess"]["p50"]}
    shape = list(bundles["host"].input_shape)
    print(f"{bundles['host'].detector} {shape} onnxruntime/fp32, threads {args.threads or 'default'}, "
          f"{args.rounds} rounds x {per_round} frames (medians)")
    print(f"{'smoothing on':<14}{'engine fps':>11}{'engine p50':>11}{'pipe fps':>10}{'pipe/engine':>12}{'post p50':>10}")
    for where, row in rows.items():
        print(f"{where:<14}{row['engine_fps']:>11.1f}{row['engine_p50_ms']:>10.2f}m{row['pipeline_fps']:>10.1f}"
              f"{row['pipeline_ratio']:>12.1%}{row['postprocess_stage_p50_ms']:>9.3f}m")
    added = rows["engine"]["engine_p50_ms"] - rows["host"]["engine_p50_ms"]
    print(f"the post-processing adds {added:.2f} ms to the engine's p50; pipeline fps engine/host "
          f"{rows['engine']['pipeline_fps'] / rows['host']['pipeline_fps']:.2f}x")
    return {"model": str(model), "input_shape": shape, "threads": args.threads, "machine": machine(),
            "frames": per_round * args.rounds, "rounds": args.rounds, "rows": rows,
            "engine_p50_added_ms": round(added, 3),
            "note": "shared, noisy 2-core machine: rounds alternate the four measurements; medians"}


if __name__ == "__main__":
    sys.exit(main())
