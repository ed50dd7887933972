"""The pieces the pipeline's stages pass around: frames, jobs, bounded queues and settings."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgead.runtime.postprocess_stage import Inspection
from edgead.runtime.sources import Truth

POLICIES = ("latest", "block")


# -- the unit of work ----------------------------------------------------------------------------

@dataclass
class Frame:
    """One captured frame: id, pixels as delivered, capture time (monotonic for ages, wall for
    the log), from synthetic sources the ground truth, and where it came from (``origin``: see
    :mod:`edgead.runtime.sources`). ``image`` is None for a frame that could not be read (an
    unreadable file): its verdict is ERROR."""

    id: int
    image: np.ndarray | None
    t_mono: float
    t_wall: float
    truth: Truth | None = None
    origin: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    frame: Frame
    marks: dict[str, float] = field(default_factory=dict)
    slot: int | None = None
    score: float = float("nan")
    anomaly_map: np.ndarray | None = None
    error: str | None = None
    inspection: Inspection | None = None

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def latency_ms(self) -> dict[str, float]:
        m, out = self.marks, {}
        for stage in ("preprocess", "infer", "postprocess", "sink"):
            if f"{stage}_start" in m and f"{stage}_end" in m:
                out[stage] = round(1000.0 * (m[f"{stage}_end"] - m[f"{stage}_start"]), 3)
        return out


# -- a bounded queue that can drop the oldest and be closed --------------------------------------

CLOSED = object()  # what get() returns once a queue is closed and empty


class StageQueue:
    """Bounded FIFO between two stages. ``put`` blocks when full, or with ``drop_oldest`` evicts
    and returns the oldest item. After ``close`` puts are refused (the item is returned) and
    ``get`` drains what is left, then returns :data:`CLOSED`."""

    def __init__(self, capacity: int, drop_oldest: bool = False) -> None:
        self.capacity, self.drop_oldest = capacity, drop_oldest
        self.items: collections.deque[Any] = collections.deque()
        self.closed = False
        self.cond = threading.Condition()

    def put(self, item: Any) -> Any | None:
        """Returns None when queued, else the item that was dropped or refused."""
        with self.cond:
            while not self.drop_oldest and len(self.items) >= self.capacity and not self.closed:
                self.cond.wait()
            if self.closed:
                return item
            evicted = self.items.popleft() if len(self.items) >= self.capacity else None
            self.items.append(item)
            self.cond.notify_all()
            return evicted

    def get(self) -> Any:
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            if not self.items:
                return CLOSED
            item = self.items.popleft()
            self.cond.notify_all()
            return item

    def empty(self) -> bool:
        with self.cond:
            return not self.items

    def close(self) -> list[Any]:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            return list(self.items)

    def abort(self) -> list[Any]:
        """Close and discard what is queued; returns the discarded items."""
        with self.cond:
            left = list(self.items)
            self.items.clear()
            self.closed = True
            self.cond.notify_all()
            return left


# -- configuration -------------------------------------------------------------------------------

@dataclass
class Backoff:
    """Reconnect delays: ``initial``, doubling, capped at ``cap`` seconds; ``max_attempts`` < 0
    retries forever (a station should come back when the cable is plugged in again)."""

    initial: float = 0.25
    cap: float = 5.0
    max_attempts: int = -1

    def delays(self):
        delay, attempt = self.initial, 0
        while self.max_attempts < 0 or attempt < self.max_attempts:
            attempt += 1
            yield attempt, delay
            delay = min(delay * 2.0, self.cap)


@dataclass
class PipelineConfig:
    policy: str = "block"
    max_frames: int | None = None  # stop after this many captured frames
    backoff: Backoff = field(default_factory=Backoff)
    stop_grace_s: float = 3.0  # how long a stop waits for a capture blocked in the driver
    fail_safe_output: bool = False  # a line sink's lost link turns every OK into NG until it is back
    out_of_range: str = "flag"  # a score far outside the validation range: "flag" it, or make it "error"


@dataclass
class RunResult:
    summary: dict[str, Any]
    stop_reason: str  # "end of stream" | "frame limit" | "signal SIGINT" | "source lost" | ...
    fatal: str | None = None  # a failure that ended the run early
