"""The one delivery path of every line sink: a bounded queue, a sender thread, reconnects with
backoff, per-sink counters and latency.

Accounting: every verdict offered to a sink ends as ``sent`` (confirmed on the wire: broker
PUBACK, Modbus write response, value in the OPC UA address space), ``queued`` (waiting, or handed
to the transport and not yet confirmed) or ``unsent``, with its reason: ``overflow`` (the queue
was full: the oldest gives way), ``stale`` (older than ``stale_ms``: a reject pulse for a part
long gone would hit the wrong part), ``abandoned`` (still undelivered when the run's flush time
ran out) or ``failed`` (the transport could not encode or send it at all, the link being fine). ``sent + queued + unsent == offered`` holds at every moment; after
:meth:`Outbox.finish`, ``queued`` is 0. A message that a transport could not send (the link broke)
goes back to the head of the queue and is retried after the reconnect, in order.

Latency: from the end of post-processing of the frame to its confirmation on the wire.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from edgead.core.contract import OK
from edgead.runtime.jobs import Backoff
from edgead.runtime.line.uri import LineURI
from edgead.runtime.log import _finite
from edgead.runtime.stats import LatencyWindow


class LinkError(RuntimeError):
    """The link is down or the peer refused us; the message says why."""


@dataclass
class Message:
    seq: int  # order of offer, per sink
    record: Any  # the frame's JSONL record (or what the sink's ``prepare`` made of it)
    t_ready: float  # monotonic time post-processing ended


class Transport(Protocol):
    """What a line sink's protocol does; called from the outbox's thread only (``bind`` excepted).

    ``send`` returns the monotonic time the message was confirmed, or None when confirmation comes
    later through ``Outbox.delivered`` (MQTT's PUBACK). It raises :class:`LinkError` when the link
    broke; the message is then retried after a reconnect.
    """

    name: str

    def bind(self, outbox: "Outbox") -> None: ...

    def connect(self) -> None: ...

    def send(self, message: Message) -> float | None: ...

    def probe(self) -> None: ...

    def is_up(self) -> bool: ...

    def disconnect(self) -> None: ...


@dataclass
class OutboxOptions:
    capacity: int = 1000  # undelivered verdicts kept while the link is down
    max_age_s: float = 0.0  # older messages are not sent (counted stale); 0: no limit
    flush_s: float = 2.0  # end of run: how long to wait for the queue to drain
    wait_s: float = 2.0  # opening: how long to wait for the first connection
    probe_s: float = 1.0  # idle link check period
    max_inflight: int = 20  # handed to the transport, not yet confirmed
    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.1, cap=5.0))
    fail_safe: bool | None = None  # None: follow --fail-safe-output

    @classmethod
    def from_uri(cls, uri: LineURI, capacity: int = 1000, max_age_ms: float = 0.0) -> "OutboxOptions":
        return cls(capacity=int(uri.integer("queue", capacity, minimum=1, maximum=10_000_000)),
                   max_age_s=uri.number("stale_ms", max_age_ms) / 1000.0,
                   flush_s=uri.number("flush_s", 2.0), wait_s=uri.number("wait_s", 2.0),
                   probe_s=uri.number("probe_s", 1.0, minimum=0.01),
                   backoff=Backoff(initial=0.1, cap=uri.number("reconnect_max", 5.0, minimum=0.01)),
                   fail_safe=uri.flag("fail_safe", None))


class Outbox:
    """Bounded FIFO + sender thread around one :class:`Transport`."""

    def __init__(self, uri: str, transport: Transport, options: OutboxOptions, say: Callable[[str], Any]) -> None:
        self.uri, self.transport, self.options, self.say = uri, transport, options, say
        self._cond = threading.Condition()
        self._queue: collections.deque[Message] = collections.deque()
        self._pending: dict[int, Message] = {}
        self.offered = self.sent = self.reconnects = 0
        self.unsent: collections.Counter[str] = collections.Counter()
        self.latency = LatencyWindow()
        self.last_error: str | None = None
        self._up = False
        self._ever_up = False
        self._down_since: float | None = time.monotonic()
        self.downtime_s = 0.0
        self._finished = False
        self._stop = threading.Event()
        transport.bind(self)
        self._thread = threading.Thread(target=self._run, name=f"edgead-line-{transport.name}", daemon=True)
        self._thread.start()

    # -- the pipeline's side (never blocks) ------------------------------------------------------
    def put(self, record: Any, t_ready: float) -> None:
        with self._cond:
            self.offered += 1
            if self._finished:
                self.unsent["abandoned"] += 1
                return
            if len(self._queue) >= self.options.capacity:
                self._queue.popleft()
                self.unsent["overflow"] += 1
            self._queue.append(Message(self.offered, record, t_ready))
            self._cond.notify_all()

    @property
    def link_up(self) -> bool:
        return self._up and self.transport.is_up()

    # -- the transport's side --------------------------------------------------------------------
    def delivered(self, seq: int, t_wire: float) -> None:
        """Message ``seq`` is confirmed on the wire (any thread)."""
        with self._cond:
            message = self._pending.pop(seq, None)
            if message is None:  # abandoned at finish: it stays counted unsent
                return
            self.sent += 1
            self.latency.add(1000.0 * (t_wire - message.t_ready))
            self._cond.notify_all()

    def wake(self) -> None:
        """The transport's state changed (a lost connection): re-check now."""
        with self._cond:
            self._cond.notify_all()

    # -- the sender thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.link_up:
                    if self._up:
                        self._lost(LinkError("connection lost"))
                    if not self._connect():
                        break
                    continue
                message = self._take()
                if message is None:
                    self._probe()
                elif message is not _WAKE:
                    self._send(message)
        finally:
            try:
                goodbye = getattr(self.transport, "goodbye", None)
                if callable(goodbye):
                    goodbye()
                self.transport.disconnect()
            except Exception:  # noqa: BLE001 - a dead link may fail to close too
                pass

    def _take(self) -> Message | object | None:
        """The next message to send (stale ones are counted and skipped); None when idle for
        ``probe_s``; _WAKE when the link or the stop flag changed."""
        deadline = time.monotonic() + self.options.probe_s
        with self._cond:
            while True:
                if self._stop.is_set() or not self.link_up:
                    return _WAKE
                if self._queue and len(self._pending) < self.options.max_inflight:
                    message = self._queue.popleft()
                    max_age = self.options.max_age_s
                    if max_age and time.monotonic() - message.t_ready > max_age:
                        self.unsent["stale"] += 1
                        continue
                    self._pending[message.seq] = message
                    return message
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _send(self, message: Message) -> None:
        try:
            t_wire = self.transport.send(message)
        except LinkError as err:
            with self._cond:
                if self._pending.pop(message.seq, None) is not None:
                    self._queue.appendleft(message)  # retried first after the reconnect
            self._lost(err)
            return
        except Exception as err:  # noqa: BLE001 - this message cannot be sent at all: count it, go on
            with self._cond:
                if self._pending.pop(message.seq, None) is not None:
                    self.unsent["failed"] += 1
                self.last_error = f"message of frame {message.record.get('frame', '?')}: {err!r}" \
                    if isinstance(message.record, dict) else repr(err)
            return
        if t_wire is not None:
            self.delivered(message.seq, t_wire)

    def _probe(self) -> None:
        try:
            self.transport.probe()
        except LinkError as err:
            self._lost(err)

    def _lost(self, err: LinkError) -> None:
        with self._cond:
            was_up, self._up = self._up, False
            self._down_since = time.monotonic()
            self.last_error = str(err)
        if was_up:
            self.say(f"{self.uri}: link lost ({err}); verdicts queue (up to {self.options.capacity}) "
                     "and it reconnects with backoff")
        try:
            self.transport.disconnect()
        except Exception:  # noqa: BLE001
            pass

    def _connect(self) -> bool:
        delays = self.options.backoff.delays()
        while not self._stop.is_set():
            try:
                self.transport.connect()
            except LinkError as err:
                first = self.last_error != str(err)
                self.last_error = str(err)
                if first:
                    self.say(f"{self.uri}: cannot connect ({err}); retrying with backoff")
                try:
                    _, delay = next(delays)
                except StopIteration:
                    return False
                if self._stop.wait(delay):
                    return False
                continue
            with self._cond:
                if self._ever_up:
                    self.reconnects += 1
                if self._down_since is not None and self._ever_up:
                    self.downtime_s += time.monotonic() - self._down_since
                self._down_since = None
                self._up = self._ever_up = True
                self._cond.notify_all()
            return True
        return False

    # -- ending ----------------------------------------------------------------------------------
    def wait_up(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.link_up and time.monotonic() < deadline:
                self._cond.wait(min(0.05, max(deadline - time.monotonic(), 0.0)))
            return self.link_up

    def finish(self) -> None:
        """Deliver what is queued within ``flush_s``; what is left is counted unsent (abandoned)
        and nothing more is accepted. Idempotent."""
        deadline = time.monotonic() + self.options.flush_s
        with self._cond:
            while (self._queue or self._pending) and not self._finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            if not self._finished:
                if self._queue or self._pending:
                    self.unsent["abandoned"] += len(self._queue) + len(self._pending)
                self._queue.clear()
                self._pending.clear()
                self._finished = True

    def close(self, timeout: float = 5.0) -> None:
        self.finish()
        self._stop.set()
        self.wake()
        self._thread.join(timeout)

    def summary(self) -> dict[str, Any]:
        with self._cond:
            down = self.downtime_s + (time.monotonic() - self._down_since
                                      if self._down_since is not None and self._ever_up else 0.0)
            out = {"offered": self.offered, "sent": self.sent, "queued": len(self._queue) + len(self._pending),
                   "unsent": sum(self.unsent.values()), "unsent_reasons": dict(self.unsent),
                   "reconnects": self.reconnects, "link_up": self.link_up, "ever_connected": self._ever_up,
                   "downtime_s": round(down, 3), "last_error": self.last_error}
            latency = LatencyWindow()
            latency.values.extend(self.latency.values)  # percentiles outside the lock
        return {**out, "latency_ms": latency.summary()}


_WAKE = object()


class LineSink:
    """What the pipeline sees of a line sink: ``write`` enqueues (never blocks), ``link_up`` and
    ``fail_safe`` feed ``--fail-safe-output``, ``finish`` ends the run's delivery, ``summary``
    reports the counters. ``select(verdict)`` says which frames this sink sends; ``prepare(record)``
    turns a frame's record into the message payload, in the pipeline's thread (keep it cheap)."""

    def __init__(self, uri: str, transport: Transport, options: OutboxOptions, say: Callable[[str], Any],
                 select: Callable[[str], bool] = lambda verdict: True,
                 prepare: Callable[[dict[str, Any]], Any] = lambda record: record) -> None:
        self.uri, self.select, self.prepare, self.fail_safe = uri, select, prepare, options.fail_safe
        self.transport = transport
        self.outbox = Outbox(uri, transport, options, say)
        if options.wait_s and not self.outbox.wait_up(options.wait_s):
            say(f"{uri}: not connected yet ({self.outbox.last_error or 'connecting'}); verdicts queue "
                f"(up to {options.capacity}) until it is")

    def write(self, frame: Any, inspection: Any, fps: float, record: dict[str, Any] | None = None) -> None:
        record = record if record is not None else {"frame": frame.id, **inspection.to_dict()}
        if not self.select(inspection.verdict):
            return
        age = record.get("age_ms")  # capture -> end of post-processing
        t_ready = frame.t_mono + age / 1000.0 if isinstance(age, (int, float)) else time.monotonic()
        self.outbox.put(self.prepare(record), t_ready)

    @property
    def link_up(self) -> bool:
        return self.outbox.link_up

    def finish(self) -> None:
        self.outbox.finish()

    def close(self) -> None:
        self.outbox.close()

    def summary(self) -> dict[str, Any]:
        return self.outbox.summary()


def to_json(payload: Any) -> str:
    """Compact JSON; NaN/Inf (never in a pipeline record, which writes them as null) become null."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(payload), separators=(",", ":"), default=str)


def not_ok(verdict: str) -> bool:
    """NG and ERROR: a part that was not passed (an ERROR is never an OK)."""
    return verdict != OK
