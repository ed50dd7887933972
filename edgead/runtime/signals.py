"""SIGINT/SIGTERM for ``edgead-run``: installed first thing, so a signal at any moment ends the run
with its summary and its last log lines written.

- While starting (imports, bundle, engine, source): the first signal raises :class:`Interrupted`
  (a ``BaseException``, so no library's ``except Exception`` turns it into another error, such as
  "onnxruntime is not installed" from an interrupted import), and the CLI writes the summary of a
  run that inspected nothing.
- While running: the first signal stops capturing; frames already captured drain and are reported.
- A second signal within :data:`GRACE_S` of the first is not "kill now": ``timeout`` sends its
  signal to the child and then to the whole process group, so one ``timeout`` delivers two at
  once. Only a second signal after the grace period kills at once (the default action).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
GRACE_S = 1.0  # seconds during which further signals repeat the first one


class Interrupted(BaseException):
    """A signal arrived while the run was starting; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal_name(signum)} while starting")
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    return EXIT_SIGNAL.get(signum, 128 + signum)


class SignalGuard:
    """The process's SIGINT/SIGTERM handler, in one of three modes: starting (raise
    :class:`Interrupted`), running (call ``on_stop``), finishing (note it only)."""

    def __init__(self, grace_s: float = GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s, self.clock = grace_s, clock
        self.first: int | None = None  # the first signal's number
        self.first_at: float | None = None
        self.first_mode: str | None = None  # the mode the first signal came in
        self.repeats = 0  # further signals within the grace period (not counted as "kill now")
        self.mode = "starting"
        self.on_stop: Callable[[str], Any] | None = None
        self._previous: dict[int, Any] = {}

    # -- installation ------------------------------------------------------------------------------
    def install(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    # -- modes -------------------------------------------------------------------------------------
    def running(self, on_stop: Callable[[str], Any]) -> None:
        """From now on a first signal calls ``on_stop(reason)``; one that came already does it now."""
        self.on_stop, self.mode = on_stop, "running"
        if self.first is not None:
            on_stop(f"signal {signal_name(self.first)}")

    def finishing(self) -> None:
        """The run is writing its results: a first signal is noted, nothing is interrupted."""
        self.mode = "finishing"

    @property
    def got(self) -> int | None:
        """The signal that stopped (or interrupted) the run; one that came while it was already
        finishing does not count."""
        return None if self.first_mode == "finishing" else self.first

    # -- the handler -------------------------------------------------------------------------------
    def _handle(self, signum: int, _frame: Any) -> None:
        now = self.clock()
        if self.first is None:
            self.first, self.first_at, self.first_mode = signum, now, self.mode
            if self.mode == "starting":
                raise Interrupted(signum)
            if self.mode == "running" and self.on_stop is not None:
                self.on_stop(f"signal {signal_name(signum)}")
            return
        if self.first_at is not None and now - self.first_at < self.grace_s:
            self.repeats += 1  # the same stop request again (e.g. timeout's process-group copy)
            return
        self.kill_now(signum)

    def kill_now(self, signum: int) -> None:
        """The operator means it: the default action of ``signum`` (the process ends at once)."""
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
