"""Per-frame preprocess and postprocess time: the native core against the NumPy/OpenCV path.

    python -m benchmarks.native [--repeats 30] [--out results/native_cpu.json]

For camera frames of 640x480, 1280x720 and 1920x1080 (BGR uint8) into model inputs / maps of 128²
and 256², both paths run side by side in one process, interleaved call by call, so a busy machine
slows both alike; the table reports medians and their ratio (Python / native). OpenCV keeps its
default thread count, as the runtime runs it; the native core is single-threaded. CPU time per call
(process time: OpenCV's helper threads included) is reported beside wall time: the CPU-time ratio is
the cost in core time, the wall ratio the latency as the runtime sees it.

Postprocess rows time what the pipeline's stage 4 does per frame: smoothing with the calibration's
sigma, resize to the frame, threshold, regions. The native core does not write the frame-sized map
unless a sink asks for it; ``native+map`` also materialises it (what a display or NG-saving sink
costs). Every JSON records the CPU model and its ISA flags. No torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from edgead.core.calibration import Calibration
from edgead.core.machine import describe
from edgead.runtime import native
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.preprocess import Preprocessor

FRAMES = ((480, 640), (720, 1280), (1080, 1920))
SIZES = (128, 256)
def machine() -> dict[str, Any]:
    """edgead.core.machine.describe() (CPU model, ISA flags, cores) plus what else a per-frame time
    depends on here: the load, numpy, OpenCV and its threads, the native build."""
    try:
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        load = None
    return {**describe(), "loadavg_1_5_15": load, "numpy": np.__version__, "opencv": cv2.__version__,
            "opencv_threads": cv2.getNumThreads(),
            "native": (native.module().build_info() if native.module() else native.reason())}


def _time_pair(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU milliseconds of each call, the calls interleaved round by round."""
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():  # warm caches, allocators and the start-up checks
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(1e3 * (time.perf_counter() - t0))
            cpu[name].append(1e3 * (time.process_time() - c0))
    return {k: {"wall_ms": float(np.median(wall[k])), "cpu_ms": float(np.median(cpu[k]))} for k in calls}


def _map_with_defect(size: int, rng: np.random.Generator) -> np.ndarray:
    """A plausible anomaly map: smooth low background plus one defect blob."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amap = cv2.GaussianBlur(rng.random((size, size), dtype=np.float32), (0, 0), 2.0) * 0.3
    cy, cx, r = 0.4 * size, 0.6 * size, 0.05 * size
    return (amap + np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))).astype(np.float32)


def run(repeats: int) -> list[dict[str, Any]]:
    if native.module() is None:
        raise SystemExit(f"benchmarks.native: the native core is not available ({native.reason()})")
    rng = np.random.default_rng(0)
    cal = Calibration(image_threshold=0.5, score_min=0.0, score_max=1.0, pixel_threshold=0.6, map_min=0.0,
                      map_max=1.2, n_images=30, quantile=0.99, pixel_quantile=0.999, sigma=4.0)
    post_py, post_nat = Postprocessor(cal, use_native=False), Postprocessor(cal)
    rows = []
    for height, width in FRAMES:
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for size in SIZES:
            pre_py, pre_nat = Preprocessor(size, 3, use_native=False), Preprocessor(size, 3)
            if not (pre_nat.native and post_nat.native):
                raise SystemExit("benchmarks.native: the native core failed its start-up check here")
            out = np.zeros((1, 3, size, size), np.float32)[0]
            amap = _map_with_defect(size, rng)
            pre = _time_pair({"python": lambda: pre_py.into(frame, out), "native": lambda: pre_nat.into(frame, out)},
                             repeats)
            post = _time_pair({"python": lambda: post_py(0.9, amap, (height, width)),
                               "native": lambda: post_nat(0.9, amap, (height, width)),
                               "native+map": lambda: post_nat(0.9, amap, (height, width)).frame_map}, repeats)
            rows.append({"frame": [width, height], "size": size, "preprocess": pre, "postprocess": post,
                         "preprocess_ratio": _ratios(pre, "native"), "postprocess_ratio": _ratios(post, "native"),
                         "postprocess_with_map_ratio": _ratios(post, "native+map")})
            _print_row(rows[-1])
    return rows


def _ratios(timings: dict[str, dict[str, float]], key: str) -> dict[str, float]:
    return {k: round(timings["python"][k] / max(timings[key][k], 1e-9), 2) for k in ("wall_ms", "cpu_ms")}


def _print_row(row: dict[str, Any]) -> None:
    pre, post = row["preprocess"], row["postprocess"]
    print(f"{row['frame'][0]:>4}x{row['frame'][1]:<4} -> {row['size']:>3}² | "
          f"pre py {pre['python']['wall_ms']:6.3f} nat {pre['native']['wall_ms']:6.3f} "
          f"x{row['preprocess_ratio']['wall_ms']:5.1f} (cpu x{row['preprocess_ratio']['cpu_ms']:4.1f}) | "
          f"post py {post['python']['wall_ms']:7.3f} nat {post['native']['wall_ms']:6.3f} "
          f"x{row['postprocess_ratio']['wall_ms']:5.1f} (+map {post['native+map']['wall_ms']:6.3f} "
          f"x{row['postprocess_with_map_ratio']['wall_ms']:5.1f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.native", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds per measurement (medians)")
    p.add_argument("--out", default="results/native_cpu.json")
    args = p.parse_args(argv)
    before = machine()
    print(f"{before['cpu']}, {before['cores']} cores, load {before['loadavg_1_5_15']}, OpenCV {cv2.__version__} "
          f"({cv2.getNumThreads()} threads), native {before['native']}")
    print("wall-clock medians in ms, ratio = Python / native (target >= 5x); cpu = process CPU time ratio")
    rows = run(args.repeats)
    result = {"machine": before, "loadavg_after": machine()["loadavg_1_5_15"], "repeats": args.repeats,
              "target_ratio": 5.0, "rows": rows,
              "note": "shared, noisy machine: side-by-side medians; the lead re-runs final numbers"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
