"""Check the CUDA slot machinery on a GPU without TensorRT: serial (1 slot) vs overlapped (2 slots).

Runs :class:`edgead.training.reference.TorchCudaEngine`, which moves data with the same
``CudaSlots`` code (pinned buffers, cudaMemcpyAsync, one stream + events per slot) as the
TensorRT engine, and reports:

- FPS with 1 slot (upload, compute, download, wait, then the next frame) and with 2 slots
  (frame N+1 is uploaded while frame N computes);
- per-stage H2D / compute / D2H milliseconds from CUDA events (median, p99);
- the overlap ratio: the share of each frame's GPU time (first H2D to last D2H, event timeline)
  that overlaps the previous frame's (about 0 when serial), and the GPU busy ratio: when it is low
  the host (Python launching eager kernels) is the bottleneck and there is little to overlap;
  raise --width to make the GPU the bottleneck;
- the max abs error of every output against the plain torch result for the same frame.

    python benchmarks/gpu_stream_check.py --size 256 --frames 500

Writes JSON to --out (default $OUT/gpu_stream.json when OUT is set). Exits 0 with a message when
there is no CUDA GPU, torch or cuda-python; exits 1 when the outputs disagree with torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def missing_gpu_stack() -> str | None:
    """Why the CUDA slot path can't run here (no torch, no GPU, no cuda-python), or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available (needs an NVIDIA GPU)"
    try:
        import cuda.bindings.runtime  # noqa: F401
    except ImportError:
        return "cuda-python is not installed (pip install cuda-python)"
    return None


def stand_in_model(channels: int = 3, width: int = 32) -> Any:
    """A small conv autoencoder with the detector contract: image -> (score (B,), map (B,1,H,W))."""
    from torch import nn

    class ConvAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            act = nn.LeakyReLU(0.2)
            self.encoder = nn.Sequential(
                nn.Conv2d(channels, width, 4, 2, 1), act,
                nn.Conv2d(width, width * 2, 4, 2, 1), nn.BatchNorm2d(width * 2), act,
                nn.Conv2d(width * 2, width * 4, 4, 2, 1), nn.BatchNorm2d(width * 4), act,
            )
            self.decoder = nn.Sequential(
                nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1), nn.BatchNorm2d(width * 2), nn.ReLU(),
                nn.ConvTranspose2d(width * 2, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Sigmoid(),
            )

        def forward(self, image: Any) -> tuple[Any, Any]:
            recon = self.decoder(self.encoder(image))
            anomaly_map = (image - recon).abs().mean(dim=1, keepdim=True)
            return anomaly_map.flatten(1).mean(dim=1), anomaly_map

    return ConvAE()


def build_model(name: str, size: int, width: int) -> tuple[Any, str]:
    """A registered detector when edgead.models has it, else the stand-in."""
    if name != "standin":
        try:
            from edgead.models import create

            return create(name, image_size=size), name
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the stand-in
            print(f"note: detector {name!r} unavailable ({type(exc).__name__}: {exc}); using the stand-in conv AE")
    return stand_in_model(width=width), f"standin-conv-ae-w{width}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def overlap_stats(timeline: list[tuple[float, float, float, float]]) -> dict[str, float]:
    """From per-frame (start, h2d end, compute end, d2h end) event times: the share of each frame's
    GPU span that overlaps the previous frame's, the share of uploads hidden under the previous
    frame's compute, and how busy the GPU was (union of spans / elapsed; low = host-bound)."""
    spans = [t[3] - t[0] for t in timeline]
    busy, reach = 0.0, float("-inf")
    for t in sorted(timeline):
        busy += max(0.0, t[3] - max(t[0], reach))
        reach = max(reach, t[3])
    elapsed = max(t[3] for t in timeline) - min(t[0] for t in timeline)
    both = h2d_hidden = h2d_total = 0.0
    for prev, cur in zip(timeline, timeline[1:]):
        both += max(0.0, min(cur[3], prev[3]) - max(cur[0], prev[0]))
        # this frame's upload while the previous frame computes
        h2d_hidden += max(0.0, min(cur[1], prev[2]) - max(cur[0], prev[1]))
        h2d_total += cur[1] - cur[0]
    return {
        "overlap_ratio": both / sum(spans[1:]) if len(spans) > 1 and sum(spans[1:]) > 0 else 0.0,
        "h2d_under_compute_ratio": h2d_hidden / h2d_total if h2d_total > 0 else 0.0,
        "gpu_busy_ratio": busy / elapsed if elapsed > 0 else 0.0,
    }


def run_pipeline(engine: Any, frames: list[np.ndarray], refs: list[dict[str, np.ndarray]], n: int,
                 origin: Any | None = None) -> dict[str, Any]:
    """Push n frames through engine's slots round robin; one synchronize per enqueue, oldest first."""
    slots = engine.num_slots
    pending: deque[tuple[int, int]] = deque()
    stages: dict[str, list[float]] = {"h2d_ms": [], "compute_ms": [], "d2h_ms": [], "host_enqueue_ms": []}
    timeline: list[tuple[float, float, float, float]] = []
    max_err = 0.0

    def finish() -> None:
        nonlocal max_err
        i, slot = pending.popleft()
        out = engine.synchronize(slot)
        for name, ref in refs[i % len(refs)].items():
            max_err = max(max_err, float(np.max(np.abs(out[name] - ref))))
        for stage, ms in engine.last_timings(slot).items():
            stages[stage].append(ms)
        if origin is not None:
            timeline.append(engine.timeline(slot, origin))

    start = time.perf_counter()
    for i in range(n):
        slot = i % slots
        if len(pending) == slots:  # the slot we are about to reuse holds the oldest frame
            finish()
        np.copyto(engine.host_inputs(slot)["image"], frames[i % len(frames)])
        t0 = time.perf_counter()
        engine.enqueue(slot)  # host time to queue H2D + kernels + D2H
        stages["host_enqueue_ms"].append((time.perf_counter() - t0) * 1e3)
        pending.append((i, slot))
    while pending:
        finish()
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"slots": slots, "frames": n, "wall_s": wall, "fps": n / wall, "max_abs_err": max_err}
    for stage, values in stages.items():
        result[stage] = {"median": percentile(values, 50), "p99": percentile(values, 99)}
    if timeline:
        result.update(overlap_stats(timeline))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--model", default="standin", help="a registered detector name, or 'standin'")
    parser.add_argument("--width", type=int, default=32, help="channels of the stand-in's first conv")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay a CUDA graph per slot: one launch per frame, like TensorRT's execute_async_v3")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs error allowed against torch")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_stream.json") if os.environ.get("OUT") else None)

    missing = missing_gpu_stack()
    if missing:
        print(f"gpu_stream_check: {missing}; nothing measured")
        return 0
    import torch
    from edgead.engines import cuda_rt
    from edgead.core.engine import TensorSpec
    from edgead.training.reference import TorchCudaEngine

    torch.manual_seed(0)
    model, model_name = build_model(args.model, args.size, args.width)
    model = model.cuda().eval()
    rng = np.random.default_rng(0)
    frames = [rng.random((1, 3, args.size, args.size), dtype=np.float32) for _ in range(8)]
    names = ("score", "anomaly_map")
    refs = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=args.precision == "fp16"):
        for frame in frames:  # plain torch on the default stream: the reference
            result = model(torch.from_numpy(frame).cuda())
            refs.append({n: t.float().cpu().numpy() for n, t in zip(names, result)})
    inputs = [TensorSpec("image", (1, 3, args.size, args.size))]
    outputs = [TensorSpec(n, tuple(refs[0][n].shape)) for n in names]

    origin_stream = cuda_rt.Stream()
    origin = cuda_rt.Event()
    origin.record(origin_stream)
    origin_stream.synchronize()

    results: dict[str, Any] = {}
    for label, slots in (("serial", 1), ("overlapped", 2)):
        engine = TorchCudaEngine(model, inputs, outputs, num_slots=slots, precision=args.precision, cuda_graph=args.cuda_graph)
        try:
            run_pipeline(engine, frames, refs, args.warmup)
            results[label] = run_pipeline(engine, frames, refs, args.frames, origin)
        finally:
            engine.close()

    ser, ovl = results["serial"], results["overlapped"]
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda_python": _version("cuda-python") or _version("cuda-bindings"),
        "python": platform.python_version(),
        "model": model_name, "size": args.size, "frames": args.frames, "precision": args.precision,
        "cuda_graph": args.cuda_graph,
        "results": results,
        "speedup": ovl["fps"] / ser["fps"],
        "max_abs_err": max(ser["max_abs_err"], ovl["max_abs_err"]),
        "tolerance": args.tolerance,
    }
    report["outputs_match_torch"] = report["max_abs_err"] <= args.tolerance

    mode = "CUDA graph" if args.cuda_graph else "eager"
    print(f"{report['device']} | {model_name} {args.size}x{args.size} {args.precision} {mode} | {args.frames} frames")
    print(f"{'mode':<11}{'slots':>6}{'FPS':>9}{'h2d med/p99 ms':>18}{'compute med/p99':>18}{'d2h med/p99':>16}"
          f"{'enqueue med':>13}{'overlap':>9}{'gpu busy':>10}{'max err':>10}")
    for label, r in results.items():
        cells = [f"{r[s]['median']:.3f}/{r[s]['p99']:.3f}" for s in ("h2d_ms", "compute_ms", "d2h_ms")]
        print(f"{label:<11}{r['slots']:>6}{r['fps']:>9.1f}{cells[0]:>18}{cells[1]:>18}{cells[2]:>16}"
              f"{r['host_enqueue_ms']['median']:>13.3f}{r.get('overlap_ratio', 0.0):>9.2f}"
              f"{r.get('gpu_busy_ratio', 0.0):>10.2f}{r['max_abs_err']:>10.2e}")
    print(f"speedup {report['speedup']:.2f}x; outputs match torch: {report['outputs_match_torch']}")
    if out:
        from edgead.core.machine import describe

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({**report, "host": describe()}, indent=2))
        print(f"wrote {out}")
    origin.destroy()
    origin_stream.destroy()
    return 0 if report["outputs_match_torch"] else 1


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
