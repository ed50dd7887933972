"""Real servers for the line-sink tests, all on 127.0.0.1: a mosquitto broker the test starts and
kills itself, a pymodbus server, a paho subscriber, a tiny certified bundle, and a synthetic source
that holds at given frames so a fault can be injected at an exact point of the run."""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from bundles import tiny_bundle

LOOPBACK = "127.0.0.1"
SIZE = 32
CATEGORY = "metal"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Wait on a condition, never on a clock: the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((LOOPBACK, port)) == 0


# -- the bundle ----------------------------------------------------------------------------------

def line_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' small certified bundle (tests/bundles.py) on the line tests' category, once."""
    return tiny_bundle(tmp_path_factory.getbasetemp() / "line_bundle", CATEGORY, n_val=16)


def read_log(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "event" not in r]


def link_events(path: Path) -> list[tuple[int, list[str]]]:
    """(frame, outputs down) of each change of the outputs' links, as the log records them."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["frame"], r["down"]) for r in rows if r.get("event") == "output_links"]


# -- mosquitto -----------------------------------------------------------------------------------

def mosquitto_binary(tool: str = "mosquitto") -> str:
    """Path of mosquitto (or of a tool of its package, e.g. mosquitto_passwd); the test skips without it."""
    found = shutil.which(tool) or next((str(p) for p in (Path("/usr/sbin") / tool, Path("/usr/bin") / tool)
                                        if p.exists()), None)
    if not found:
        pytest.skip(f"{tool} is not installed (.ci/run installs it: apt-get install mosquitto)")
    return found


class Mosquitto:
    """A broker on 127.0.0.1:port with its own config, killed and restarted at will. With
    ``save_first`` a kill first has the broker write its persistence file (SIGUSR1), so that a
    persistent subscriber's session survives the SIGKILL."""

    def __init__(self, folder: Path, port: int | None = None, extra: str = "", anonymous: bool = True) -> None:
        self.folder, self.port = folder, port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "db").mkdir(exist_ok=True)
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {LOOPBACK}\nallow_anonymous {'true' if anonymous else 'false'}\n"
            f"persistence true\npersistence_location {folder / 'db'}/\nuser {getpass.getuser()}\n{extra}")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        log = open(self.folder / "broker.log", "ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.config)], stdout=log, stderr=log)
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, "the broker to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {(self.folder / 'broker.log').read_text()[-2000:]}")
        return self

    def kill(self, save_first: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if save_first:
                saved = self.folder / "db" / "mosquitto.db"
                saved.unlink(missing_ok=True)
                self.proc.send_signal(signal.SIGUSR1)
                wait_until(saved.exists, "the broker to save its sessions")
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    stop = kill


class Subscriber:
    """A second paho client that records every message (topic, payload, retained)."""

    def __init__(self, port: int, topic: str, client_id: str | None = None, persistent: bool = False,
                 username: str | None = None, password: str | None = None, **tls: Any) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(**tls)
        self.client.connect(LOOPBACK, port, keepalive=5)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, "the subscription")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self.lock:
            self.messages.append((message.topic, json.loads(message.payload), bool(message.retain)))

    def on(self, topic: str) -> list[dict]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- pymodbus ------------------------------------------------------------------------------------

class ModbusServer:
    """pymodbus's own TCP server on 127.0.0.1 in a thread; records every write it receives."""

    def __init__(self, port: int | None = None, unit: int = 1) -> None:
        self.port, self.unit = port or free_port(), unit
        self.writes: list[tuple[int, str, int, int]] = []  # (unit, kind, address, value)
        self.lock = threading.Lock()
        self.loop: Any = None
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def _trace(self, sending: bool, pdu: Any) -> Any:
        name = type(pdu).__name__
        if not sending and name in ("WriteSingleCoilRequest", "WriteSingleRegisterRequest"):
            value = int(pdu.bits[0]) if name == "WriteSingleCoilRequest" else int(pdu.registers[0])
            with self.lock:
                self.writes.append((pdu.dev_id, "coil" if "Coil" in name else "register", pdu.address, value))
        return pdu

    def start(self) -> "ModbusServer":
        import asyncio
        import logging

        from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
        from pymodbus.server import ModbusTcpServer

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        device = ModbusDeviceContext(co=ModbusSequentialDataBlock(1, [0] * 64),
                                     hr=ModbusSequentialDataBlock(1, [0] * 64))
        context = ModbusServerContext(devices={self.unit: device}, single=False)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self.server = ModbusTcpServer(context, address=(LOOPBACK, self.port), trace_pdu=self._trace)
            ready.set()
            await self.server.serve_forever()

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True)
        self.thread.start()
        wait_until(lambda: ready.is_set() and port_open(self.port), "the Modbus server to listen")
        return self

    def stop(self) -> None:
        import asyncio

        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
            self.thread.join(10)
            self.loop.close()
            self.server = None

    def pulses(self, kind: str, address: int) -> list[int]:
        """The values written to one output, in order."""
        with self.lock:
            return [v for u, k, a, v in self.writes if k == kind and a == address and u == self.unit]


# -- a synthetic conveyor that can hold --------------------------------------------------------

class HeldSource:
    """``total`` synthetic conveyor frames, read on demand; before frame i, ``holds[i]()`` runs in
    the capture thread (the test injects its fault there)."""

    live = False
    reconnectable = False

    def __init__(self, total: int, holds: dict[int, Callable[[], None]] | None = None, seed: int = 3) -> None:
        from edgead.data.synth import Conveyor

        self.uri = f"synthetic://{CATEGORY}?size={SIZE}&seed={seed}"
        self.conveyor = Conveyor(CATEGORY, size=SIZE, seed=seed, defect_rate=0.3)
        self.total, self.holds, self.index = total, holds or {}, 0

    def open(self) -> None:
        pass

    def read(self):
        from edgead.runtime.sources import EndOfStream, Truth

        if self.index >= self.total:
            raise EndOfStream
        if self.index in self.holds:
            self.holds[self.index]()
        image, mask, defect = self.conveyor[self.index]
        self.index += 1
        return image, Truth(defect, mask)

    def close(self) -> None:
        pass


def pipeline_for(bundle: Path, source: Any, sinks: list[Any], log_path: Path, fail_safe: bool = False):
    """The station's real pipeline (ONNX Runtime engine, post-processing, JSONL log)."""
    from edgead.runtime.infer import load_checked_bundle, open_bundle_engine
    from edgead.runtime.log import JsonlLog
    from edgead.runtime.pipeline import Pipeline, PipelineConfig
    from edgead.runtime.postprocess_stage import Postprocessor

    b = load_checked_bundle(str(bundle), "onnxruntime", "fp32")
    engine = open_bundle_engine(b, "onnxruntime", "fp32", threads=1)
    log = JsonlLog(log_path)
    return Pipeline(source, engine, Postprocessor(b.calibration), sinks, log,
                    PipelineConfig(policy="block", fail_safe_output=fail_safe)), engine, log


def run_context(bundle: Path, **extra: Any):
    from edgead.core.bundle import load_bundle
    from edgead.runtime.sinks import SinkContext

    b = load_bundle(str(bundle))
    messages: list[str] = []
    run = {"model": str(bundle), "detector": b.detector, "backend": "onnxruntime", "precision": "fp32",
           "input": f"synthetic://{CATEGORY}", "threshold": b.calibration.image_threshold, "certified": True, **extra}
    return SinkContext(say=messages.append, run=run), messages


# -- certificates for TLS tests ----------------------------------------------------------------

def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files): ca, cert, key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> Any:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
                                critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("edgead test CA", "edgead test CA", ca_key, ca_key, True)
    cert = build(LOOPBACK, "edgead test CA", key, ca_key, False)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
