"""The station view's web server: aiohttp in its own thread with its own event loop.

    GET /                  the page (static HTML, CSS and a small script shipped in the package)
    GET /static/NAME       app.js, style.css
    GET /ws                WebSocket: status (JSON text, 4 a second) and frames (binary: length,
                           JSON meta, JPEG); the page sends "next" when it has shown a frame
    GET /stream.mjpg       the live frame as MJPEG, for other players and scripts
    GET /status            the status as JSON, once
    GET /ng                the NG strip as JSON
    GET /ng/ID.jpg         an NG part at full size (annotated); /ng/ID.thumb.jpg its thumbnail
    GET /ng/ID.json        its JSONL record

Every route is a GET: the page cannot change the run.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from edgead.runtime.view.config import ViewConfig
from edgead.runtime.view.frames import Broadcaster
from edgead.runtime.view.security import add_headers, guard
from edgead.runtime.view.state import Handoff, NgStrip, finite, last_frame, run_counters

STATUS_PERIOD_S = 0.25
ACK_TIMEOUT_S = 5.0  # a page that never says "next" still gets a frame now and then
FLUSH_S = 3.0  # at close, at most this long for the final status to reach the pages (ms when idle)
BOUNDARY = "edgeadframe"
STATIC_TYPES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


class ViewStartError(RuntimeError):
    """The server could not listen; the message names the address and the fix."""


def _static_files() -> dict[str, bytes]:
    folder = resources.files("edgead.runtime.view") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_TYPES}


def _json(value: Any) -> str:
    return json.dumps(finite(value), default=lambda v: v.item() if hasattr(v, "item") else str(v))


@dataclass(eq=False)
class Client:
    kind: str  # "ws" or "mjpeg"
    ws: web.WebSocketResponse | None = None
    frames: int = 0
    status_seq: int = 0
    ack: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ViewServer:
    def __init__(self, config: ViewConfig, handoff: Handoff, run_info: dict[str, Any],
                 stats: Callable[[], dict[str, Any] | None] | None, vrange: tuple[float, float]) -> None:
        self.config, self.handoff, self.run_info, self.stats, self.vrange = config, handoff, run_info, stats, vrange
        self.static = _static_files()
        self.strip = NgStrip(config.strip)
        self.port = config.port
        self.clients: set[Client] = set()
        self.clients_served = 0
        self.status_text, self.status_seq, self.ended = "", 0, False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name="edgead-view", daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    # -- the thread --------------------------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        self.thread.start()
        if not self.ready.wait(timeout):
            raise ViewStartError(f"{self.config.url()}: the view server did not start within {timeout:.0f} s")
        if self.error is not None:
            raise ViewStartError(f"{self.config.url()}: cannot listen ({self.error}); choose another "
                                 "port (e.g. http://127.0.0.1:8081) or stop what holds this one") from self.error

    def stop(self) -> None:
        """Send the final status to the pages, close every connection, end the thread."""
        if not self.thread.is_alive():
            return
        self.handoff.wake = lambda: None
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=FLUSH_S + 5.0)
        except Exception:  # noqa: BLE001 - the thread is stopped below anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self.error = err
            self.ready.set()
            self.loop.close()
            return
        self.ready.set()
        try:
            self.loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    async def _start(self) -> None:
        self.bc = Broadcaster(self.handoff, self.strip, self.vrange, self.config.fps, self.config.quality)
        app = web.Application(middlewares=[guard(self.config, lambda: self.port)])
        app.on_response_prepare.append(add_headers)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/favicon.ico", self._no_icon)
        app.router.add_get("/status", self._status_once)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/stream.mjpg", self._mjpeg)
        app.router.add_get("/ng", self._ng_list)
        app.router.add_get(r"/ng/{frame:\d+}.jpg", self._ng_file)
        app.router.add_get(r"/ng/{frame:\d+}.thumb.jpg", self._ng_file)
        app.router.add_get(r"/ng/{frame:\d+}.json", self._ng_file)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        try:
            site = web.TCPSite(self.runner, self.config.host, self.config.port)
            await site.start()
        except BaseException:
            await self.runner.cleanup()
            raise
        self.port = int(self.runner.addresses[0][1])
        self.tasks = [asyncio.create_task(self.bc.run()), asyncio.create_task(self._ticker())]
        self.handoff.wake = lambda: self.loop.call_soon_threadsafe(self.bc.wake)

    async def _shutdown(self) -> None:
        self.ended = True
        self._publish()
        deadline = time.monotonic() + FLUSH_S
        def behind(c: Client) -> bool:
            return c.ws is not None and not c.ws.closed and c.status_seq < self.status_seq

        while time.monotonic() < deadline and any(behind(c) for c in self.clients):
            await asyncio.sleep(0.02)
        await self.bc.close()
        for client in list(self.clients):
            if client.ws is not None:
                await client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"run ended")
        for task in self.tasks:
            task.cancel()
        await self.runner.cleanup()

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        try:
            counters, counted_by = run_counters(self.stats, self.handoff)
        except Exception as exc:  # noqa: BLE001 - the page must keep running
            counters, counted_by = {}, f"unavailable: {exc}"
        banners = list(self.run_info["banners"])
        if self.handoff.out_of_range_recently():
            banners.append({"kind": "range", "text": f"SCORES OUT OF RANGE: {self.handoff.out_of_range} frame(s) "
                            "scored far below every validation part (covered lens, no light, wrong input?); "
                            "they pass as OK"})
        latest = self.handoff.latest
        return {"type": "status", "ended": self.ended, "t": time.time(),
                "run": {k: v for k, v in self.run_info.items() if k not in ("banners", "low_score")},
                "banners": banners, "counted_by": counted_by, "frames": counters.get("frames", {}),
                "fps": counters.get("fps"), "latency_ms": counters.get("latency_ms", {}),
                "last": last_frame(latest.record if latest else None, self.run_info.get("threshold")),
                "view": self.counters(), "ng": self.strip.listing()}

    def counters(self) -> dict[str, Any]:
        """The view's own counters (also the sink's summary in summary.json)."""
        shown = getattr(self, "bc", None)
        encoded = shown.encoded if shown else 0
        return {"url": self.config.url(self.port), "frames_in": self.handoff.frames_in, "frames_shown": encoded,
                "frames_skipped": self.handoff.frames_in - encoded, "clients": len(self.clients),
                "clients_served": self.clients_served, "ng_kept": len(self.strip.entries),
                "out_of_range": self.handoff.out_of_range, "max_fps": self.config.fps,
                "encode_ms": round(shown.encode_ms, 3) if shown else None,
                "encode_failures": shown.failures if shown else None}

    def _publish(self) -> None:
        self.status_text = _json(self.status())
        self.status_seq += 1
        asyncio.ensure_future(self._notify_status())

    async def _notify_status(self) -> None:
        async with self.bc.cond:
            self.bc.cond.notify_all()

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(STATUS_PERIOD_S)
            if any(c.ws is not None for c in self.clients):
                self._publish()

    # -- routes ------------------------------------------------------------------------------------
    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self.static["index.html"], content_type="text/html", charset="utf-8")

    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)  # browsers ask for one; the page needs none

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.static or name == "index.html":
            raise web.HTTPNotFound(text=f"no static file {name!r}\n")
        return web.Response(body=self.static[name], content_type=STATIC_TYPES[name], charset="utf-8")

    async def _status_once(self, request: web.Request) -> web.Response:
        return web.Response(text=_json(self.status()), content_type="application/json")

    async def _ng_list(self, request: web.Request) -> web.Response:
        return web.Response(text=_json(self.strip.listing()), content_type="application/json")

    async def _ng_file(self, request: web.Request) -> web.Response:
        frame = int(request.match_info["frame"])
        entry = self.strip.get(frame)
        if entry is None:
            raise web.HTTPNotFound(text=f"frame {frame} is not in the NG strip (the last {self.strip.size} NG parts "
                                        "are kept; the JSONL log has every frame, --save-ng keeps every NG image)\n")
        if request.path.endswith(".json"):
            return web.Response(text=_json(entry.record), content_type="application/json")
        body = entry.thumb if request.path.endswith(".thumb.jpg") else entry.image
        return web.Response(body=body, content_type="image/jpeg")

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, compress=False, max_msg_size=4096)  # JPEGs don't deflate
        await ws.prepare(request)
        client = Client("ws", ws)
        self.clients.add(client)
        self.clients_served += 1
        self._publish()  # the new page gets everything at once
        pumps = [asyncio.create_task(self._quietly(self._ws_frames(client))),
                 asyncio.create_task(self._quietly(self._ws_status(client)))]
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data == "next":
                    client.ack.set()
        finally:
            for task in pumps:
                task.cancel()
            self.clients.discard(client)
        return ws

    @staticmethod
    async def _quietly(pump: Any) -> None:
        try:
            await pump
        except (ConnectionError, RuntimeError):  # the page went away mid-send: its handler cleans up
            pass

    async def _ws_frames(self, client: Client) -> None:
        assert client.ws is not None
        last = 0
        while (encoded := await self.bc.next_frame(last)) is not None:
            client.ack.clear()
            async with client.lock:
                await client.ws.send_bytes(encoded.packed())
            client.frames, last = client.frames + 1, encoded.seq
            try:
                await asyncio.wait_for(client.ack.wait(), ACK_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass

    async def _ws_status(self, client: Client) -> None:
        assert client.ws is not None
        while True:
            async with self.bc.cond:
                await self.bc.cond.wait_for(lambda: self.status_seq > client.status_seq)
                text, seq = self.status_text, self.status_seq
            async with client.lock:
                await client.ws.send_str(text)
            client.status_seq = seq

    async def _mjpeg(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": f"multipart/x-mixed-replace; boundary={BOUNDARY}"})
        await response.prepare(request)
        client = Client("mjpeg")
        self.clients.add(client)
        self.clients_served += 1
        last = 0
        try:
            while (encoded := await self.bc.next_frame(last)) is not None:
                meta = encoded.meta
                head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(encoded.jpeg)}\r\n"
                        f"X-Frame: {meta['frame']}\r\nX-Capture-Time: {meta['t_capture']}\r\n"
                        f"X-Verdict: {meta['verdict']}\r\n\r\n")
                await response.write(head.encode() + encoded.jpeg + b"\r\n")  # waits while the client is behind
                client.frames, last = client.frames + 1, encoded.seq
            await response.write(f"--{BOUNDARY}--\r\n".encode())
        except (ConnectionError, RuntimeError):  # the client went away
            pass
        finally:
            self.clients.discard(client)
        return response
