"""The station's JSONL log: one JSON object per line, frame lines (``"frame": id``) and event lines
(``"event": name``). Thread-safe and flushed per line, so a killed station loses nothing."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

# Logged, not echoed: the terminal gets the summary table, and warnings are printed by Alerts.
QUIET_EVENTS = {"start", "stop", "summary", "warning"}


class LogError(RuntimeError):
    """The log file cannot be written; the message names it."""


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class JsonlLog:
    """One JSON object per line: frame lines (``"frame": id``) and event lines (``"event": name``).
    Thread-safe and flushed per line."""

    def __init__(self, path: str | os.PathLike | None, echo_events: IO[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self.echo = echo_events
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "w", encoding="utf-8", buffering=1)
            except OSError as err:
                raise LogError(f"--log {self.path}: cannot write ({err.strerror or err})") from err

    def _line(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, default=_json_default, allow_nan=False)
        with self._lock:
            if self._fh is not None:
                self._fh.write(text + "\n")
                self._fh.flush()

    def event(self, name: str, **fields: Any) -> None:
        record = {"event": name, "t_wall": round(time.time(), 6), **fields}
        self._line(_finite(record))
        if self.echo is not None and name not in QUIET_EVENTS:
            print(json.dumps(_finite(record), default=_json_default), file=self.echo, flush=True)

    def frame(self, record: dict[str, Any]) -> None:
        self._line(_finite(record))

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _finite(value: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


