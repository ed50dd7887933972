"""The typed bundle manifest (schema 2): what ``manifest.json`` holds, checked on read. No torch.

Every reader goes through :meth:`Manifest.from_dict`, so a missing or mistyped key is a
:class:`BundleError` naming the file, the key and the fix, never a ``KeyError`` deep in the
runtime. The manifest carries its own ``digest`` (SHA-256 of its canonical JSON without that key):
together with the per-file SHA-256 in ``files`` it covers every byte that decides a verdict, the
calibration and threshold included (see :mod:`edgead.core.bundle`).

Schema 2 (this edgead) against schema 1: the smoothing sigma moved from ``postprocess.sigma``
into ``calibration.sigma``; the parity certificate left the manifest (certificates are bound to
the device that made them and live beside the graphs, :mod:`edgead.certify.certificate`); golden
outputs (``golden``) and the manifest ``digest`` are new. A schema-1 manifest is refused with a
"re-export" message: nothing covered it against editing, so it cannot be migrated into one that
claims to be tamper-evident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from edgead.core.calibration import Calibration

SCHEMA_VERSION = 2
DIGEST_KEY = "digest"
REEXPORT = "re-export it from its training run: `edgead export RUN --precision ... --out DIR`"


class BundleError(ValueError):
    """The bundle is missing, tampered with or incomplete; the message names the file."""


def canonical_json(data: Mapping[str, Any]) -> bytes:
    """The bytes the digest and the signature cover: sorted keys, no whitespace, no NaN."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_digest(data: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical manifest without its own ``digest`` key."""
    return hashlib.sha256(canonical_json({k: v for k, v in data.items() if k != DIGEST_KEY})).hexdigest()


def parse_manifest_text(text: str, source: str) -> dict[str, Any]:
    """JSON of a manifest; NaN/Infinity (which no exporter writes) is refused, never parsed."""

    def refuse(constant: str) -> float:
        raise BundleError(f"{source}: holds {constant}, which no export writes (a hand-edited value?); {REEXPORT}")

    try:
        data = json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{source}: corrupt manifest ({exc}); {REEXPORT}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{source}: a manifest is a JSON object, got {type(data).__name__}; {REEXPORT}")
    return data


class _Reader:
    """Typed access to one JSON object, with errors that name the file and the key path."""

    def __init__(self, data: Any, source: str, where: str = "") -> None:
        self.source, self.where = source, where
        if not isinstance(data, dict):
            self.fail(f"must be an object, got {type(data).__name__}")
        self.data: dict[str, Any] = data

    def fail(self, problem: str) -> None:
        at = f" key {self.where!r}" if self.where else ""
        raise BundleError(f"{self.source}:{at} {problem}; {REEXPORT}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = dataclasses.MISSING) -> Any:
        if key not in self.data:
            if default is dataclasses.MISSING:
                path = f"{self.where}.{key}" if self.where else key
                raise BundleError(f"{self.source}: missing key {path!r} (a manifest from another edgead, or "
                                  f"edited by hand); {REEXPORT}")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            path = f"{self.where}.{key}" if self.where else key
            raise BundleError(f"{self.source}: key {path!r} must be {names}, got {value!r}; {REEXPORT}")
        return value

    def child(self, key: str, default: Any = dataclasses.MISSING) -> "_Reader":
        path = f"{self.where}.{key}" if self.where else key
        return _Reader(self.get(key, dict, default), self.source, path)


def _shape(value: Any, reader: _Reader, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(d, int) and d > 0 for d in value):
        reader.fail(f"{what} must be a list of positive integers, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    color: str = "RGB"
    value_range: tuple[float, float] = (0.0, 1.0)
    resize: str = "area-down-linear-up"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    normalization: str = ""

    @classmethod
    def from_dict(cls, r: _Reader) -> "InputSpec":
        shape = _shape(r.get("shape", list), r, "input.shape")
        if len(shape) != 4:
            r.fail(f"input.shape must be (batch, channels, height, width), got {list(shape)}")
        lo, hi = r.get("range", list, [0, 1])
        return cls(r.get("name", str), shape, r.get("dtype", str, "float32"), r.get("color", str, "RGB"),
                   (float(lo), float(hi)), r.get("resize", str, "area-down-linear-up"),
                   tuple(r.get("mean", list, [])), tuple(r.get("std", list, [])), r.get("normalization", str, ""))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "color": self.color,
                "range": list(self.value_range), "resize": self.resize, "mean": list(self.mean),
                "std": list(self.std), "normalization": self.normalization}


@dataclass(frozen=True)
class ComponentSpec:
    """One component graph and its place in the wiring (tensor names in and out)."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "inputs": list(self.inputs), "outputs": list(self.outputs), "shapes": self.shapes}


@dataclass(frozen=True)
class GoldenSpec:
    """The certification set shipped in the bundle (:mod:`edgead.core.golden`)."""

    files: dict[str, str]  # array name -> bundle-relative .npy path
    n_images: int
    n_normal: int
    n_anomalous: int
    size_mb: float
    normal_source: str
    anomaly_source: str
    reference: str
    fp64_map: bool

    @classmethod
    def from_dict(cls, r: _Reader) -> "GoldenSpec":
        files = r.get("files", dict)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            r.fail("golden.files must map array names to file names")
        spec = cls(files, r.get("n_images", int), r.get("n_normal", int), r.get("n_anomalous", int),
                   r.get("size_mb", float), r.get("normal_source", str), r.get("anomaly_source", str),
                   r.get("reference", str), r.get("fp64_map", bool))
        if spec.n_normal + spec.n_anomalous != spec.n_images or spec.n_images < 1:
            r.fail(f"golden counts disagree: {spec.n_normal} normal + {spec.n_anomalous} anomalous != {spec.n_images}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _calibration(r: _Reader) -> Calibration:
    try:
        cal = Calibration.from_dict(r.data, strict=True)
    except TypeError as exc:
        r.fail(f"is not a calibration ({exc})")
    problem = cal.problem()
    if problem:
        r.fail(problem)
    return cal


@dataclass(frozen=True)
class Manifest:
    """Schema 2. ``extra`` keeps every other key (provenance, quantisation reports) verbatim."""

    detector: str
    input: InputSpec
    outputs: tuple[dict[str, Any], ...]
    calibration: Calibration
    components: tuple[ComponentSpec, ...]
    graphs: dict[str, dict[str, str]]
    files: dict[str, str]
    golden: GoldenSpec | None = None
    precision_fallbacks: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    digest: str = ""

    KNOWN = ("schema", "detector", "input", "outputs", "calibration", "components", "graphs", "files", "golden",
             "precision_fallbacks", DIGEST_KEY)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest.json") -> "Manifest":
        schema = data.get("schema")
        if schema != SCHEMA_VERSION:
            old = (" (schema 1 kept the sigma in 'postprocess' and the certificate inside the manifest, and no "
                   "checksum covered the manifest itself)" if schema == 1 else "")
            raise BundleError(f"{source}: schema {schema!r}, this edgead reads schema {SCHEMA_VERSION}{old}; {REEXPORT}")
        r = _Reader(data, source)
        graphs = r.get("graphs", dict)
        for name, by_precision in graphs.items():
            if not isinstance(by_precision, dict) or not all(isinstance(v, str) for v in by_precision.values()):
                r.fail(f"graphs.{name} must map precisions to file names")
        components = []
        for i, raw in enumerate(r.get("components", list)):
            c = _Reader(raw, source, f"components[{i}]")
            components.append(ComponentSpec(c.get("name", str), tuple(c.get("inputs", list)),
                                            tuple(c.get("outputs", list)), c.get("shapes", dict, {})))
        golden = GoldenSpec.from_dict(r.child("golden")) if data.get("golden") is not None else None
        return cls(detector=r.get("detector", str), input=InputSpec.from_dict(r.child("input")),
                   outputs=tuple(r.get("outputs", list)), calibration=_calibration(r.child("calibration")),
                   components=tuple(components), graphs=graphs, files=r.get("files", dict, {}), golden=golden,
                   precision_fallbacks=r.get("precision_fallbacks", dict, {}),
                   extra={k: v for k, v in data.items() if k not in cls.KNOWN}, digest=r.get(DIGEST_KEY, str, ""))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (without ``files``/``digest`` when empty: write_manifest fills them)."""
        out: dict[str, Any] = {"schema": SCHEMA_VERSION, "detector": self.detector, **self.extra,
                               "input": self.input.to_dict(), "outputs": list(self.outputs),
                               "calibration": self.calibration.to_dict(),
                               "components": [c.to_dict() for c in self.components], "graphs": self.graphs,
                               "precision_fallbacks": self.precision_fallbacks,
                               "golden": self.golden.to_dict() if self.golden else None}
        if self.files:
            out["files"] = self.files
        if self.digest:
            out[DIGEST_KEY] = self.digest
        return out
