"""A bundle: everything a station needs, no torch.

``<bundle>/manifest.json`` (typed in :mod:`edgead.core.manifest`, schema 2) describes the input,
the outputs, the calibration from validation (thresholds and the smoothing sigma), the components
and their wiring, every graph file per precision, the golden outputs (``golden/*.npy``,
:mod:`edgead.core.golden`), and the SHA-256 of every file. Its ``digest`` is the SHA-256 of the
manifest itself (canonical JSON without the digest), so no byte that decides a verdict, the
threshold included, can change unnoticed: :func:`load_bundle` refuses a bundle whose manifest or
files don't match. An optional Ed25519 signature (``signature.json``, :mod:`edgead.core.signing`)
covers the digest against someone who recomputes it.

Not covered, on purpose: what each station writes beside the graphs after export (TensorRT
engine and timing caches, the device certificates of :mod:`edgead.certify.certificate`). They are
bound to the bundle in their own way (certificates: HMAC + manifest digest + engine hash).

Layout::

    manifest.json        schema, detector, input, outputs, calibration, components, graphs,
                         golden, precision_fallbacks, provenance, files, digest
    detector.fp32.onnx   the fused graph per precision, and one graph per component
    golden/*.npy         the certification set
    signature.json       optional: Ed25519 signature of the digest
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgead.core.calibration import Calibration
from edgead.core.manifest import (DIGEST_KEY, REEXPORT, SCHEMA_VERSION, BundleError, Manifest, manifest_digest,
                                  parse_manifest_text)

__all__ = ["BundleError", "Bundle", "FUSED", "MANIFEST", "SCHEMA_VERSION", "load_bundle", "sha256_file",
           "verify_files", "write_manifest"]

MANIFEST = "manifest.json"
FUSED = "detector"  # the graph name of the fused image -> (score, map) graph
# Precisions an engine computes in without a graph file of their own, and the graph they compile:
# OpenVINO's BF16 runs the FP32 graph with BF16 inference precision outside its FP32 islands.
ENGINE_ONLY_PRECISIONS = {"bf16": "fp32"}
NOT_EXPORTED = (MANIFEST, "signature.json")  # files of the bundle that the manifest cannot list


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any] | Manifest) -> Path:
    """Hash every file in the bundle folder into ``files``, seal the manifest with its digest and
    write it. Only the exporter calls this: nothing after export rewrites a manifest."""
    root = Path(bundle_dir)
    data = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in NOT_EXPORTED)
    data.update(schema=SCHEMA_VERSION, files={p.relative_to(root).as_posix(): sha256_file(p) for p in files})
    data.pop(DIGEST_KEY, None)
    Manifest.from_dict(data, str(root / MANIFEST))  # never write a manifest that would not load
    data[DIGEST_KEY] = manifest_digest(data)
    path = root / MANIFEST
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]  # the raw JSON, for provenance readers
    spec: Manifest  # the same, typed and validated
    verified: bool = True  # digest and every file checked (False only under --allow-unverified)

    @property
    def detector(self) -> str:
        return self.spec.detector

    @property
    def calibration(self) -> Calibration:
        return self.spec.calibration

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.spec.input.shape

    @property
    def digest(self) -> str:
        return self.spec.digest

    def precisions(self, graph: str = FUSED) -> list[str]:
        return list(self.spec.graphs.get(graph, {}))

    def graph_file(self, graph: str = FUSED, precision: str = "fp32") -> str:
        """The bundle's file name of ``graph`` at ``precision`` (bf16: the FP32 graph it compiles)."""
        graphs = self.spec.graphs
        if graph not in graphs:
            raise BundleError(f"{self.root}: bundle has no component {graph!r}; it has {sorted(graphs)}")
        stored = ENGINE_ONLY_PRECISIONS.get(precision, precision)
        if stored not in graphs[graph]:
            raise BundleError(f"{self.root}: component {graph!r} has no {stored} graph; "
                              f"it has {sorted(graphs[graph])} (export with --precision {stored})")
        return graphs[graph][stored]

    def graph_path(self, graph: str = FUSED, precision: str = "fp32") -> Path:
        return self.root / self.graph_file(graph, precision)


def load_bundle(bundle_dir: str | Path, verify: bool = True) -> Bundle:
    """Read and type a bundle's manifest; with ``verify``, refuse a manifest whose digest or any
    file whose SHA-256 does not match. Without ``verify`` the values are still validated (a NaN
    or out-of-range threshold never loads)."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}); create one with `edgead export`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BundleError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}): the file is damaged; "
                          "re-export the bundle") from err
    data = parse_manifest_text(text, str(path))
    if verify and data.get("schema") == SCHEMA_VERSION:
        verify_manifest(path, data)  # first: an edited manifest is reported as edited
    spec = Manifest.from_dict(data, str(path))
    if verify:
        verify_files(root, spec)
    return Bundle(root, data, spec, verified=verify)


def verify_manifest(path: Path, data: dict[str, Any]) -> None:
    expected, actual = data.get(DIGEST_KEY), manifest_digest(data)
    if expected != actual:
        raise BundleError(f"{path}: checksum mismatch of the manifest itself (digest {str(expected)[:12]}…, "
                          f"content {actual[:12]}…): it was edited after export (calibration, threshold or file "
                          f"list); {REEXPORT}")


def verify_files(root: Path, manifest: Manifest | dict[str, Any]) -> None:
    spec = manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest, str(root / MANIFEST))
    files = spec.files
    covered = [rel for by_precision in spec.graphs.values() for rel in by_precision.values()]
    covered += list(spec.golden.files.values()) if spec.golden else []
    for rel in covered:
        if rel not in files:
            raise BundleError(f"{root / rel}: file of the bundle is not checksummed in the manifest; {REEXPORT}")
    for rel, expected in files.items():
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{file}: missing from the bundle")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"{file}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…); "
                              "the bundle was modified or corrupted: re-export it")
