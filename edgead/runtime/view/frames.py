"""The view's frames, in the server thread: encode the newest frame only when a client can take it,
at most ``fps`` a second, and share that one JPEG with every client; encode NG parts for the strip.

A slow client holds back only itself: each client takes the newest encoded frame when it is done
with the last one, so the view skips frames (counted), never the line.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgead.runtime.annotate import annotate
from edgead.runtime.view.state import Handoff, Latest, NgEntry, NgStrip, finite

LIVE_MAX_WIDTH = 1280  # larger frames are scaled down for the live view (the NG images stay full size)
THUMB_HEIGHT = 96
NG_QUALITY = 90
NG_PER_S = 5.0  # NG parts encoded for the strip per second at most (a burst keeps the newest)


@dataclass
class Encoded:
    seq: int  # the Handoff seq of the frame
    meta: dict[str, Any]
    jpeg: bytes

    def packed(self) -> bytes:
        """A WebSocket message: 4-byte big-endian length, the JSON meta, the JPEG."""
        head = json.dumps(self.meta).encode()
        return struct.pack(">I", len(head)) + head + self.jpeg


def jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def scaled(image: np.ndarray, max_width: int | None = None, height: int | None = None) -> np.ndarray:
    h, w = image.shape[:2]
    factor = height / h if height else (max_width / w if max_width and w > max_width else 1.0)
    if factor == 1.0:
        return image
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def frame_meta(item: Latest) -> dict[str, Any]:
    r = item.record
    return finite({"frame": r.get("frame"), "seq": item.seq, "t_capture": r.get("t_capture"),
                   "verdict": r.get("verdict"), "score": r.get("score"), "score_norm": r.get("score_norm"),
                   "regions": len(r.get("regions", [])), "age_ms": r.get("age_ms"), "fps": round(item.fps, 2)})


class Broadcaster:
    """Encodes on demand and hands the newest encoded frame to the clients that wait for one."""

    def __init__(self, handoff: Handoff, strip: NgStrip, vrange: tuple[float, float], fps: float, quality: int) -> None:
        self.handoff, self.strip, self.vrange = handoff, strip, vrange
        self.period, self.quality = 1.0 / fps, quality
        self.current: Encoded | None = None
        self.encoded = 0  # frames encoded for the clients (= shown to at least one)
        self.encode_ms = 0.0  # the last one's annotate + JPEG time
        self.tried_seq = 0  # the newest frame the encoder took (encoded, or failed to encode)
        self.failures: dict[str, Any] = {"count": 0, "last": None}  # a frame it cannot draw is skipped
        self.wanting = 0  # clients waiting for a newer frame
        self.closing = False
        self.event = asyncio.Event()
        self.cond = asyncio.Condition()

    def wake(self) -> None:
        """Called in the loop (call_soon_threadsafe) when the sink thread has a new frame."""
        self.handoff.woken()
        self.event.set()

    async def run(self) -> None:
        """Encode what a client waits for (at most ``fps`` a second) and NG parts for the strip
        (at most ``NG_PER_S``, newest first); otherwise sleep until a deadline or a wake."""
        next_at = ng_next = 0.0
        while not self.closing:
            now = time.monotonic()
            busy = False
            if self.handoff.ng_pending and now >= ng_next:
                self._guarded(self._encode_ng, self.handoff.ng_pending.pop())
                ng_next, busy = now + 1.0 / NG_PER_S, True
            if self._wanted() and now >= next_at:
                self._encode_newest()
                next_at, busy = now + self.period, True
            if busy:
                async with self.cond:
                    self.cond.notify_all()
                await asyncio.sleep(0)  # let the clients take it, and requests in
                continue
            # Arm first, then look again, so a frame put meanwhile is never missed. The sink thread
            # wakes us only for what we can act on now: a new frame a client waits for, a first NG.
            self.event.clear()
            self.handoff.armed = bool(self.wanting) and not self._wanted()
            self.handoff.ng_armed = not self.handoff.ng_pending
            deadlines = ([ng_next] if self.handoff.ng_pending else []) + ([next_at] if self._wanted() else [])
            if self.closing or (deadlines and min(deadlines) <= now):
                continue
            try:
                await asyncio.wait_for(self.event.wait(), min(deadlines) - now if deadlines else None)
            except asyncio.TimeoutError:
                pass

    def _encode_newest(self) -> None:
        latest = self.handoff.latest
        assert latest is not None
        self.tried_seq = latest.seq
        started = time.monotonic()
        if (encoded := self._guarded(self._encode_live, latest)) is not None:
            self.current, self.encoded = encoded, self.encoded + 1
            self.encode_ms = 1000.0 * (time.monotonic() - started)

    def _wanted(self) -> bool:
        """A client waits and there is a frame newer than the last one encoded."""
        latest = self.handoff.latest
        return bool(self.wanting) and latest is not None and latest.seq > self.tried_seq

    def _guarded(self, encode: Any, item: Latest) -> Any:
        try:
            return encode(item)
        except Exception as exc:  # noqa: BLE001 - one frame that cannot be drawn must not stop the view
            where = f"frame {item.record.get('frame')}"
            self.failures = {"count": self.failures["count"] + 1, "last": f"{where}: {exc!r}"}
            return None

    def _encode_live(self, item: Latest) -> Encoded:
        view = annotate(item.frame.image, item.inspection, item.fps, *self.vrange)
        return Encoded(item.seq, frame_meta(item), jpeg(scaled(view, max_width=LIVE_MAX_WIDTH), self.quality))

    def _encode_ng(self, item: Latest) -> None:
        view = annotate(item.frame.image, item.inspection, item.fps, *self.vrange)
        frame_id = int(item.record.get("frame", item.seq))
        self.strip.add(NgEntry(frame_id, item.record, jpeg(view, NG_QUALITY),
                               jpeg(scaled(view, height=THUMB_HEIGHT), 75)))

    async def next_frame(self, after_seq: int) -> Encoded | None:
        """The first encoded frame newer than ``after_seq``; None once the view closes."""
        async with self.cond:
            self.wanting += 1
            self.event.set()  # the encoder may have skipped the newest frame while nobody waited
            try:
                await self.cond.wait_for(lambda: self.closing or (self.current is not None
                                                                 and self.current.seq > after_seq))
            finally:
                self.wanting -= 1
        return None if self.closing else self.current

    async def close(self) -> None:
        self.closing = True
        self.event.set()
        async with self.cond:
            self.cond.notify_all()
