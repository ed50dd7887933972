"""Soak: many frames through the full station pipeline, headless, watching memory and tail latency.

    python -m benchmarks.soak [--model BUNDLE] [--frames 100000] [--threads 1] [--out results/soak_cpu.json]

The source is the synthetic conveyor (``synthetic://CATEGORY``, every frame rendered, read on
demand, ``block`` policy so every frame is inspected); the sink stage writes the JSONL log to a
temporary file, as a station does. Every ``--rss-every`` frames (5,000) it records the process's
resident memory, its open file descriptors and threads; every ``--window`` frames (10,000) the
end-to-end latency p50/p99/max of that window. Targets: RSS growth under 5% from the end of the
warm-up (``--warmup``, the first 10,000 frames: latency windows fill, allocator arenas settle) to the
end, and a stable p99 (reported as the spread of the per-window p99 after the warm-up). Latency
on a shared machine is noisy; memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgead.core.machine import describe
from edgead.runtime.infer import describe_engine, load_checked_bundle, open_bundle_engine
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.sources import InputOptions, open_source
from edgead.runtime.stats import RunStats


def rss_mb() -> float:
    """Resident set size now (not the peak), from /proc; the peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class SoakStats(RunStats):
    """RunStats that also samples memory and per-window end-to-end latency as frames finish."""

    def __init__(self, rss_every: int, window: int, progress: bool = True) -> None:
        super().__init__()
        self.rss_every, self.window, self.progress = rss_every, window, progress
        self._e2e = np.empty(window, np.float64)
        self.samples: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self._t0 = time.monotonic()
        self._cpu0 = time.process_time()

    def record(self, verdict: str, latency_ms: dict[str, float], e2e_ms: float,
               defective: bool | None = None, localized: bool = False) -> None:
        super().record(verdict, latency_ms, e2e_ms, defective, localized)
        done = self.inspected + self.errored  # only the sink thread calls record()
        self._e2e[(done - 1) % self.window] = e2e_ms
        if done % self.window == 0:
            w = self._e2e
            self.windows.append({"frames": done, "p50_ms": round(float(np.percentile(w, 50)), 3),
                                 "p99_ms": round(float(np.percentile(w, 99)), 3), "max_ms": round(float(w.max()), 3)})
        if done % self.rss_every == 0:
            sample = {"frames": done, "rss_mb": round(rss_mb(), 2), "fds": open_fds(),
                      "threads": threading.active_count(), "wall_s": round(time.monotonic() - self._t0, 1),
                      "cpu_s": round(time.process_time() - self._cpu0, 1)}
            self.samples.append(sample)
            if self.progress:
                print(f"  {done:>7} frames  RSS {sample['rss_mb']:8.1f} MB  fds {sample['fds']}  "
                      f"threads {sample['threads']}  {sample['wall_s']:.0f} s", flush=True)


def analyse(samples: list[dict[str, Any]], windows: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """RSS growth after the warm-up and the spread of the windows' p99."""
    after = [s for s in samples if s["frames"] >= warmup]
    growth = None
    if len(after) >= 2:
        growth = (after[-1]["rss_mb"] - after[0]["rss_mb"]) / after[0]["rss_mb"]
    p99 = [w["p99_ms"] for w in windows if w["frames"] > warmup]
    return {
        "warmup_frames": warmup,
        "rss_mb_at_warmup": after[0]["rss_mb"] if after else None,
        "rss_mb_at_end": after[-1]["rss_mb"] if after else None,
        "rss_mb_max_after_warmup": max((s["rss_mb"] for s in after), default=None),
        "rss_growth_after_warmup": None if growth is None else round(growth, 4),
        "rss_growth_ok": None if growth is None else bool(growth < 0.05),
        "p99_ms_after_warmup": {"min": min(p99, default=None), "median": float(np.median(p99)) if p99 else None,
                                "max": max(p99, default=None),
                                "max_over_median": round(max(p99) / float(np.median(p99)), 3) if p99 else None},
        "fds_seen": sorted({s["fds"] for s in after if s["fds"] is not None}),
        "threads_seen": sorted({s["threads"] for s in after}),  # the last sample may see stages ended
    }


def _default_model() -> str:
    from edgead.runtime.demo import build_bundle, cache_dir

    root, _ = build_bundle(cache_dir(), lambda *a: print(*a, file=sys.stderr))
    return str(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="bundle (default: the demo bundle)")
    p.add_argument("--category", default="metal", help="synthetic conveyor category (default metal)")
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--rss-every", type=int, default=5_000)
    p.add_argument("--window", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--out", default="results/soak_cpu.json")
    args = p.parse_args(argv)

    bundle = load_checked_bundle(args.model or _default_model(), "onnxruntime", "fp32",
                                 warn=lambda m: print(m, file=sys.stderr))
    engine = open_bundle_engine(bundle, "onnxruntime", "fp32", args.threads)
    size = int(bundle.input_shape[-1])
    source = open_source(f"synthetic://{args.category}?size={size}&seed=1&defect_rate=0.3", InputOptions())
    source.open()
    stats = SoakStats(args.rss_every, args.window)
    print(f"soak: {bundle.detector} {size}px, {args.frames} frames of synthetic://{args.category}, "
          f"ORT {args.threads} thread(s), RSS {rss_mb():.1f} MB before the first frame", flush=True)
    started, cpu0 = time.monotonic(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        log = JsonlLog(Path(tmp) / "log.jsonl")
        pipe = Pipeline(source, engine, Postprocessor(bundle.calibration), [], log,
                        PipelineConfig(policy="block", max_frames=args.frames), stats=stats)
        result = pipe.run()
        log_bytes = (Path(tmp) / "log.jsonl").stat().st_size
        log.close()
    engine.close()
    verdict = analyse(stats.samples, stats.windows, args.warmup)
    out = {"machine": describe(), "model": str(bundle.root), "engine": describe_engine(engine),
           "input_size": size, "frames": args.frames, "threads": args.threads, "nice": os.nice(0),
           "wall_s": round(time.monotonic() - started, 1), "cpu_s": round(time.process_time() - cpu0, 1),
           "log_mb": round(log_bytes / 2**20, 1), "summary": result.summary, "fatal": result.fatal,
           "rss": stats.samples, "latency_windows": stats.windows, "verdict": verdict}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"RSS {verdict['rss_mb_at_warmup']} -> {verdict['rss_mb_at_end']} MB after warm-up "
          f"(growth {verdict['rss_growth_after_warmup']}, target < 0.05); p99 per window after warm-up "
          f"{verdict['p99_ms_after_warmup']}; open fds seen {verdict['fds_seen']}")
    print(f"wrote {args.out}")
    return 0 if result.fatal is None and result.summary["balanced"] else 1


if __name__ == "__main__":
    sys.exit(main())
