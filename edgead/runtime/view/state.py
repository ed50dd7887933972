"""What the station view knows: the newest frame (handed over by the sink thread), the NG strip,
the bundle in use and its banners, and the status every page receives.

Threads: :meth:`Handoff.put` runs in the pipeline's sink thread and only stores references (an
attribute, a deque append) and wakes the server; everything else runs in the server's thread.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Any, Callable

from edgead.core.contract import NG
from edgead.runtime.stats import RunStats

RANGE_WINDOW = 100  # an out-of-range score keeps its banner up for this many frames


@dataclass
class Latest:
    """One frame as the sink got it; ``seq`` counts every frame the view received."""

    seq: int
    frame: Any
    inspection: Any
    fps: float
    record: dict[str, Any]


class Handoff:
    """The sink thread's side: keep the newest frame and the NG parts not yet encoded; wake the
    server only when it is waiting for one."""

    def __init__(self, strip: int, low_score: float | None, count_here: bool) -> None:
        self.latest: Latest | None = None
        self.ng_pending: collections.deque[Latest] = collections.deque(maxlen=strip)  # newest win
        self.frames_in = 0
        self.low_score = low_score  # raw scores below this are outside the calibrated range
        self.out_of_range = 0
        self.last_out_of_range: int | None = None  # seq of the last one
        # Without the pipeline's counters (a sink used outside edgead-run) the view counts what it got.
        self.own_stats = RunStats() if count_here else None
        self.wake: Callable[[], None] = lambda: None
        self.armed = False  # set by the server (before it looks at ``latest``) when a client waits
        self.ng_armed = True  # set by the server when it has no NG part left to encode
        self._wake_pending = False

    def put(self, frame: Any, inspection: Any, fps: float, record: dict[str, Any]) -> None:
        self.frames_in += 1
        item = Latest(self.frames_in, frame, inspection, fps, record)
        self.latest = item
        if inspection.verdict == NG:
            self.ng_pending.append(item)
        score = record.get("score")
        if record.get("out_of_range") or (self.low_score is not None and score is not None and score < self.low_score):
            self.out_of_range += 1
            self.last_out_of_range = item.seq
        if self.own_stats is not None:
            self.own_stats.count_captured(getattr(frame, "t_mono", 0.0))
            self.own_stats.record(inspection.verdict, record.get("latency_ms", {}), record.get("age_ms") or 0.0)
        # Wake the server only when it waits for a frame (armed) or an NG part came; never twice
        # before it has run: at line rate the sink thread makes no syscall for most frames.
        if (self.armed or (self.ng_armed and inspection.verdict == NG)) and not self._wake_pending:
            self.armed = self.ng_armed = False
            self._wake_pending = True
            self.wake()

    def woken(self) -> None:
        self._wake_pending = False

    def out_of_range_recently(self) -> bool:
        last = self.last_out_of_range
        return last is not None and self.frames_in - last < RANGE_WINDOW


@dataclass
class NgEntry:
    frame: int
    record: dict[str, Any]
    image: bytes  # the annotated frame at full size, JPEG
    thumb: bytes

    def links(self) -> dict[str, Any]:
        base = f"/ng/{self.frame}"
        r = self.record
        return {"frame": self.frame, "t_capture": r.get("t_capture"), "score_norm": r.get("score_norm"),
                "regions": len(r.get("regions", [])), "truth": r.get("truth"),
                "image": base + ".jpg", "thumb": base + ".thumb.jpg", "record": base + ".json"}


class NgStrip:
    """The last ``size`` NG parts by frame id, newest first (server thread only)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[int, NgEntry] = {}

    def add(self, entry: NgEntry) -> None:
        self.entries[entry.frame] = entry
        while len(self.entries) > self.size:
            del self.entries[min(self.entries)]

    def get(self, frame: int) -> NgEntry | None:
        return self.entries.get(frame)

    def listing(self) -> list[dict[str, Any]]:
        return [self.entries[f].links() for f in sorted(self.entries, reverse=True)]


# -- the bundle in use ---------------------------------------------------------------------------

def describe_run(run: dict[str, Any]) -> dict[str, Any]:
    """Run facts for the page: bundle, engine, certificate status, calibration and banners.

    The certificate status is the one edgead-run established for this device before the first
    frame (``run["certificate"]``). Start-up warnings (a bundle run with ``--allow-unverified``)
    become banners."""
    info = {k: run.get(k) for k in ("model", "detector", "backend", "precision", "input")}
    certificate = run.get("certificate") or {"status": "unknown", "detail": "no certificate status given"}
    if isinstance(certificate, str):
        certificate = {"status": certificate}
    banners = [{"kind": "unverified", "text": w.removeprefix("WARNING: ")} for w in run.get("warnings") or []]
    if certificate.get("status") not in ("certified", "unknown") and not banners:
        banners.append({"kind": "unverified", "text": f"UNVERIFIED ENGINE: {certificate.get('detail', '')}".strip()})
    calibration = run.get("calibration") or {}
    return {**info, "certificate": certificate, "banners": banners,
            "threshold": calibration.get("image_threshold"), "low_score": low_score(calibration)}


def low_score(calibration: dict[str, Any]) -> float | None:
    """Raw scores below the lowest validation score by more than the validation span: the model
    sees something unlike any part it was calibrated on (a covered lens, no light, wrong input).
    Those frames pass as OK, so the page says so. Scores above the range are NG anyway."""
    try:
        lo, hi = float(calibration["score_min"]), float(calibration["score_max"])
    except (KeyError, TypeError, ValueError):
        return None
    return lo - max(hi - lo, 1e-12)


# -- the status message --------------------------------------------------------------------------

def finite(value: Any) -> Any:
    """NaN/Inf are not JSON: null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def run_counters(stats: Callable[[], dict[str, Any] | None] | None, handoff: Handoff) -> tuple[dict[str, Any], str]:
    """(the RunStats summary, who counted): the pipeline's when the context gives it."""
    if stats is not None:
        summary = stats()
        if summary is not None:
            return summary, "pipeline"
        return RunStats().summary(), "pipeline"  # not started yet
    assert handoff.own_stats is not None
    return handoff.own_stats.summary(), "view"


def last_frame(record: dict[str, Any] | None, threshold: float | None) -> dict[str, Any] | None:
    if record is None:
        return None
    keep = ("frame", "t_capture", "verdict", "score", "score_norm", "age_ms", "truth", "error")
    return {**{k: record[k] for k in keep if k in record}, "regions": len(record.get("regions", [])),
            "threshold": threshold, "threshold_norm": 0.5}
