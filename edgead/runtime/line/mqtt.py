"""``mqtt://HOST:PORT/TOPIC``: one JSON message per frame, or per frame that is not OK, to an MQTT
broker (paho-mqtt), for the MES and the plant's dashboards.

    mqtt://broker:1883/plant/line1/station3?on=all&qos=1

Options (besides the common ones in :mod:`edgead.runtime.line`):
    on=all|ng       every frame (default), or only frames that are not OK (NG and ERROR)
    qos=0|1|2       default 1: the broker acknowledges each verdict; ``sent`` counts PUBACKs
    station=NAME    the station's name in every message and in its status (default: host name)
    status=TOPIC    retained status topic (default TOPIC/status): {"state": "online", ...} while
                    running, "offline" on a clean stop, and the last will "offline" (reason
                    "connection lost") when the station dies
    keepalive=S     MQTT keepalive (default 5 s): a dead broker is noticed within 1.5 x S
    tls=1           TLS with the system CAs (default port then 8883); ca=FILE (a CA bundle,
                    implies tls), cert=FILE & key=FILE (client certificate; key passphrase in
                    $EDGEAD_MQTT_KEY_PASSWORD)
    credentials=FILE  JSON {"username": .., "password": ..}; else $EDGEAD_MQTT_CREDENTIALS (a file),
                    else $EDGEAD_MQTT_USERNAME / $EDGEAD_MQTT_PASSWORD. Never in the URI.

Each message is the frame's JSONL record (frame, t_capture, verdict, score, score_norm, regions,
latency_ms, age_ms, truth, and whatever else the record holds) plus ``station`` and ``threshold``.
A verdict handed to paho stays "queued" until its PUBACK; across a reconnect paho re-sends it
(at least once: a subscriber may see a duplicate, never a gap it is not told about).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt

from edgead.runtime.line.outbox import LineSink, LinkError, Message, Outbox, OutboxOptions, not_ok, to_json
from edgead.runtime.line.uri import Credentials, LineURI, load_credentials
from edgead.runtime.sinks import SinkContext, SinkError

CONNECT_TIMEOUT_S = 3.0


def open_mqtt_sink(uri: str, context: SinkContext) -> LineSink:
    u = LineURI.parse(uri, default_port=1883)
    topic = u.path.strip("/")
    if not topic or any(c in topic for c in "#+"):
        raise SinkError(f"{uri}: give the topic to publish on, without wildcards: mqtt://HOST:PORT/plant/line1/station")
    ca = u.path_option("ca")
    cert, key = u.path_option("cert"), u.path_option("key")
    tls = bool(u.flag("tls", False) or ca or cert)
    if tls and not u.port_given:
        u.port = 8883
    if bool(cert) != bool(key):
        raise SinkError(f"{uri}: a client certificate needs both cert=FILE and key=FILE")
    on = u.choice("on", "all", ("all", "ng"))
    station = u.text_option("station") or socket.gethostname()
    transport = MqttTransport(
        u.host, u.port, topic, qos=int(u.integer("qos", 1, 0, 2)), station=station,
        status_topic=u.text_option("status") or f"{topic}/status",
        keepalive=int(u.integer("keepalive", 5, 1, 65535)), credentials=load_credentials(u, "EDGEAD_MQTT", context.say),
        tls={"ca_certs": str(ca) if ca else None, "certfile": str(cert) if cert else None,
             "keyfile": str(key) if key else None, "keyfile_password": os.environ.get("EDGEAD_MQTT_KEY_PASSWORD")}
        if tls else None,
        run={**context.run, "on": on})
    options = OutboxOptions.from_uri(u)
    u.check_unknown()
    return LineSink(uri, transport, options, context.say, select=not_ok if on == "ng" else (lambda verdict: True))


class MqttTransport:
    name = "mqtt"

    def __init__(self, host: str, port: int, topic: str, qos: int, station: str, status_topic: str, keepalive: int,
                 credentials: Credentials | None, tls: dict[str, Any] | None, run: dict[str, Any]) -> None:
        self.host, self.port, self.topic, self.qos, self.keepalive = host, port, topic, qos, keepalive
        self.station, self.status_topic = station, status_topic
        self.threshold = run.get("threshold")
        self.status = {"station": station, "topic": topic,
                       **{k: run[k] for k in ("model", "detector", "backend", "precision", "input", "threshold",
                                              "certified", "on") if k in run}}
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgead-{station}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        self.client.max_inflight_messages_set(20)
        self.client.will_set(status_topic, self._status("offline", "connection lost"), qos=1, retain=True)
        if credentials:
            self.client.username_pw_set(credentials.username, credentials.password)
        if tls:
            try:
                self.client.tls_set(**tls)
            except (OSError, ssl.SSLError, ValueError) as err:
                raise SinkError(f"mqtt://{host}:{port}/{topic}: TLS setup failed ({err})") from err
        self.client.on_connect, self.client.on_disconnect = self._on_connect, self._on_disconnect
        self.client.on_publish = self._on_publish
        self._connack = threading.Event()
        self._refused: str | None = None
        self._up = False
        self._lock = threading.Lock()
        self._seq_of: dict[int, int | None] = {}  # paho mid -> outbox seq (None: a status message)
        self._early: dict[int, float] = {}  # PUBACKs that came before publish() returned
        self.outbox: Outbox | None = None

    def bind(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def _status(self, state: str, reason: str | None = None) -> str:
        return json.dumps({**self.status, "state": state, "reason": reason, "t": round(time.time(), 6)}, default=str)

    # -- paho's network thread -------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        else:
            self._up = True
        self._connack.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._up = False
        if self.outbox is not None:
            self.outbox.wake()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if mid not in self._seq_of:
                self._early[mid] = now
                return
            seq = self._seq_of.pop(mid)
        if seq is not None and self.outbox is not None:
            self.outbox.delivered(seq, now)

    def _track(self, mid: int, seq: int | None) -> float | None:
        """Remember which verdict ``mid`` carries; its confirmation time if it is already in."""
        with self._lock:
            if mid in self._early:
                return self._early.pop(mid)
            self._seq_of[mid] = seq
            return None

    # -- the outbox's thread ---------------------------------------------------------------------
    def connect(self) -> None:
        self.client.loop_stop()  # the network thread of the previous connection has ended
        self._connack.clear()
        self._refused = None
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise LinkError(f"broker {self.host}:{self.port}: {err}") from err
        self.client.loop_start()
        if not self._connack.wait(CONNECT_TIMEOUT_S) or self._refused:
            why = f"broker refused: {self._refused}" if self._refused else "no CONNACK"
            self.client.loop_stop()
            raise LinkError(f"broker {self.host}:{self.port}: {why}")
        info = self.client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        self._track(info.mid, None)

    def send(self, message: Message) -> float | None:
        payload = to_json({"station": self.station, **message.record, "threshold": self.threshold})
        info = self.client.publish(self.topic, payload, qos=self.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and not (info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0):
            raise LinkError(f"publish failed: {mqtt.error_string(info.rc)}")
        # QoS > 0 without a connection: paho keeps it and sends it after the reconnect.
        return self._track(info.mid, message.seq)

    def probe(self) -> None:
        pass  # paho's keepalive pings the broker; a loss calls _on_disconnect

    def is_up(self) -> bool:
        return self._up

    def goodbye(self) -> None:
        """A clean stop: the retained status says so (the last will is for a crash)."""
        if not self._up:
            return
        info = self.client.publish(self.status_topic, self._status("offline", "stopped"), qos=1, retain=True)
        self._track(info.mid, None)
        try:
            info.wait_for_publish(1.0)
        except (RuntimeError, ValueError):
            pass

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._up = False
