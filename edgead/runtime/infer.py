"""Stage 3: the engine. Opening a bundle safely, and checking what the engine returns.

A station runs only what was verified on it:

1. the bundle's manifest digest and every file's SHA-256 match (:func:`load_bundle`), and its
   calibration is sane (a NaN or out-of-range threshold never loads);
2. with ``--trust KEYS``, the bundle is signed by one of those keys (never overridable);
3. the engine has a passing certificate of **this** device, backend version and engine file
   (:mod:`edgead.certify.certificate`). A bundle with no certificate at all for the backend and
   precision is certified here, against its golden outputs, before the first frame (``certify``
   "auto", the default); ``--certify`` re-certifies always, ``--no-certify`` never. A certificate
   of another device is refused, naming both devices and the command to run.

``--allow-unverified`` runs a bundle that fails its checksums or has no passing certificate,
with a warning; it never overrides a failed signature check.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from edgead.core.bundle import FUSED, Bundle, BundleError, load_bundle
from edgead.core.contract import ANOMALY_MAP as MAP
from edgead.core.contract import POSTPROCESS_GRAPH, SCORE
from edgead.core.engine import Engine, EngineError

CERTIFY_MODES = ("auto", "always", "never")


class BundleRefused(RuntimeError):
    """The bundle is tampered with, untrusted or uncertified; the message says why and what to do."""


def _verified_bundle(path: str, allow_unverified: bool, warn: Callable[[str], None]) -> Bundle:
    try:
        return load_bundle(path, verify=True)
    except BundleError as err:
        tampered = "checksum" in str(err) or "missing from the bundle" in str(err)
        if not (allow_unverified and tampered):  # a non-bundle stays an error whatever the flag
            hint = "" if allow_unverified or not tampered else " (override with --allow-unverified at your own risk)"
            raise BundleRefused(f"refusing bundle: {err}{hint}") from err
        warn(f"WARNING: {err}; running anyway (--allow-unverified)")
        return load_bundle(path, verify=False)


def _check_trust(bundle: Bundle, trust: str | None) -> None:
    if trust is None:
        return
    from edgead.core.signing import SignatureError, trusted_keys, verify_signature

    try:
        verify_signature(bundle.root, bundle.digest, trusted_keys(trust))
    except SignatureError as err:
        raise BundleRefused(f"refusing bundle: {err}") from err


def load_checked_bundle(path: str, backend: str, precision: str, allow_unverified: bool = False,
                        warn: Callable[[str], None] = print, trust: str | None = None, graph: str = FUSED) -> Bundle:
    """Load ``path``: checksums, sanity, and (with ``trust``) the signature. The certificate is
    checked once the engine is open (:func:`open_certified_engine`): it is bound to the engine."""
    bundle = _verified_bundle(path, allow_unverified, warn)
    _check_trust(bundle, trust)
    if graph == POSTPROCESS_GRAPH and graph not in bundle.spec.graphs:
        raise BundleError(f"{bundle.root}: no post-processing graph; re-export with `edgead export --postprocess`, "
                          "or run with --postprocess host")
    if precision != "auto":  # --precision auto: chosen among the bundle's (edgead.runtime.autotune)
        bundle.graph_path(graph, precision)  # a missing precision is a clear BundleError now
    return bundle


def open_bundle_engine(bundle: Bundle, backend: str, precision: str, threads: int | None = None,
                       graph: str = FUSED) -> Engine:
    """The fused detector graph of ``bundle`` (or ``detector_post``, the same with the post-processing
    on the engine) as an :class:`Engine` (no torch involved).

    ``threads`` caps ONNX Runtime's intra-op threads: on a small CPU, leaving a core to capture
    and pre/post-processing can be worth more than a faster engine.
    """
    from edgead.engines import open_engine

    kw = {"intra_op_num_threads": threads} if threads and backend in ("onnxruntime", "openvino") else {}
    try:
        return open_engine(bundle, backend=backend, precision=precision, graph=graph, **kw)
    except (BundleError, EngineError):
        raise
    except Exception as err:  # noqa: BLE001 - a backend's own exception becomes an EngineError
        raise EngineError(f"cannot open {backend}/{precision} engine of {bundle.root}: {err}") from err


def _certify_here(bundle: Bundle, engine: Engine, precision: str, say: Callable[[str], Any],
                  graph: str = FUSED) -> dict[str, Any]:
    """Certify the open engine against the bundle's golden outputs; write this device's certificate."""
    from edgead.certify.certificate import device_of, write_certificate
    from edgead.certify.parity import certify_engine, summary
    from edgead.core.golden import read_golden

    try:
        golden = read_golden(bundle.root, bundle.spec.golden)
    except BundleError as err:
        raise BundleRefused(f"refusing bundle: cannot certify it here: {err}") from err
    device = device_of(engine)
    say(f"edgead-run: certifying {device.backend}/{precision} on {device.label} against {golden.description}...")
    started = time.monotonic()
    stats = certify_engine(bundle, engine, precision, golden.images, golden.masks, golden.labels, golden.reference,
                           golden.reference64)
    report = {"data": golden.description, "n_images": len(golden.images), "n_anomalous": int(golden.labels.sum()),
              "reference": golden.spec.reference}
    path = write_certificate(bundle, engine, precision, summary(stats, report), graph)
    end, failed = stats["end"], [k for k, ok in stats["checks"].items() if ok is False]
    say(f"edgead-run: certification {'PASS' if stats['pass'] else 'FAIL (' + ', '.join(failed) + ')'} in "
        f"{time.monotonic() - started:.1f} s: {end['n_decisive']} decisive images, "
        f"{end['n_flips_outside_band']} verdict flips outside the band, {end['n_flips_in_band']} inside it "
        f"(±{end['band']:.3g}), map max |Δ| {stats[MAP]['max_abs']:.2e}; certificate {path.name}")
    return stats


def check_certificate(bundle: Bundle, engine: Engine, backend: str, precision: str, certify: str = "auto",
                      allow_unverified: bool = False, warn: Callable[[str], None] = print,
                      say: Callable[[str], Any] = print, graph: str = FUSED) -> dict[str, str]:
    """Require a passing certificate of this device for ``engine``; certify first when ``certify``
    is "always", or "auto" and the bundle has no certificate at all for ``backend/precision``.
    Returns the engine's status for the sinks: {"status": "certified"|"unverified", "detail"}."""
    from edgead.certify.certificate import CertificateError, device_of, find_certificate

    if certify not in CERTIFY_MODES:
        raise ValueError(f"certify must be one of {CERTIFY_MODES}, got {certify!r}")
    try:
        finding = find_certificate(bundle, engine, precision, graph)
        wanted = certify == "always" or (certify == "auto" and finding.none_at_all)
        if wanted and not bundle.verified:
            warn("WARNING: not certifying a bundle that failed its checksums")
        elif wanted:
            _certify_here(bundle, engine, precision, say, graph)
            finding = find_certificate(bundle, engine, precision, graph)
    except CertificateError as err:
        raise BundleRefused(f"refusing bundle: {err}") from err
    if finding.problem is None:
        return {"status": "certified", "detail": f"{backend}/{precision} certified on {device_of(engine).label}"}
    here = device_of(engine).label
    command = (f"certify here: `edgead-run --model {bundle.root} --backend {backend} --precision {precision} "
               f"--certify ...` or `edgead bench parity {bundle.root} --backend {backend} --precision {precision}`")
    made = " and ".join(finding.others)
    elsewhere = f": its certificate was made on {made}, this is {here}" if finding.others else ""
    msg = f"{bundle.root}: bundle {finding.problem}{elsewhere}; {command}"
    if not allow_unverified:
        raise BundleRefused(f"refusing bundle: {msg} (override with --allow-unverified)")
    warn(f"WARNING: {msg}; running anyway (--allow-unverified)")
    return {"status": "unverified", "detail": msg}


def open_certified_engine(path: str, backend: str, precision: str, *, threads: int | None = None,
                          allow_unverified: bool = False, trust: str | None = None, certify: str = "auto",
                          warn: Callable[[str], None] = print, say: Callable[[str], Any] = print,
                          graph: str = FUSED) -> tuple[Bundle, Engine, dict[str, str]]:
    """Everything a station checks before its first frame; returns the bundle, its open engine
    and the engine's certificate status (see :func:`check_certificate`). ``graph``: ``detector``,
    or ``detector_post`` for the post-processing on the engine."""
    bundle = load_checked_bundle(path, backend, precision, allow_unverified, warn, trust, graph)
    engine = open_bundle_engine(bundle, backend, precision, threads, graph)
    try:
        status = check_certificate(bundle, engine, backend, precision, certify, allow_unverified, warn, say, graph)
    except BaseException:
        engine.close()
        raise
    return bundle, engine, status


def take_outputs(outputs: dict[str, np.ndarray], map_name: str = MAP) -> tuple[float, np.ndarray]:
    """(raw score, map HxW float32) copied out of the engine's buffers; ``map_name`` is
    ``smoothed_map`` when the engine runs the post-processing (``--postprocess engine``).

    Copies because a CUDA engine's output buffers belong to the slot and are overwritten by its
    next run. Raises :class:`EngineError` on a missing output or any NaN/Inf in any output, so a
    broken engine gives an ERROR verdict, never an OK.
    """
    for name, value in outputs.items():
        if not np.isfinite(np.asarray(value, dtype=np.float32)).all():
            raise EngineError(f"engine output {name!r} contains NaN/Inf")
    if SCORE not in outputs or map_name not in outputs:
        raise EngineError(f"engine outputs {sorted(outputs)}, expected {SCORE!r} and {map_name!r}")
    score = float(np.asarray(outputs[SCORE]).reshape(-1)[0])
    amap = np.array(outputs[map_name], dtype=np.float32, copy=True)
    return score, amap.reshape(amap.shape[-2:])


def describe_engine(engine: Any) -> dict[str, Any]:
    return {"backend": getattr(engine, "backend", "?"), "precision": getattr(engine, "precision", "?"),
            "slots": getattr(engine, "num_slots", 1), "threads": getattr(engine, "threads", None),
            "inputs": [(s.name, list(s.shape)) for s in engine.inputs],
            "outputs": [(s.name, list(s.shape)) for s in engine.outputs],
            # a chain (OpenVINO BF16): what each component runs in, and why one is not reduced
            **({"component_precisions": engine.component_precisions,
                "fallbacks": getattr(engine, "fallbacks", {})} if hasattr(engine, "component_precisions") else {})}
