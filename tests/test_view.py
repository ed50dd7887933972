"""The station view over plain HTTP, against a real server on a free loopback port: every endpoint,
the NG strip's links, the stream, the WebSocket's pacing and final status, the token rules, and
``edgead-run`` (also ``--demo``) with an ``http://`` output."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("aiohttp")

from edgead.core.calibration import Calibration  # noqa: E402
from edgead.runtime.pipeline import Frame  # noqa: E402
from edgead.runtime.postprocess_stage import Postprocessor, error_inspection  # noqa: E402
from edgead.runtime.sinks import SinkContext, SinkError, open_sink  # noqa: E402
from edgead.runtime.stats import RunStats  # noqa: E402
from edgead.runtime.view import config as view_config  # noqa: E402
from edgead.runtime.view.config import parse_view_uri  # noqa: E402
from edgead.runtime.view.state import describe_run  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from view_support import view_bundle  # noqa: E402

CAL = Calibration(image_threshold=0.5, score_min=0.0, score_max=1.0, pixel_threshold=0.5, map_min=0.0,
                  map_max=1.0, n_images=10, quantile=0.99, pixel_quantile=0.999, sigma=0.0)
POST = Postprocessor(CAL)
SHAPE = (120, 160)
TOKEN = "view-test-token-0123"


def feed(sink, ids, ng_every: int = 5, score: float | None = None) -> dict[int, dict]:
    """Write frames with ids ``ids`` (every ``ng_every``-th an NG part); returns their records."""
    records = {}
    for i in ids:
        raw = score if score is not None else (0.9 if i % ng_every == 0 else 0.1)
        amap = np.zeros((16, 16), np.float32)
        if raw > 0.5:
            amap[4:9, 4:9] = 2.0
        insp = POST(raw, amap, SHAPE)
        image = np.full((*SHAPE, 3), 40 + i % 200, np.uint8)
        record = {"frame": i, "t_capture": time.time(), **insp.to_dict(), "latency_ms": {"infer": 1.5},
                  "age_ms": 3.0}
        sink.write(Frame(i, image, time.monotonic(), time.time()), insp, 25.0, record)
        records[i] = record
    return records


def get(url: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body); HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def view():
    sink = open_sink("http://127.0.0.1:0?strip=4", SinkContext())
    yield sink
    sink.close()


def status_of(sink) -> dict:
    return json.loads(get(sink.url + "status")[2])


def mjpeg_parts(response, n: int) -> list[tuple[dict, bytes]]:
    parts = []
    while len(parts) < n:
        line = response.readline()
        if not line.startswith(b"--edgeadframe"):
            continue
        headers = {}
        while (line := response.readline().strip()):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, response.read(int(headers["content-length"]))))
    return parts


# -- address and options ---------------------------------------------------------------------------

def test_default_binds_loopback_without_token(view):
    config = parse_view_uri("http://:8080", environ={})
    assert (config.host, config.port, config.loopback, config.token) == ("127.0.0.1", 8080, True, None)
    assert parse_view_uri("http://", environ={}).url() == "http://127.0.0.1:8080/"
    assert view.server.runner.addresses[0][0] == "127.0.0.1" and view.url.startswith("http://127.0.0.1:")
    assert get(view.url)[0] == 200  # no token asked on loopback


@pytest.mark.parametrize("uri, words", [
    ("http://0.0.0.0:8080?token=abcdefgh1", "EDGEAD_VIEW_TOKEN"),
    ("http://127.0.0.1:8080?fps=0", "fps"),
    ("http://127.0.0.1:8080?colour=red", "unknown view option"),
    ("http://127.0.0.1:8080/station1", "root"),
    ("http://127.0.0.1:99999", "port"),
])
def test_bad_view_uris_say_what_to_write(uri, words):
    with pytest.raises(SinkError, match=words):
        open_sink(uri, SinkContext())


def test_token_sources(monkeypatch):
    every = parse_view_uri("http://@:8080", environ={})
    assert every.host == "0.0.0.0" and every.token_generated and len(every.token) >= 20
    assert parse_view_uri("http://0.0.0.0:1", environ={"EDGEAD_VIEW_TOKEN": TOKEN}).token == TOKEN
    given = parse_view_uri("http://0.0.0.0:1", token="given-token", environ={"EDGEAD_VIEW_TOKEN": TOKEN})
    assert given.token == "given-token"  # --view-token wins over the environment
    with pytest.raises(ValueError, match="at least 8"):
        parse_view_uri("http://0.0.0.0:1", token="short", environ={})
    calls = []
    real = view_config.hmac.compare_digest
    monkeypatch.setattr(view_config.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    config = parse_view_uri("http://0.0.0.0:1", token=TOKEN, environ={})
    assert config.token_ok(TOKEN) and not config.token_ok(TOKEN[:-1] + "x") and not config.token_ok(None)
    assert len(calls) == 2  # both answers came from the constant-time comparison


def test_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SinkError, match=f"127.0.0.1:{port}.*cannot listen"):
            open_sink(f"http://127.0.0.1:{port}", SinkContext())


def test_missing_aiohttp_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("edgead.runtime.view")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(SinkError, match=r"aiohttp.*edgead\[view\]"):
        open_sink("http://127.0.0.1:0", SinkContext())


# -- page, static files, status --------------------------------------------------------------------

def test_page_and_static_files_are_local_and_read_only(view):
    status, headers, body = get(view.url)
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for element in ('id="frame"', 'id="verdict"', 'id="count-captured"', 'id="count-errored"', 'id="ng-list"',
                    'id="latency-rows"', 'id="run-certificate"', 'src="/static/app.js"', 'href="/static/style.css"'):
        assert element in page, element
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, headers, body = get(view.url + "static/" + name)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 500
        assert b"http://" not in body and b"https://" not in body  # nothing loaded from elsewhere
    assert b"http://" not in get(view.url)[2] and b"https://" not in get(view.url)[2]
    assert get(view.url + "static/nothing.js")[0] == 404
    assert get(view.url + "static/index.html")[0] == 404
    assert get(view.url, method="POST")[0] == 405  # read-only: no route takes a change
    assert get(view.url + "status", method="PUT")[0] == 405


def test_status_counts_what_the_view_received(view):
    records = feed(view, range(20))
    status = status_of(view)
    assert status["counted_by"] == "view"
    f = status["frames"]
    assert (f["captured"], f["inspected"], f["ng"], f["errored"]) == (20, 20, 4, 0)
    assert status["last"]["frame"] == 19 and status["last"]["verdict"] == records[19]["verdict"] == "OK"
    assert status["latency_ms"]["infer"]["p50"] == 1.5 and status["ended"] is False
    assert status["view"]["frames_in"] == 20 and view.summary()["frames_in"] == 20
    failed = error_inspection("engine: output 'score' contains NaN/Inf")  # an ERROR is shown, never an OK
    view.write(Frame(20, np.zeros((*SHAPE, 3), np.uint8), time.monotonic(), time.time()), failed, 25.0,
               {"frame": 20, "t_capture": time.time(), **failed.to_dict(), "latency_ms": {}, "age_ms": 1.0})
    status = status_of(view)
    assert status["frames"]["errored"] == 1 and status["last"]["verdict"] == "ERROR"
    assert "NaN" in status["last"]["error"] and status["last"]["score"] is None


def test_status_takes_the_pipelines_counters():
    stats = RunStats()
    for _ in range(7):
        stats.count_captured(time.monotonic())
    stats.count_dropped(2)
    for verdict in ("OK", "NG", "OK", "ERROR", "NG"):
        stats.record(verdict, {"infer": 2.0}, 4.0)
    sink = open_sink("http://127.0.0.1:0", SinkContext(stats=stats.summary))
    try:
        feed(sink, range(3))
        status = status_of(sink)
        assert status["counted_by"] == "pipeline" and status["frames"] == stats.summary()["frames"]
        assert status["frames"]["dropped"] == 2 and status["frames"]["errored"] == 1
    finally:
        sink.close()


# -- the NG strip ----------------------------------------------------------------------------------

def test_ng_strip_links_full_size_image_and_record(view):
    records = feed(view, range(30), ng_every=3)  # NG: 0, 3, ..., 27; the strip keeps 4
    newest = [27, 24, 21, 18]
    strip = wait_for(lambda: (s := json.loads(get(view.url + "ng")[2])) and [e["frame"] for e in s] == newest and s,
                     what="the newest NG parts (at most 5 are encoded a second, the newest first)")
    for entry in strip:
        status, headers, body = get(view.url.rstrip("/") + entry["image"])
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (*SHAPE, 3)  # full size
        thumb = cv2.imdecode(np.frombuffer(get(view.url.rstrip("/") + entry["thumb"])[2], np.uint8), cv2.IMREAD_COLOR)
        assert thumb.shape[0] == 96
        status, _, body = get(view.url.rstrip("/") + entry["record"])
        assert status == 200 and json.loads(body) == records[entry["frame"]]
    assert status_of(view)["ng"] == strip
    status, _, body = get(view.url + "ng/3.jpg")  # evicted
    assert status == 404 and b"not in the NG strip" in body
    assert get(view.url + "ng/4.json")[0] == 404  # an OK part


# -- the live frame ---------------------------------------------------------------------------------

def test_mjpeg_stream_shows_new_frames():
    sink = open_sink("http://127.0.0.1:0?fps=60", SinkContext())
    stop = threading.Event()

    def line():
        i = 0
        while not stop.is_set():
            feed(sink, [i])
            i += 1
            time.sleep(0.005)

    writer = threading.Thread(target=line)
    writer.start()
    try:
        with urllib.request.urlopen(sink.url + "stream.mjpg", timeout=10) as response:
            assert response.headers["Content-Type"] == "multipart/x-mixed-replace; boundary=edgeadframe"
            parts = mjpeg_parts(response, 4)
    finally:
        stop.set()
        writer.join()
        sink.close()
    ids = [int(h["x-frame"]) for h, _ in parts]
    assert ids == sorted(ids) and len(set(ids)) == 4  # every part a newer frame
    for headers, body in parts:
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (*SHAPE, 3) and headers["x-verdict"] in ("OK", "NG")
    assert sink.summary()["frames_shown"] >= 4 and sink.summary()["clients_served"] == 1


def test_websocket_sends_a_frame_only_when_the_page_asks_and_the_final_status(view, monkeypatch):
    import aiohttp

    from edgead.runtime.view import server

    monkeypatch.setattr(server, "ACK_TIMEOUT_S", 120.0)

    async def receive(ws, binary: bool):
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type == aiohttp.WSMsgType.BINARY and binary:
                length = struct.unpack(">I", msg.data[:4])[0]
                return json.loads(msg.data[4:4 + length]), msg.data[4 + length:]
            if msg.type == aiohttp.WSMsgType.TEXT and not binary:
                return json.loads(msg.data)
            assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg

    async def session():
        async with aiohttp.ClientSession() as http, http.ws_connect(view.url + "ws") as ws:
            assert (await receive(ws, binary=False))["type"] == "status"
            feed(view, range(5))
            meta, jpeg = await receive(ws, binary=True)
            assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (*SHAPE, 3)
            feed(view, range(5, 40))
            for _ in range(4):  # status keeps coming; no frame until the page says "next"
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT
            await ws.send_str("next")
            newer, _ = await receive(ws, binary=True)
            assert newer["seq"] > meta["seq"] and newer["frame"] == 39  # the newest, not the next in line
            await asyncio.to_thread(view.close)
            final = await receive(ws, binary=False)
            while not final["ended"]:
                final = await receive(ws, binary=False)
            assert final["frames"]["inspected"] == 40 and final["view"]["frames_shown"] == 2
            assert (await ws.receive(timeout=10)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

    asyncio.run(session())


def test_a_frame_the_view_cannot_draw_is_skipped_and_counted(view):
    with urllib.request.urlopen(view.url + "stream.mjpg", timeout=10) as response:
        wait_for(lambda: view.summary()["clients"] == 1, what="the client")
        insp = POST(0.1, np.zeros((16, 16), np.float32), SHAPE)
        view.write(Frame(0, np.zeros((0, 5, 3), np.uint8), 0.0, 0.0), insp, 25.0, {"frame": 0, **insp.to_dict()})
        failures = wait_for(lambda: view.summary()["encode_failures"]["count"] and view.summary()["encode_failures"],
                            what="the failed frame")
        assert failures["count"] == 1 and failures["last"].startswith("frame 0:")
        feed(view, [1])
        (headers, body), = mjpeg_parts(response, 1)
    assert headers["x-frame"] == "1" and cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None


@pytest.mark.timeout(120)
def test_a_client_that_never_reads_never_blocks_the_line():
    sink = open_sink("http://127.0.0.1:0?fps=120&quality=100", SinkContext())
    try:
        stalled = socket.create_connection(("127.0.0.1", sink.server.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never reads
        wait_for(lambda: sink.summary()["clients"] == 1, what="the stalled client")
        noisy = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)  # big JPEGs
        insp = POST(0.1, np.zeros((16, 16), np.float32), (480, 640))
        for i in range(1500):
            sink.write(Frame(i, noisy, time.monotonic(), time.time()), insp, 30.0, {"frame": i, **insp.to_dict()})
        summary = sink.summary()
        assert summary["frames_in"] == 1500 and summary["frames_shown"] < 1500
        assert summary["frames_skipped"] == 1500 - summary["frames_shown"]
        stalled.close()
    finally:
        sink.close()


# -- who may look ----------------------------------------------------------------------------------

def test_beyond_localhost_every_request_needs_the_token():
    sink = open_sink("http://0.0.0.0:0", SinkContext(view_token=TOKEN))
    base = f"http://127.0.0.1:{sink.server.port}/"
    try:
        for path in ("", "static/app.js", "status", "ng", "stream.mjpg", "ws", "ng/1.jpg"):
            status, headers, body = get(base + path)
            assert status == 401 and "Bearer" in headers["WWW-Authenticate"], path
        assert get(base + "status", {"Authorization": "Bearer " + TOKEN[:-1] + "x"})[0] == 401
        assert get(base + "status?token=wrong-token-000")[0] == 401
        assert get(base + "status", {"Authorization": "Bearer " + TOKEN})[0] == 200
        status, headers, _ = get(base + "?token=" + TOKEN)  # the page's way in: a cookie, then a clean URL
        cookie = headers["Set-Cookie"]
        assert status == 303 and headers["Location"] == "/" and TOKEN in cookie
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = cookie.split(";")[0]
        assert get(base, {"Cookie": jar})[0] == 200 and get(base + "static/style.css", {"Cookie": jar})[0] == 200
        assert get(base + "stream.mjpg?token=" + TOKEN, method="HEAD")[0] == 200  # for other players
    finally:
        sink.close()


def test_a_generated_token_is_printed_once(capsys, monkeypatch):
    monkeypatch.delenv("EDGEAD_VIEW_TOKEN", raising=False)
    sink = open_sink("http://0.0.0.0:0", SinkContext())
    try:
        err = capsys.readouterr().err
        assert err.count("?token=") == 1
        token = err.split("?token=")[1].split()[0]
        base = f"http://127.0.0.1:{sink.server.port}/"
        assert get(base + "status")[0] == 401
        assert get(base + "status", {"Authorization": "Bearer " + token})[0] == 200
    finally:
        sink.close()


def test_loopback_view_refuses_other_hosts_and_cross_site_websockets(view):
    assert get(view.url + "status", {"Host": "attacker.example"})[0] == 403  # DNS rebinding
    assert get(view.url + "status", {"Host": "localhost"})[0] == 200
    import aiohttp

    async def handshake(origin: str) -> int:
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(view.url + "ws", headers={"Origin": origin}):
                    return 101
            except aiohttp.WSServerHandshakeError as err:
                return err.status

    host = view.url.split("//")[1].rstrip("/")
    assert asyncio.run(handshake("http://attacker.example")) == 403  # its cookies would ride along
    assert asyncio.run(handshake(f"http://{host}")) == 101


# -- the bundle, banners ----------------------------------------------------------------------------

def test_certificate_status_and_unverified_banner(tmp_path):
    run = {"model": str(tmp_path), "detector": "ssim_ae", "backend": "onnxruntime",
           "input": "synthetic://metal", "precision": "fp32", "calibration": CAL.to_dict()}
    certified = {"status": "certified", "detail": "onnxruntime/fp32 certified on device X"}
    ok = describe_run({**run, "certificate": certified})
    assert ok["certificate"] == certified and ok["banners"] == []
    unverified = describe_run({**run, "certificate": {"status": "unverified", "detail": "no certificate here"}})
    assert unverified["banners"][0]["text"] == "UNVERIFIED ENGINE: no certificate here"
    warned = describe_run({**run, "certificate": {"status": "unverified", "detail": "x"},
                           "warnings": ["WARNING: bundle has no certificate of this device"]})
    assert [b["text"] for b in warned["banners"]] == ["bundle has no certificate of this device"]
    assert describe_run(run)["certificate"]["status"] == "unknown" and describe_run(run)["banners"] == []

    sink = open_sink("http://127.0.0.1:0", SinkContext(run={**run, "certificate": {"status": "unverified",
                                                                                   "detail": "no certificate"}}))
    try:
        status = status_of(sink)
        assert status["run"]["certificate"]["status"] == "unverified" and status["run"]["detector"] == "ssim_ae"
        assert [b["kind"] for b in status["banners"]] == ["unverified"]
        feed(sink, range(3), score=-5.0)  # far below every validation score: passes as OK
        assert [b["kind"] for b in status_of(sink)["banners"]] == ["unverified", "range"]
    finally:
        sink.close()


# -- through edgead-run ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return view_bundle(tmp_path_factory)


def test_edgead_run_reports_the_views_counters(bundle, tmp_path):
    from edgead.runtime.cli import main

    uri = "http://127.0.0.1:0"
    rc = main(["synthetic://metal?size=64", "--model", str(bundle), "--output", uri, "--frames", "12",
               "--results", str(tmp_path), "--quiet"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0 and summary["sinks"][uri]["frames_in"] == 12 == summary["frames"]["inspected"]


def test_an_unverified_bundle_run_anyway_shows_a_banner(bundle, tmp_path, monkeypatch):
    import shutil

    from edgead.runtime import view
    from edgead.runtime.cli import main

    uncertified = tmp_path / "bundle"
    shutil.copytree(bundle, uncertified)
    for certificate in uncertified.glob("*.cert.json"):  # certificates sit beside the graphs, outside the checksums
        certificate.unlink()
    opened = []
    real = view.open_view_sink
    monkeypatch.setattr(view, "open_view_sink", lambda uri, context: opened.append(real(uri, context)) or opened[-1])
    rc = main(["synthetic://metal?size=64", "--model", str(uncertified), "--output", "http://127.0.0.1:0",
               "--frames", "4", "--results", str(tmp_path / "r"), "--quiet", "--no-certify", "--allow-unverified"])
    status = opened[0].server.status()
    assert rc == 0 and status["run"]["certificate"]["status"] == "unverified"
    assert [b["kind"] for b in status["banners"]] == ["unverified"]
    banner = status["banners"][0]["text"]  # the start-up warning itself
    assert "certificate" in banner and "--allow-unverified" in banner


def test_help_documents_the_view(capsys):
    from edgead.runtime.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "http://127.0.0.1:8080" in text and "EDGEAD_VIEW_TOKEN" in text and "--view-token" in text


def test_demo_serves_the_conveyor(bundle, tmp_path, monkeypatch):
    from edgead.runtime import demo, view
    from edgead.runtime.cli import main

    info = {"category": "metal", "size": 64, "detector": "ssim_ae"}
    monkeypatch.setattr(demo, "build_bundle", lambda cache, say, rebuild=False: (bundle, info))
    opened = []
    real = view.open_view_sink
    monkeypatch.setattr(view, "open_view_sink", lambda uri, context: opened.append((real(uri, context), context))
                        or opened[-1][0])
    codes = []
    run = threading.Thread(target=lambda: codes.append(main(["--demo", "--output", "http://127.0.0.1:0", "--quiet",
                                                             "--input-rate", "30", "--results", str(tmp_path)])))
    run.start()
    try:
        sink, context = wait_for(lambda: opened and opened[0], timeout=60, what="the demo's view")
        with urllib.request.urlopen(sink.url + "stream.mjpg", timeout=20) as response:
            parts = mjpeg_parts(response, 2)
        context.on_quit()  # what a closed window does: stop the run
    finally:
        run.join(60)
    for _, body in parts:
        assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (64, 64, 3)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert codes == [0] and summary["input"].startswith("synthetic://metal?size=64")
    assert summary["sinks"]["http://127.0.0.1:0"]["frames_shown"] >= 2
