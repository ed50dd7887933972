"""``opc.tcp://HOST:PORT[/PATH]``: the station *serves* an OPC UA information model (asyncua) that a
PLC or SCADA reads or subscribes to.

    opc.tcp://0.0.0.0:4840/edgead?credentials=/etc/edgead/opcua.json

Objects/<station> (namespace ``urn:edgead:station``), read-only:
    Verdict, Score, ScoreNorm, Threshold, Frame, CaptureTime, Regions, Error, LastRecord (JSON)
        of the last frame
    Inspected, NG, Errored, Dropped       counters as in the run's summary (dropped: frames captured
                                           before the last one reported that never reached here)
    Model, Detector, Backend, Precision, Input, Certified, CertificateStatus
    Heartbeat (+1 every heartbeat_ms, default 1000), Running (false once the station stops)

Security (``security=``):
    auto (default)   none on a loopback address, basic256sha256 otherwise
    none             the None policy, anonymous read access: only on loopback, unless
                     allow_insecure=1 says the network is isolated
    basic256sha256   Basic256Sha256 Sign&Encrypt only; no anonymous access: clients log in with the
                     username/password of credentials=FILE (JSON), $EDGEAD_OPCUA_CREDENTIALS or
                     $EDGEAD_OPCUA_USERNAME/_PASSWORD, or with a user certificate from trust=DIR.
                     With trust=DIR only those client certificates may open a channel.
                     The server certificate: cert=FILE & key=FILE, else one made once and kept in
                     pki=DIR (default $EDGEAD_PKI or ~/.local/share/edgead/opcua).

``sent`` counts frames whose values are in the address space (what a read returns; subscribers
get them at their next publishing interval); the latency is to that moment.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from asyncua import Server, ua

from edgead.core.contract import ERROR, NG, OK
from edgead.runtime.line import opcua_security as sec
from edgead.runtime.line.outbox import LineSink, LinkError, Message, Outbox, OutboxOptions, to_json
from edgead.runtime.line.uri import LineURI, load_credentials
from edgead.runtime.sinks import SinkContext, SinkError

NAMESPACE = "urn:edgead:station"
START_TIMEOUT_S = 30.0
V = ua.VariantType
# name -> (variant type, initial value)
LAST = {"Verdict": (V.String, ""), "Score": (V.Double, float("nan")), "ScoreNorm": (V.Double, float("nan")),
        "Threshold": (V.Double, float("nan")), "Frame": (V.Int64, -1),
        "CaptureTime": (V.DateTime, datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)),
        "Regions": (V.UInt32, 0), "Error": (V.String, ""), "LastRecord": (V.String, "")}
COUNTERS = {"Inspected": (V.UInt64, 0), "NG": (V.UInt64, 0), "Errored": (V.UInt64, 0), "Dropped": (V.UInt64, 0)}
STATION = {"Model": (V.String, ""), "Detector": (V.String, ""), "Backend": (V.String, ""), "Precision": (V.String, ""),
           "Input": (V.String, ""), "Certified": (V.Boolean, False), "CertificateStatus": (V.String, ""),
           "Heartbeat": (V.UInt64, 0), "Running": (V.Boolean, True)}


def open_opcua_sink(uri: str, context: SinkContext) -> LineSink:
    u = LineURI.parse(uri, default_port=4840)
    station = u.text_option("station") or socket.gethostname()
    security = u.choice("security", "auto", ("auto", "none", "basic256sha256"))
    secure = security == "basic256sha256" or (security == "auto" and not u.loopback)
    if not secure and not u.loopback and not u.flag("allow_insecure", False):
        raise SinkError(f"{uri}: the None security policy is allowed only on a loopback address; use "
                        "security=basic256sha256 (with credentials), or allow_insecure=1 on an isolated network")
    u.used.add("allow_insecure")
    credentials = load_credentials(u, "EDGEAD_OPCUA", context.say)
    trusted = sec.trusted_certificates(u.path_option("trust"))
    cert, key = u.path_option("cert"), u.path_option("key")
    pki = Path(u.text_option("pki") or sec.default_pki_dir()).expanduser()
    heartbeat_s = u.number("heartbeat_ms", 1000.0, minimum=10.0) / 1000.0
    options = OutboxOptions.from_uri(u, capacity=100)
    u.check_unknown()
    if bool(cert) != bool(key):
        raise SinkError(f"{uri}: a server certificate needs both cert=FILE and key=FILE")
    app_uri = f"urn:edgead:{station}"
    if secure:
        if not credentials and not trusted:
            raise SinkError(f"{uri}: security is on and nobody could log in: give credentials=FILE (or "
                            "$EDGEAD_OPCUA_USERNAME/_PASSWORD) or trust=DIR with client certificates")
        if cert is None:
            cert, key = sec.ensure_certificate(pki, f"edgead-{station}", app_uri, u.host, context.say)
        app_uri = sec.certificate_uri(cert) or app_uri
    transport = OpcUaTransport(u, station, app_uri, secure, (cert, key) if secure else None,
                               sec.StationUsers(secure, credentials, trusted), trusted, heartbeat_s, context.run)
    transport.start()
    context.say(f"{uri}: OPC UA server up ({'Basic256Sha256 Sign&Encrypt' if secure else 'security None'}), "
                f"namespace {NAMESPACE}, object {station}")
    counts = StationCounts()
    return LineSink(uri, transport, options, context.say, prepare=counts.add)


class StationCounts:
    """Counters from the frames as they reach the sink (the pipeline thread): the message of a frame
    carries the counts including it, so a reader never sees a verdict with stale counters."""

    def __init__(self) -> None:
        self.inspected = self.ng = self.errored = self.seen = 0

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        verdict = record.get("verdict")
        self.seen += 1
        self.inspected += verdict in (OK, NG)
        self.ng += verdict == NG
        self.errored += verdict == ERROR
        dropped = max(int(record.get("frame", -1)) + 1 - self.seen, 0)
        return {"record": record, "Inspected": self.inspected, "NG": self.ng, "Errored": self.errored,
                "Dropped": dropped}


class OpcUaTransport:
    name = "opcua"

    def __init__(self, uri: LineURI, station: str, app_uri: str, secure: bool, cert: tuple[Path, Path] | None,
                 users: sec.StationUsers, trusted: set[bytes], heartbeat_s: float, run: dict[str, Any]) -> None:
        self.uri, self.station, self.app_uri, self.secure, self.cert = uri, station, app_uri, secure, cert
        self.users, self.trusted, self.heartbeat_s, self.run = users, trusted, heartbeat_s, run
        self.endpoint = f"opc.tcp://{uri.host}:{uri.port}{uri.path or '/'}"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edgead-opcua-server", daemon=True)
        self.server: Server | None = None
        self.nodes: dict[str, Any] = {}
        self._written: dict[str, Any] = {}  # last value of each node (NaN != NaN: always rewritten)
        self._running = False
        self._heartbeat = 0

    def bind(self, outbox: Outbox) -> None:
        pass

    def _call(self, coroutine: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    # -- server life -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        try:
            self._call(self._start(), START_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - port in use, bad certificate...: a start-up error
            self._call_quietly(self._stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise SinkError(f"{self.uri.text}: cannot start the OPC UA server ({err})") from err
        self._running = True

    async def _start(self) -> None:
        logging.getLogger("asyncua").setLevel(logging.ERROR)  # its per-session warnings flood a station log
        server = Server(user_manager=self.users)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"edgead station {self.station}")
        await server.set_application_uri(self.app_uri)
        if self.secure:
            await server.load_certificate(str(self.cert[0]))
            await server.load_private_key(str(self.cert[1]))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            if self.trusted:
                server.set_certificate_validator(sec.channel_validator(self.trusted))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens(sec.identity_tokens(self.secure, self.users.credentials, self.trusted))
        idx = await server.register_namespace(NAMESPACE)
        station = await server.nodes.objects.add_object(idx, self.station)
        for name, (vtype, value) in {**LAST, **COUNTERS, **STATION}.items():
            self.nodes[name] = await station.add_variable(idx, name, ua.Variant(value, vtype))
        self.server = server
        await server.start()
        await self._write(self._station_values())
        self._beat = asyncio.ensure_future(self._heartbeat_loop())

    def _station_values(self) -> dict[str, Any]:
        run = self.run
        certified = run.get("certified")
        status = {True: f"certified: parity passed for {run.get('backend')}/{run.get('precision')}",
                  False: "UNVERIFIED: running with --allow-unverified"}.get(certified, "unknown")
        values = {k: str(run.get(k.lower(), "")) for k in ("Model", "Detector", "Backend", "Precision", "Input")}
        values.update(Certified=bool(certified), CertificateStatus=status, Running=True)
        if isinstance(run.get("threshold"), (int, float)):
            values["Threshold"] = float(run["threshold"])
        return values

    async def _write(self, values: dict[str, Any]) -> None:
        """Write the values that changed (an unchanged value would only wake subscribers)."""
        assert self.server is not None
        for name, value in values.items():
            if name in self._written and self._written[name] == value:
                continue
            vtype = (LAST.get(name) or COUNTERS.get(name) or STATION[name])[0]
            await self.server.write_attribute_value(self.nodes[name].nodeid, ua.DataValue(ua.Variant(value, vtype)))
            self._written[name] = value

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._heartbeat += 1
            await self._write({"Heartbeat": self._heartbeat})

    async def _stop(self) -> None:
        if getattr(self, "_beat", None) is not None:
            self._beat.cancel()
        if self.server is not None:
            try:
                await self._write({"Running": False})
            finally:
                await self.server.stop()
                self.server = None

    def _call_quietly(self, coroutine: Any) -> None:
        try:
            self._call(coroutine, 10.0)
        except Exception:  # noqa: BLE001 - stopping a half-started server
            pass

    # -- the outbox's side -----------------------------------------------------------------------
    def connect(self) -> None:
        if not self._running:
            raise LinkError("the OPC UA server is not running")

    def send(self, message: Message) -> float | None:
        payload = message.record
        record = payload["record"]
        values = {k: payload[k] for k in COUNTERS}
        values.update(Verdict=str(record.get("verdict", "")), Frame=int(record.get("frame", -1)),
                      Score=_number(record.get("score")), ScoreNorm=_number(record.get("score_norm")),
                      Regions=len(record.get("regions") or []), Error=str(record.get("error") or ""),
                      LastRecord=to_json(record))
        if isinstance(record.get("t_capture"), (int, float)):
            values["CaptureTime"] = datetime.datetime.fromtimestamp(record["t_capture"], datetime.timezone.utc)
        try:
            self._call(self._write(values), 5.0)
        except Exception as err:  # noqa: BLE001 - the server's loop is gone or stuck
            raise LinkError(f"cannot update the address space: {err!r}") from err
        return time.monotonic()

    def probe(self) -> None:
        if not (self._running and self._thread.is_alive()):
            raise LinkError("the OPC UA server stopped")

    def is_up(self) -> bool:
        return self._running

    def disconnect(self) -> None:
        pass  # a server has no link of its own to drop; close() stops it

    def goodbye(self) -> None:
        if self._running:
            self._running = False
            self._call_quietly(self._stop())
            self.loop.call_soon_threadsafe(self.loop.stop)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")
