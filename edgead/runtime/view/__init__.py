"""The station view: ``--output http://127.0.0.1:8080`` serves a live page of the line.

The page shows the live frame with its anomaly-map overlay and region boxes, the verdict in large
type with the score against the threshold, the run's counters (captured, inspected, dropped,
errored, NG), throughput and p50/p99 latency per stage, a strip of the last NG parts (each linked
to its full-size image and its JSONL record), the bundle in use with its certificate status, and
banners for an unverified engine or out-of-range scores. It is read-only and loads nothing from
outside the station (no CDN, no build step).

The sink never slows inspection: :meth:`ViewSink.write` stores a reference to the newest frame and
wakes the server's thread, which encodes a frame only when a page can take one (at most ``fps`` a
second) and skips the rest. Binds 127.0.0.1 unless told otherwise; another address needs the token
(see :mod:`edgead.runtime.view.config` and :mod:`edgead.runtime.view.security`). Needs the
``view`` extra (aiohttp).
"""

from __future__ import annotations

import sys
from typing import Any

from edgead.runtime.sinks import SinkContext, SinkError
from edgead.runtime.view.config import TOKEN_ENV, ViewConfig, ViewConfigError, parse_view_uri
from edgead.runtime.view.server import ViewServer, ViewStartError
from edgead.runtime.view.state import Handoff, describe_run

__all__ = ["ViewConfig", "ViewSink", "open_view_sink", "parse_view_uri"]


class ViewSink:
    """The sink side of the view: hands frames to :class:`ViewServer` and reports its counters."""

    def __init__(self, uri: str, config: ViewConfig, context: SinkContext) -> None:
        self.uri, self.config = uri, config
        run_info = describe_run(context.run)
        self.handoff = Handoff(config.strip, run_info.get("low_score"), count_here=context.stats is None)
        self.server = ViewServer(config, self.handoff, run_info, context.stats, context.vrange)
        self.closed = False
        try:
            self.server.start()
        except ViewStartError as err:
            raise SinkError(str(err)) from err
        self.url = config.url(self.server.port)
        self._announce(context)

    def _announce(self, context: SinkContext) -> None:
        where = "this machine only" if self.config.loopback else "the network, with its token"
        context.say(f"edgead-run: station view on {self.url} ({where})")
        if self.config.token_generated:
            # Printed once, even with --quiet: without it nobody could open the page.
            print(f"edgead-run: station view token (generated for this run; set {TOKEN_ENV} to choose one): "
                  f"open {self.url}?token={self.config.token}", file=sys.stderr, flush=True)

    def write(self, frame: Any, inspection: Any, fps: float, record: dict[str, Any]) -> None:
        if not self.closed:
            self.handoff.put(frame, inspection, fps, record)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.stop()

    def summary(self) -> dict[str, Any]:
        return self.server.counters()


def open_view_sink(uri: str, context: SinkContext) -> ViewSink:
    """``http://HOST:PORT[?fps=15&quality=80&strip=8]``: the station view (see the module docstring)."""
    try:
        config = parse_view_uri(uri, token=context.view_token)
    except ViewConfigError as err:
        raise SinkError(str(err)) from err
    return ViewSink(uri, config, context)
