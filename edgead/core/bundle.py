"""A bundle: everything a station needs, no torch.

``<bundle>/manifest.json`` describes the input, the outputs, the calibration from validation, the
components and their wiring, every graph/engine file per precision, the parity certificate, and
the SHA-256 of every file. :func:`load_bundle` refuses a bundle whose files don't match.

Manifest (schema 1)::

    {"schema": 1, "detector": "ganomaly", "edgead_version": "...", "created": "...",
     "config": {...detector config...},
     "input": {"name": "image", "shape": [1, 3, 128, 128], "dtype": "float32", "color": "RGB",
               "range": [0, 1], "resize": "area-down-linear-up", "mean": [...], "std": [...],
               "normalization": "..."},
     "outputs": [{"name": "score", "shape": [1]}, {"name": "anomaly_map", "shape": [1, 1, 128, 128]}],
     "postprocess": {"sigma": 4.0},
     "calibration": {...Calibration.to_dict()...},
     "components": [{"name": "encoder", "inputs": ["image"], "outputs": ["z"],
                     "shapes": {"image": [...], "z": [...]}}, ...],
     "graphs": {"detector": {"fp32": "detector.fp32.onnx", "fp16": "...", "int8": "..."},
                "encoder": {"fp32": "encoder.fp32.onnx", ...}, ...},
     "precision_fallbacks": {"int8": {"head": "fp32"}},
     "scorer_weights": {"source": "...", "sha256": "..."},
     "parity": {"onnxruntime/fp32": {"pass": true, ...}, ...},
     "files": {"detector.fp32.onnx": "<sha256>", ...}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgead.core.calibration import Calibration

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FUSED = "detector"  # the graph name of the fused image -> (score, map) graph


class BundleError(ValueError):
    """The bundle is missing, tampered with or incomplete; the message names the file."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Hash every file in the bundle (but the manifest) into ``files`` and write the manifest."""
    root = Path(bundle_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = dict(manifest, schema=SCHEMA_VERSION,
                    files={p.relative_to(root).as_posix(): sha256_file(p) for p in files})
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def detector(self) -> str:
        return self.manifest["detector"]

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_dict(self.manifest["calibration"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    def precisions(self, graph: str = FUSED) -> list[str]:
        return list(self.manifest["graphs"].get(graph, {}))

    def graph_path(self, graph: str = FUSED, precision: str = "fp32") -> Path:
        graphs = self.manifest.get("graphs", {})
        if graph not in graphs:
            raise BundleError(f"{self.root}: bundle has no component {graph!r}; it has {sorted(graphs)}")
        if precision not in graphs[graph]:
            raise BundleError(f"{self.root}: component {graph!r} has no {precision} graph; "
                              f"it has {sorted(graphs[graph])} (export with --precision {precision})")
        return self.root / graphs[graph][precision]

    def parity(self, backend: str, precision: str) -> dict[str, Any] | None:
        return self.manifest.get("parity", {}).get(f"{backend}/{precision}")


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest; with ``verify``, refuse any file that fails its SHA-256."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}); create one with `edgead export`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: corrupt manifest: {exc}") from exc
    if manifest.get("schema") != SCHEMA_VERSION:
        raise BundleError(f"{path}: schema {manifest.get('schema')!r}, this edgead reads {SCHEMA_VERSION}")
    if verify:
        verify_files(root, manifest)
    return Bundle(root, manifest)


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    files: dict[str, str] = manifest.get("files", {})
    for graph, by_precision in manifest.get("graphs", {}).items():
        for rel in by_precision.values():
            if rel not in files:
                raise BundleError(f"{root / rel}: graph file of {graph!r} is not checksummed in the manifest")
    for rel, expected in files.items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"{file}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…); "
                              "the bundle was modified or corrupted: re-export it")
