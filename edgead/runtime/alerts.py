"""Safety warnings that stay: each goes to the terminal (whatever ``--quiet`` says), to the JSONL log
as a ``{"event": "warning"}`` line, and into ``summary.json``.

A warning is a condition the operator must know about although the run goes on: an engine run
without verification (``--allow-unverified``: checksums or parity certificate), scores far outside
the validation range, a truncated video, a sink that failed. Repeats of one kind are counted, not
printed again, so a station running for days does not flood its terminal or its memory.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Any

MAX_KINDS = 100  # distinct warnings kept; more are counted under "other"


class Alerts:
    """Collects warnings; buffered until a log is attached, then written to it as they come."""

    def __init__(self, prog: str = "edgead-run", stream: IO[str] | None = None) -> None:
        self.prog = prog
        self.stream = stream
        self._log: Any = None
        self._pending: list[dict[str, Any]] = []
        self._items: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def warn(self, message: str, kind: str = "warning", key: str | None = None, **fields: Any) -> None:
        """Report ``message`` once per ``key`` (default: the message itself); later repeats only
        raise its count (the first one's message and fields are kept)."""
        message = message[len("WARNING: "):] if message.startswith("WARNING: ") else message
        key = (kind, key or message)
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                item["count"] += 1
                return
            if len(self._items) >= MAX_KINDS:
                key = ("other", "further warnings not kept")
                item = self._items.setdefault(key, {"kind": "other", "message": key[1], "count": 0})
                item["count"] += 1
                return
            item = {"kind": kind, "message": message, "count": 1, **fields}
            self._items[key] = item
            log = self._log
            if log is None:
                self._pending.append(item)
        print(f"{self.prog}: WARNING: {message}", file=self.stream or sys.stderr, flush=True)
        if log is not None:
            log.event("warning", **item)

    def attach(self, log: Any) -> None:
        """Write the warnings given so far to ``log`` (a JsonlLog), and the later ones as they come."""
        with self._lock:
            self._log, pending, self._pending = log, self._pending, []
        for item in pending:
            log.event("warning", **item)

    def summary(self) -> list[dict[str, Any]]:
        """Every warning with its count, for ``summary.json``."""
        with self._lock:
            return [dict(item) for item in self._items.values()]

    def messages(self) -> list[str]:
        return [item["message"] for item in self.summary()]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
