"""Stage 3: the engine. Opening a bundle safely, and checking what the engine returns.

A station runs only what was verified: a bundle whose files fail their SHA-256, or that has no
passing parity certificate for the chosen backend/precision, is refused unless the operator
says ``--allow-unverified``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from edgead.core.bundle import Bundle, BundleError, load_bundle
from edgead.core.contract import ANOMALY_MAP as MAP
from edgead.core.contract import SCORE
from edgead.core.engine import Engine, EngineError



class BundleRefused(RuntimeError):
    """The bundle is tampered with or uncertified; the message says why and how to override."""


def load_checked_bundle(path: str, backend: str, precision: str, allow_unverified: bool = False,
                        warn: Callable[[str], None] = print) -> Bundle:
    """Load ``path`` and require checksums + a passing ``backend/precision`` parity certificate."""
    try:
        bundle = load_bundle(path, verify=True)
    except BundleError as err:
        tampered = "checksum" in str(err) or "missing from the bundle" in str(err)
        if not (allow_unverified and tampered):  # a non-bundle stays an error whatever the flag
            hint = "" if allow_unverified else " (override with --allow-unverified at your own risk)"
            raise BundleRefused(f"refusing bundle: {err}{hint}") from err
        warn(f"WARNING: {err}; running anyway (--allow-unverified)")
        bundle = load_bundle(path, verify=False)
    cert = bundle.parity(backend, precision)
    if not cert or not cert.get("pass"):
        why = "has no parity certificate" if not cert else "FAILED its parity certificate"
        have = ", ".join(k for k, v in bundle.manifest.get("parity", {}).items() if v.get("pass")) or "none"
        msg = (f"{bundle.root}: bundle {why} for {backend}/{precision} (certified: {have}); "
               f"certify it on this device first")
        if not allow_unverified:
            raise BundleRefused(f"refusing bundle: {msg} (override with --allow-unverified)")
        warn(f"WARNING: {msg}; running anyway (--allow-unverified)")
    return bundle


def open_bundle_engine(bundle: Bundle, backend: str, precision: str, threads: int | None = None) -> Engine:
    """The fused detector graph of ``bundle`` as an :class:`Engine` (no torch involved).

    ``threads`` caps ONNX Runtime's intra-op threads: on a small CPU, leaving a core to capture
    and pre/post-processing can be worth more than a faster engine.
    """
    from edgead.engines import open_engine

    kw = {"intra_op_num_threads": threads} if threads and backend == "onnxruntime" else {}
    try:
        return open_engine(bundle, backend=backend, precision=precision, graph="detector", **kw)
    except (BundleError, EngineError):
        raise
    except Exception as err:  # noqa: BLE001 - a backend's own exception becomes an EngineError
        raise EngineError(f"cannot open {backend}/{precision} engine of {bundle.root}: {err}") from err


def take_outputs(outputs: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """(raw score, map HxW float32) copied out of the engine's buffers.

    Copies because a CUDA engine's output buffers belong to the slot and are overwritten by its
    next run. Raises :class:`EngineError` on a missing output or any NaN/Inf in any output, so a
    broken engine gives an ERROR verdict, never an OK.
    """
    for name, value in outputs.items():
        if not np.isfinite(np.asarray(value, dtype=np.float32)).all():
            raise EngineError(f"engine output {name!r} contains NaN/Inf")
    if SCORE not in outputs or MAP not in outputs:
        raise EngineError(f"engine outputs {sorted(outputs)}, expected {SCORE!r} and {MAP!r}")
    score = float(np.asarray(outputs[SCORE]).reshape(-1)[0])
    amap = np.array(outputs[MAP], dtype=np.float32, copy=True)
    return score, amap.reshape(amap.shape[-2:])


def describe_engine(engine: Any) -> dict[str, Any]:
    return {"backend": getattr(engine, "backend", "?"), "precision": getattr(engine, "precision", "?"),
            "slots": getattr(engine, "num_slots", 1),
            "inputs": [(s.name, list(s.shape)) for s in engine.inputs],
            "outputs": [(s.name, list(s.shape)) for s in engine.outputs]}
