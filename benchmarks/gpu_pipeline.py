"""The station pipeline on a CUDA GPU without TensorRT: the runtime's five stages driving
:class:`edgead.training.reference.TorchCudaEngine`, which moves data with the same ``CudaSlots``
code as the TensorRT engine (pinned host buffers, cudaMemcpyAsync, one stream per slot).

    python -m benchmarks.gpu_pipeline --model ssim_ae --size 256 --frames 600

Measures, in one run: engine-only and full-pipeline throughput with 1 slot (serial) and 2 slots
(frame N+1 uploaded and pre-processed while frame N computes), end-to-end p50/p99 and the
pipeline/engine ratio. The detector is random-initialised (throughput does not depend on the
weights); its calibration comes from conveyor frames without defects, as a run's would. Needs
torch with CUDA and cuda-python; exits 0 with a message without them (the same check as
``gpu_stream_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from benchmarks.gpu_stream_check import missing_gpu_stack
from edgead.core.machine import describe


def _calibration(detector: Any, category: str, size: int):
    import torch

    from edgead.core.calibration import calibrate
    from edgead.data.images import to_model_input
    from edgead.data.synth import Conveyor
    from edgead.core.postprocess import smooth

    conveyor = Conveyor(category, size=size, seed=7, defect_rate=0.0)
    images = np.stack([to_model_input(conveyor[i][0], size, 3) for i in range(16)])
    with torch.no_grad():
        scores, maps = detector(torch.from_numpy(images).to(detector.device))
    return calibrate(scores.cpu().numpy(), smooth(maps[:, 0].cpu().numpy()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ssim_ae")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--category", default="washer")
    p.add_argument("--frames", type=int, default=600)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--no-cuda-graph", action="store_true")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_pipeline.json"))
    args = p.parse_args(argv)
    missing = missing_gpu_stack()
    if missing:
        print(f"gpu_pipeline: {missing}; nothing measured")
        return 0
    import torch

    from benchmarks.pipeline import engine_only, full_pipeline
    from edgead.core.engine import TensorSpec
    from edgead.training.reference import TorchCudaEngine
    from edgead.models import create

    warnings.simplefilter("ignore")
    config = {"image_size": args.size, **({"width": args.width} if args.width else {})}
    detector = create(args.model, **config).cuda().eval()
    shapes = detector.component_shapes()
    inputs = [TensorSpec("image", shapes["image"])]
    outputs = [TensorSpec("score", shapes["score"]), TensorSpec("anomaly_map", shapes["anomaly_map"])]
    bundle = SimpleNamespace(input_shape=shapes["image"], manifest={"postprocess": {}},
                             calibration=_calibration(detector, args.category, args.size))
    rows: dict[str, Any] = {}
    for slots in (1, 2):
        engine = TorchCudaEngine(detector, inputs, outputs, num_slots=slots, cuda_graph=not args.no_cuda_graph)
        try:
            eng = engine_only(engine, args.frames, args.warmup)
            pipe = full_pipeline(bundle, engine, args.category, args.frames, args.warmup)
        finally:
            engine.close()
        lat = pipe["latency_ms"]
        rows[f"{slots}-slot"] = {"engine_fps": round(eng["fps"], 1), "pipeline_fps": round(pipe["fps"], 1),
                                 "ratio": round(pipe["fps"] / eng["fps"], 3),
                                 "e2e_p50_ms": lat["end_to_end"]["p50"], "e2e_p99_ms": lat["end_to_end"]["p99"],
                                 "stages_p50_ms": {k: v["p50"] for k, v in lat.items() if k != "end_to_end"},
                                 "frames": pipe["frames"]}
    result = {"device": torch.cuda.get_device_name(0), "model": args.model, "size": args.size,
              "cuda_graph": not args.no_cuda_graph, "host": describe(), "rows": rows}
    print(f"{args.model} {args.size}² on {result['device']} (TorchCudaEngine, CUDA graph {result['cuda_graph']})")
    print(f"{'':<8}{'engine fps':>11}{'pipeline fps':>13}{'ratio':>7}{'e2e p50':>9}{'e2e p99':>9}")
    for name, r in rows.items():
        print(f"{name:<8}{r['engine_fps']:>11.1f}{r['pipeline_fps']:>13.1f}{r['ratio']:>7.2f}"
              f"{r['e2e_p50_ms']:>9.2f}{r['e2e_p99_ms']:>9.2f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
