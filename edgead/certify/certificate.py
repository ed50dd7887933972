"""Device certificates: a parity result bound to the station, the backend and the engine it tested.

A certificate is keyed by backend and precision, the backend's version (ONNX Runtime or
TensorRT), the device (GPU name and compute capability, or the CPU model and its ISA flags from
:mod:`edgead.core.machine`) and the engine file's SHA-256 where there is one (a TensorRT plan).
It also records the graph's SHA-256 and the bundle's manifest digest, so it speaks for exactly
one export.

Where: beside the ONNX graphs, as ``<graph>.<precision>.<backend>.<device>.cert.json`` next to
TensorRT's engine cache; never in the manifest's checksummed ``files`` (a station writes it
after export, and the export must stay byte-identical).

Tamper evidence: each certificate carries an HMAC-SHA256 made with this station's secret key,
created (0600) on the first certification at ``$EDGEAD_STATION_KEY``, else
``$XDG_CONFIG_HOME/edgead/station.key`` (``~/.config/edgead/station.key``). A hand-edited
``"pass": true`` no longer matches its HMAC; a certificate copied from another station was made
with another key (and names another device); a certificate of an older export names another
manifest digest. Binding to the digest alone would catch the last case but not the first two:
anyone can recompute a digest, nobody without the station key can make an HMAC.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgead.core import machine
from edgead.core.bundle import FUSED, Bundle
from edgead.core.manifest import canonical_json

KEY_ENV = "EDGEAD_STATION_KEY"
SUFFIX = ".cert.json"
VERSION = 1


class CertificateError(RuntimeError):
    """A certificate cannot be written (read-only bundle folder, unreadable station key)."""


# ---------------------------------------------------------------- the device
@dataclass(frozen=True)
class Device:
    """What a certificate is keyed by, besides backend and precision."""

    backend: str
    backend_version: str
    kind: str  # "cpu" | "gpu"
    name: str  # CPU model / GPU name
    detail: str  # ISA flags / compute capability

    @property
    def label(self) -> str:
        return f"{self.backend} {self.backend_version} on {self.kind.upper()} {self.name} [{self.detail}]"

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "backend_version": self.backend_version, "kind": self.kind,
                "name": self.name, "detail": self.detail}


def cpu_fingerprint() -> tuple[str, str]:
    """(CPU model, its inference-relevant ISA flags) of this machine."""
    info = machine.describe()
    return str(info["cpu"]), " ".join(f for f, on in info["isa"].items() if on) or "no listed ISA extension"


def device_of(engine: Any) -> Device:
    """The device an open engine runs on: TensorRT -> its GPU; OpenVINO -> the CPU; ONNX Runtime ->
    the CPU, or the GPU when a CUDA/TensorRT execution provider is active."""
    backend = getattr(engine, "backend", "?")
    if backend == "tensorrt":
        return Device(backend, str(engine.backend_version), "gpu", str(engine.device_name),
                      f"sm{engine.compute_capability}")
    if backend == "openvino":  # OpenVINO's CPU plugin: the CPU, as for ONNX Runtime's CPU provider
        name, flags = cpu_fingerprint()
        return Device(backend, str(engine.backend_version), "cpu", name, flags)
    import onnxruntime

    providers = getattr(engine, "active_providers", ["CPUExecutionProvider"])
    if providers and providers[0] != "CPUExecutionProvider":
        from edgead.engines import cuda_rt

        gpu = cuda_rt.device_info()
        return Device(backend, f"{onnxruntime.__version__} {providers[0]}", "gpu", gpu.name,
                      f"sm{gpu.compute_capability}")
    name, flags = cpu_fingerprint()
    return Device(backend, onnxruntime.__version__, "cpu", name, flags)


# ---------------------------------------------------------------- the station key
def station_key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "edgead" / "station.key"


def station_key(create: bool = False) -> bytes | None:
    """This station's HMAC key (32 random bytes, hex in a 0600 file); created on request."""
    path = station_key_path()
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return station_key()
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"{path}: unreadable station key ({exc}); remove it to make a new one "
                               "(every certificate of this station must then be made again)") from exc


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"edgead station key\n" + key).hexdigest()[:16]


def _mac(key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- files
def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "device"


def _stem(bundle: Bundle, precision: str, graph: str) -> Path:
    """``<graph>.<precision>`` beside the graph; a precision computed on another precision's graph
    (bf16 on the FP32 graph) adds its own name, so its certificates never share the graph's."""
    onnx = bundle.graph_path(graph, precision)
    return onnx.with_name(onnx.stem if onnx.stem.endswith(f".{precision}") else f"{onnx.stem}.{precision}")


def certificate_path(bundle: Bundle, precision: str, device: Device, graph: str = FUSED) -> Path:
    stem = _stem(bundle, precision, graph)
    tag = hashlib.sha256(json.dumps(device.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return stem.with_name(f"{stem.name}.{device.backend}.{_slug(device.name)}-{tag}{SUFFIX}")


def certificates_for(bundle: Bundle, backend: str, precision: str, graph: str = FUSED) -> list[Path]:
    stem = _stem(bundle, precision, graph)
    return sorted(stem.parent.glob(f"{stem.name}.{backend}.*{SUFFIX}"))


def write_certificate(bundle: Bundle, engine: Any, precision: str, result: dict[str, Any],
                      graph: str = FUSED) -> Path:
    """Seal ``result`` (a parity summary with "pass") for this station, engine and export."""
    device = device_of(engine)
    key = station_key(create=True)
    assert key is not None
    body = {"edgead_certificate": VERSION, "backend": device.backend, "precision": precision,
            "device": device.to_dict(), "graph": bundle.graph_file(graph, precision),
            "graph_sha256": bundle.spec.files.get(bundle.graph_file(graph, precision)),
            "engine_sha256": getattr(engine, "plan_sha256", None), "manifest_digest": bundle.digest,
            "station_key_id": key_id(key),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **result}
    path = certificate_path(bundle, precision, device, graph)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({**body, "hmac": _mac(key, body)}, indent=2, allow_nan=False) + "\n")
        tmp.replace(path)
    except OSError as exc:
        raise CertificateError(f"{path.parent}: cannot write the certificate ({exc}); the bundle folder must "
                               "be writable on the station (TensorRT keeps its engine cache there too)") from exc
    return path


# ---------------------------------------------------------------- checking
@dataclass
class Finding:
    """What the certificates of one backend/precision say about this station and engine."""

    certificate: dict[str, Any] | None  # the valid certificate of this device, if any
    problem: str | None  # why there is none (None: valid and passing)
    others: list[str]  # devices named by certificates that do not apply here
    none_at_all: bool  # no certificate file for this backend/precision at all


def _reason(cert: dict[str, Any], key: bytes | None, device: Device, bundle: Bundle, engine: Any,
            precision: str, graph: str) -> str | None:
    body = {k: v for k, v in cert.items() if k != "hmac"}
    made_on = Device(**cert["device"]) if isinstance(cert.get("device"), dict) else None
    if made_on != device:
        return f"made on {made_on.label if made_on else 'an unnamed device'}"
    # The file name says which graph a certificate is for, but only its sealed body counts: a
    # passing FP32 certificate copied to the FP16 name must not unlock the FP16 engine.
    wanted = (device.backend, precision, bundle.graph_file(graph, precision))
    made_for = (cert.get("backend"), cert.get("precision"), cert.get("graph"))
    if made_for != wanted:
        return f"made for {made_for[0]}/{made_for[1]} {made_for[2]}, not {wanted[0]}/{wanted[1]} {wanted[2]}"
    if key is None or cert.get("station_key_id") != key_id(key):
        return f"made with another station's key ({cert.get('station_key_id')})"
    if not hmac.compare_digest(str(cert.get("hmac", "")), _mac(key, body)):
        return "edited after it was made (its HMAC does not match)"
    if cert.get("manifest_digest") != bundle.digest:
        return "made for another export of this bundle (manifest digest differs)"
    engine_sha = getattr(engine, "plan_sha256", None)
    if engine_sha is not None and cert.get("engine_sha256") != engine_sha:
        return "made for another engine file (the TensorRT plan was rebuilt since)"
    return None


def find_certificate(bundle: Bundle, engine: Any, precision: str, graph: str = FUSED) -> Finding:
    """The valid certificate of this device and engine, or why there is none."""
    device = device_of(engine)
    paths = certificates_for(bundle, device.backend, precision, graph)
    key = station_key()
    others, reasons = [], []
    for path in paths:
        try:
            cert = json.loads(path.read_text())
            reason = _reason(cert, key, device, bundle, engine, precision, graph)
        except (OSError, ValueError, TypeError) as exc:
            reason, cert = f"unreadable ({exc})", {}
        if reason is None:
            if cert.get("pass") is True:
                return Finding(cert, None, others, False)
            failed = [k for k, ok in cert.get("checks", {}).items() if ok is False]
            return Finding(cert, f"FAILED its parity certificate on this device ({', '.join(failed)})", others, False)
        if reason.startswith("made on "):
            others.append(reason.removeprefix("made on "))
        else:
            reasons.append(f"{path.name}: {reason}")
    if not paths:
        return Finding(None, f"has no parity certificate for {device.backend}/{precision}", [], True)
    if not reasons:
        return Finding(None, f"has no parity certificate of this device for {device.backend}/{precision}", others,
                       False)
    return Finding(None, f"has no valid parity certificate for {device.label}: " + "; ".join(reasons), others, False)
