"""Counters, latency percentiles, ground-truth agreement and the line-rate check of a run.

The accounting invariant every run keeps: ``captured == inspected + dropped + errored``
(inspected = got an OK/NG verdict; errored = ERROR verdict; dropped = overwritten or refused
before inspection). Thread-safe: the capture thread and the sink thread both count.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgead.core.contract import ERROR, NG

STAGES = ("preprocess", "infer", "postprocess", "sink")
WINDOW = 10_000  # percentiles cover the most recent frames, so a station running for days stays bounded


class LatencyWindow:
    """The last ``WINDOW`` values of one latency (ms); p50/p99/mean on demand."""

    def __init__(self, size: int = WINDOW) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        self.values.append(ms)

    def summary(self) -> dict[str, float]:
        if not self.values:
            return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan"), "n": 0}
        v = np.fromiter(self.values, dtype=np.float64)
        return {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3),
                "mean": round(float(v.mean()), 3), "n": int(v.size)}


@dataclass
class GroundTruth:
    """Image-level confusion of the verdicts against the source's labels (synthetic sources).

    NG is the positive class. ERROR frames are not inspected and are left out here (they are
    counted in ``errored``). ``localized`` counts true NG whose defect region overlaps the mask.
    """

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    localized: int = 0

    def add(self, defective: bool, verdict_ng: bool, localized: bool = False) -> None:
        if defective and verdict_ng:
            self.tp += 1
            self.localized += int(localized)
        elif defective:
            self.fn += 1
        elif verdict_ng:
            self.fp += 1
        else:
            self.tn += 1

    def summary(self) -> dict[str, Any]:
        n = self.tp + self.fp + self.tn + self.fn

        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 4) if b else None

        return {"frames": n, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "accuracy": ratio(self.tp + self.tn, n), "precision": ratio(self.tp, self.tp + self.fp),
                "recall": ratio(self.tp, self.tp + self.fn),
                "false_reject_rate": ratio(self.fp, self.fp + self.tn),
                "localized": ratio(self.localized, self.tp)}


@dataclass
class RunStats:
    """Everything the summary reports; updated from several threads under one lock."""

    captured: int = 0
    inspected: int = 0
    dropped: int = 0
    errored: int = 0
    ng: int = 0
    reconnects: int = 0
    started: float = field(default_factory=time.monotonic)
    first_capture: float | None = None
    last_result: float | None = None
    stages: dict[str, LatencyWindow] = field(default_factory=lambda: {s: LatencyWindow() for s in STAGES})
    end_to_end: LatencyWindow = field(default_factory=LatencyWindow)
    truth: GroundTruth | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- counting -------------------------------------------------------------------------------
    def count_captured(self, t_mono: float) -> None:
        with self._lock:
            self.captured += 1
            if self.first_capture is None:
                self.first_capture = t_mono

    def count_dropped(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n

    def count_reconnect(self) -> None:
        with self._lock:
            self.reconnects += 1

    def record(self, verdict: str, latency_ms: dict[str, float], e2e_ms: float,
               defective: bool | None = None, localized: bool = False) -> None:
        """One frame that reached the end of the pipeline (OK, NG or ERROR)."""
        with self._lock:
            self.last_result = time.monotonic()
            if verdict == ERROR:
                self.errored += 1
            else:
                self.inspected += 1
                self.ng += int(verdict == NG)
                if defective is not None:
                    self.truth = self.truth or GroundTruth()
                    self.truth.add(defective, verdict == NG, localized)
            for stage, ms in latency_ms.items():
                if stage in self.stages:
                    self.stages[stage].add(ms)
            self.end_to_end.add(e2e_ms)

    def merge(self, other: "RunStats") -> None:
        """Add another run's counts and latencies (the benchmark pools its rounds)."""
        with self._lock:
            for name in ("captured", "inspected", "dropped", "errored", "ng", "reconnects"):
                setattr(self, name, getattr(self, name) + getattr(other, name))
            for stage, window in other.stages.items():
                self.stages[stage].values.extend(window.values)
            self.end_to_end.values.extend(other.end_to_end.values)

    # -- reporting ------------------------------------------------------------------------------
    @property
    def balanced(self) -> bool:
        return self.captured == self.inspected + self.dropped + self.errored

    def throughput(self) -> float:
        """Frames out of the pipeline per second, from the first capture to the last result."""
        if self.first_capture is None or self.last_result is None:
            return 0.0
        span = self.last_result - self.first_capture
        done = self.inspected + self.errored
        return done / span if span > 0 else 0.0

    def summary(self, line_rate: float | None = None, saturated: bool = False) -> dict[str, Any]:
        with self._lock:
            stages = {name: w.summary() for name, w in self.stages.items()}
            e2e = self.end_to_end.summary()
            out: dict[str, Any] = {
                "frames": {"captured": self.captured, "inspected": self.inspected,
                           "dropped": self.dropped, "errored": self.errored, "ng": self.ng,
                           "ok": self.inspected - self.ng},
                "balanced": self.balanced,
                "fps": round(self.throughput(), 2),
                "wall_s": round(time.monotonic() - self.started, 3),
                "latency_ms": {**stages, "end_to_end": e2e},
                "reconnects": self.reconnects,
            }
            if self.truth is not None:
                out["ground_truth"] = self.truth.summary()
        if line_rate:
            out["line_rate"] = line_rate_check(line_rate, out["fps"], stages, e2e, saturated, self.dropped)
        return out


def line_rate_check(rate_hz: float, fps: float, stages: dict[str, dict[str, float]],
                    e2e: dict[str, float], saturated: bool, dropped: int) -> dict[str, Any]:
    """Does the station keep up with ``rate_hz`` parts per second?

    Two conditions, both measured on the frames just processed: capacity >= rate (throughput)
    and p99 end-to-end latency <= the period (each verdict is out before the next part arrives).
    Capacity is the measured throughput when the pipeline was saturated (unpaced source or drops),
    otherwise an estimate from the slowest stage's mean time, because a paced source only shows
    its own rate.
    """
    period_ms = 1000.0 / rate_hz
    if saturated or dropped:
        capacity, basis = fps, "measured throughput (saturated pipeline)"
    else:
        means = [s["mean"] for s in stages.values() if s.get("n")]
        slowest = max(means) if means else float("nan")
        capacity = 1000.0 / slowest if slowest and slowest > 0 else float("nan")
        basis = "estimated from the slowest stage's mean time (source was paced below capacity)"
    p99 = e2e.get("p99", float("nan"))
    keeps_up = bool(np.isfinite(capacity) and capacity >= rate_hz and np.isfinite(p99) and p99 <= period_ms)
    return {
        "rate_hz": rate_hz, "period_ms": round(period_ms, 3), "keeps_up": keeps_up,
        "capacity_fps": round(float(capacity), 2), "capacity_basis": basis,
        "throughput_headroom": round(float(capacity / rate_hz - 1.0), 3) if np.isfinite(capacity) else None,
        "p99_end_to_end_ms": p99,
        "latency_headroom": round(float(1.0 - p99 / period_ms), 3) if np.isfinite(p99) else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human-readable block for the terminal."""
    f = summary["frames"]
    lines = [
        f"frames: captured {f['captured']} = inspected {f['inspected']} + dropped {f['dropped']} "
        f"+ errored {f['errored']}" + ("" if summary["balanced"] else "  (UNBALANCED!)"),
        f"verdicts: OK {f['ok']}  NG {f['ng']}  ERROR {f['errored']}    throughput {summary['fps']:.1f} fps",
        "latency ms      p50      p99",
    ]
    for name, s in summary["latency_ms"].items():
        lines.append(f"  {name:<12}{s['p50']:>8.2f} {s['p99']:>8.2f}")
    gt = summary.get("ground_truth")
    if gt:
        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}%"
        lines.append(f"vs ground truth ({gt['frames']} frames): accuracy {pct(gt['accuracy'])}  "
                     f"precision {pct(gt['precision'])}  recall {pct(gt['recall'])}  "
                     f"false rejects {pct(gt['false_reject_rate'])}  (TP {gt['tp']} FP {gt['fp']} "
                     f"TN {gt['tn']} FN {gt['fn']})")
    lr = summary.get("line_rate")
    if lr:
        def signed(v: float | None) -> str:
            return "n/a" if v is None else f"{v:+.0%}"
        state = "KEEPS UP" if lr["keeps_up"] else "DOES NOT KEEP UP"
        lines.append(f"line rate {lr['rate_hz']:g} Hz (period {lr['period_ms']:.1f} ms): {state}")
        lines.append(f"  throughput: capacity {lr['capacity_fps']:.1f} fps, headroom {signed(lr['throughput_headroom'])} "
                     f"({lr['capacity_basis']})")
        lines.append(f"  latency: p99 end-to-end {lr['p99_end_to_end_ms']:.1f} ms, headroom "
                     f"{signed(lr['latency_headroom'])} of the period")
    return "\n".join(lines)
