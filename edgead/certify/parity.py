"""Parity: certify every engine of a bundle against reference outputs (``edgead bench parity``).

The reference is the PyTorch FP32 model's score and map on the same images, passed in as arrays
(this module never imports torch).

Per output (score, anomaly_map), Polygraphy-style: max / mean / median / p99 absolute error,
max / mean relative error, and Polygraphy's element-wise rule (an element fails only where
absdiff > atol AND reldiff > rtol). End results: Pearson r of the maps, Spearman r of the scores,
Δ image AUROC, Δ pixel AUROC (on maps smoothed as the runtime smooths them) and OK/NG verdict
agreement at the bundle's threshold. Raw maps are compared before smoothing.

The result of each ``backend/precision`` goes into the manifest's ``parity`` section (the
manifest is re-written with fresh checksums).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgead.core.bundle import FUSED, load_bundle, write_manifest
from edgead.core.calibration import Calibration
from edgead.core.contract import ANOMALY_MAP, IMAGE, SCORE
from edgead.core.engine import Engine
from edgead.core.postprocess import smooth
from edgead.core.statistics import auroc, pearson, spearman
from edgead.engines import EngineError, open_engine

OUTPUTS = (SCORE, ANOMALY_MAP)
Outputs = dict[str, np.ndarray]

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"map_max_abs": 1e-4, "score_max_rel": 1e-4, "noise_floor_factor": 2.0, "atol": 1e-4, "rtol": 1e-4},
    "fp16": {"max_abs_delta_auroc": 0.005, "min_verdict_agreement": 0.99, "atol": 1e-2, "rtol": 1e-2},
    "int8": {"max_abs_delta_auroc": 0.01, "min_verdict_agreement": 0.99, "atol": 5e-2, "rtol": 5e-2},
}
"""Pass criteria per precision.

FP32 engines compute the same math in another order, so they must match PyTorch to float
rounding: max |Δ| over every map pixel ≤ 1e-4 and every score within 1e-4 relative. One
exception, because FP32 itself can't do better: where an output misses that bound, it still
passes if its max error against the model evaluated in float64 is at most ``noise_floor_factor``
times PyTorch FP32's own max error against float64. The SSIM map needs this: var = E[x²] − μ²
cancels catastrophically in flat regions (c2 = 9e-4), so PyTorch FP32 is itself ~2.5e-4 away
from the float64 SSIM there, and ONNX Runtime (another summation order) lands as far away on
the other side.
FP16 and INT8 engines change the numbers by design; what must not change is what the line sees:
image and pixel AUROC within 0.005 (FP16) / 0.01 (INT8) of PyTorch's, and the OK/NG verdict at
the stored threshold the same on ≥ 99% of images. ``atol``/``rtol`` feed Polygraphy's element-wise
rule, which is reported for every engine but decides only FP32 (Polygraphy's own docs say its
default tolerances suit FP32, not reduced precision).
"""


def error_stats(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, float]:
    """Polygraphy's statistics of ``got`` against ``ref`` (both float arrays, same shape)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    absdiff = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        reldiff = np.where(absdiff == 0, 0.0, absdiff / np.abs(ref))
    failing = (absdiff > atol) & (reldiff > rtol)
    finite = bool(np.isfinite(got).all())
    return {"max_abs": float(absdiff.max()), "mean_abs": float(absdiff.mean()),
            "median_abs": float(np.median(absdiff)), "p99_abs": float(np.quantile(absdiff, 0.99)),
            "max_rel": float(reldiff.max()), "mean_rel": float(reldiff[np.isfinite(reldiff)].mean()),
            "elementwise_pass_rate": float(1.0 - failing.mean()), "elementwise_pass": bool(not failing.any()),
            "finite": finite}


def _pixel_auroc(masks: np.ndarray | None, maps: np.ndarray) -> float:
    return math.nan if masks is None else auroc(np.asarray(masks) > 0.5, maps)


def compare(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray | None,
            calibration: Calibration, precision: str, sigma: float,
            ref64: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """All statistics of one engine's outputs against the reference, and its verdict."""
    tol = TOLERANCES[precision]
    out: dict[str, Any] = {name: error_stats(ref[name], got[name], tol["atol"], tol["rtol"]) for name in OUTPUTS}
    ref_smooth, got_smooth = smooth(ref[ANOMALY_MAP], sigma), smooth(got[ANOMALY_MAP], sigma)
    ref_verdicts = [calibration.verdict(float(s)) for s in ref[SCORE]]
    got_verdicts = [calibration.verdict(float(s)) for s in got[SCORE]]
    end = {
        "map_pearson": pearson(ref[ANOMALY_MAP], got[ANOMALY_MAP]),
        "score_spearman": spearman(ref[SCORE], got[SCORE]),
        "image_auroc_ref": auroc(labels, ref[SCORE]), "image_auroc": auroc(labels, got[SCORE]),
        "pixel_auroc_ref": _pixel_auroc(masks, ref_smooth), "pixel_auroc": _pixel_auroc(masks, got_smooth),
        "verdict_agreement": float(np.mean([a == b for a, b in zip(ref_verdicts, got_verdicts)])),
    }
    # Which images flipped, and how close to the threshold they were: a flip of an image that
    # sits within the engine's score error of the threshold is rounding, a shift of many is not.
    end["verdict_flips"] = [{"index": i, "reference": float(ref[SCORE][i]), "engine": float(got[SCORE][i]),
                             "threshold": calibration.image_threshold}
                            for i, (a, b) in enumerate(zip(ref_verdicts, got_verdicts)) if a != b][:20]
    end["delta_image_auroc"] = end["image_auroc"] - end["image_auroc_ref"]
    end["delta_pixel_auroc"] = end["pixel_auroc"] - end["pixel_auroc_ref"]
    out["end"] = end
    if precision == "fp32" and ref64 is not None:
        out["fp64"] = noise_floor(ref, got, ref64, tol["noise_floor_factor"])
    out["checks"] = checks = _checks(out, precision)
    out["pass"] = all(v for v in checks.values() if v is not None)
    return out


def noise_floor(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], ref64: dict[str, np.ndarray],
                factor: float) -> dict[str, Any]:
    """Per output: is the engine within ``factor`` × PyTorch FP32's own error against float64?"""
    out: dict[str, Any] = {}
    for name in OUTPUTS:
        torch_err = float(np.abs(ref[name] - ref64[name]).max())
        engine_err = float(np.abs(got[name] - ref64[name]).max())
        out[f"{name}_torch_fp32_vs_fp64"] = torch_err
        out[f"{name}_engine_vs_fp64"] = engine_err
        out[name] = bool(engine_err <= factor * torch_err)
    return out


def _checks(stats: dict[str, Any], precision: str) -> dict[str, bool | None]:
    """Criterion -> passed (None: not applicable to this data, e.g. no anomalous image)."""
    tol, end = TOLERANCES[precision], stats["end"]
    finite = stats[SCORE]["finite"] and stats[ANOMALY_MAP]["finite"]
    if precision == "fp32":
        floor = stats.get("fp64", {})
        return {"finite": finite,
                "map_max_abs": stats[ANOMALY_MAP]["max_abs"] <= tol["map_max_abs"] or floor.get(ANOMALY_MAP, False),
                "score_max_rel": stats[SCORE]["max_rel"] <= tol["score_max_rel"] or floor.get(SCORE, False)}
    lim = tol["max_abs_delta_auroc"]
    d_img, d_pix = end["delta_image_auroc"], end["delta_pixel_auroc"]
    return {"finite": finite,
            "image_auroc": None if math.isnan(d_img) else abs(d_img) <= lim,
            "pixel_auroc": None if math.isnan(d_pix) else abs(d_pix) <= lim,
            "verdict_agreement": end["verdict_agreement"] >= tol["min_verdict_agreement"]}


def run_engine(engine: Engine, images: np.ndarray) -> Outputs:
    """Score (N,) and raw map (N, H, W) of ``engine`` on images (N, C, H, W), one at a time."""
    scores, maps = [], []
    for image in images:
        out = engine.run({IMAGE: image[None].astype(np.float32, copy=False)})
        scores.append(float(np.asarray(out[SCORE]).reshape(-1)[0]))
        maps.append(np.asarray(out[ANOMALY_MAP], np.float32).reshape(images.shape[-2:]))
    return {SCORE: np.array(scores, np.float64), ANOMALY_MAP: np.stack(maps)}


def _beyond_fp32_bound(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> bool:
    tol = TOLERANCES["fp32"]
    return bool(error_stats(ref[ANOMALY_MAP], got[ANOMALY_MAP], 0, 0)["max_abs"] > tol["map_max_abs"]
                or error_stats(ref[SCORE], got[SCORE], 0, 0)["max_rel"] > tol["score_max_rel"])


def certify(bundle_dir: str | Path, images: np.ndarray, masks: np.ndarray | None, labels: np.ndarray,
            reference: Outputs, reference64: Callable[[], Outputs] | None = None,
            backends: Sequence[str] = ("onnxruntime",), precisions: Sequence[str] | None = None,
            data: str = "arrays", reference_name: str = "torch fp32", write: bool = True,
            engine_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Certify the bundle's fused graphs on ``backends`` x ``precisions`` against ``reference``.

    ``images`` (N, C, H, W) float32 in [0, 1], ``labels`` (N,) 0/1, ``masks`` (N, H, W) or None;
    ``reference`` the reference's outputs on them; ``reference64()`` its float64 outputs, asked
    for only when an FP32 engine misses the plain bound (the noise-floor rule). Returns
    ``{"reference": ..., "results": {"backend/precision": stats}}``; with ``write`` the summaries
    go into the manifest.
    """
    bundle = load_bundle(bundle_dir)
    calibration = bundle.calibration
    labels = np.asarray(labels).astype(int)
    results: dict[str, Any] = {}
    ref64: Outputs | None = None
    for backend in backends:
        for precision in precisions or bundle.precisions(FUSED):
            key = f"{backend}/{precision}"
            try:
                engine = open_engine(bundle, backend, precision, **(engine_kw or {}).get(backend, {}))
            except EngineError as exc:
                results[key] = {"skipped": str(exc)}
                continue
            try:
                got = run_engine(engine, images)
            finally:
                engine.close()
            if precision == "fp32" and ref64 is None and reference64 is not None and _beyond_fp32_bound(reference, got):
                ref64 = reference64()  # only when the plain bound is missed
            results[key] = compare(reference, got, labels, masks, calibration, precision, calibration.sigma, ref64)
    report = {"bundle": str(Path(bundle_dir).resolve()), "reference": reference_name,
              "data": data, "n_images": int(len(images)), "n_anomalous": int(labels.sum()),
              "tolerances": TOLERANCES, "results": results}
    if write:
        record(bundle_dir, report)
    return report


def summary(stats: dict[str, Any], report: dict[str, Any], date: str) -> dict[str, Any]:
    end = stats["end"]
    return {"pass": stats["pass"], "date": date, "data": report["data"], "n_images": report["n_images"],
            "reference": report["reference"], "checks": stats["checks"],
            "score_max_abs": stats[SCORE]["max_abs"], "score_max_rel": stats[SCORE]["max_rel"],
            "map_max_abs": stats[ANOMALY_MAP]["max_abs"], "map_p99_abs": stats[ANOMALY_MAP]["p99_abs"],
            "map_pearson": end["map_pearson"], "score_spearman": end["score_spearman"],
            "delta_image_auroc": end["delta_image_auroc"], "delta_pixel_auroc": end["delta_pixel_auroc"],
            "verdict_agreement": end["verdict_agreement"], "verdict_flips": len(end["verdict_flips"])}


def record(bundle_dir: str | Path, report: dict[str, Any]) -> None:
    """Write the summaries into the manifest; the bundle is re-verified first, so re-hashing
    can't bless a file that changed since export."""
    bundle = load_bundle(bundle_dir, verify=True)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    parity = dict(bundle.manifest.get("parity", {}))
    for key, stats in report["results"].items():
        if "skipped" not in stats:
            parity[key] = json_safe(summary(stats, report, date))
    path = write_manifest(bundle.root, {**bundle.manifest, "parity": parity})
    # write_manifest hashes every file in the folder, but TensorRT keeps its engine and timing
    # caches beside the graphs; they are per-device build products, rebuilt whenever stale, and
    # must not become part of the certified file list (a rebuild would then "tamper" the bundle).
    exported = set(bundle.manifest.get("files", {}))
    written = json.loads(path.read_text())
    written["files"] = {k: v for k, v in written["files"].items() if k in exported}
    path.write_text(json.dumps(written, indent=2) + "\n")


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def load_data(bundle_dir: str | Path, root: str | Path, category: str, run_meta: dict[str, Any] | None,
              max_images: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Validation images of the run (normal, held out of training) + the category's test set."""
    from edgead.data.datasets import load_arrays, mvtec_samples

    bundle = load_bundle(bundle_dir)
    _, channels, size, _ = bundle.input_shape
    val_files = set(((run_meta or {}).get("data") or {}).get("val_files") or [])
    val = [s for s in mvtec_samples(root, category, "train") if s.path.name in val_files]
    test = mvtec_samples(root, category, "test")
    samples = val + test
    if max_images and len(samples) > max_images:
        samples = [samples[i] for i in np.unique(np.linspace(0, len(samples) - 1, max_images).round().astype(int))]
    images, masks, kept = load_arrays(samples, size, channels, with_masks=True)
    labels = np.array([s.label for s in kept])
    val_paths = {s.path for s in val}
    n_val = sum(s.path in val_paths for s in kept)
    desc = f"{root}/{category}: {n_val} validation + {len(kept) - n_val} test images"
    return images, masks, labels, desc


def print_table(report: dict[str, Any], file: Any = sys.stdout) -> None:
    head = f"{'engine':<22}{'map max|Δ|':>12}{'score max rel':>14}{'map r':>9}{'score ρ':>9}{'ΔAUROC img':>12}{'ΔAUROC px':>11}{'agree':>8}  result"
    print(f"reference: {report['reference']}  ({report['n_images']} images, {report['n_anomalous']} anomalous)", file=file)
    print(head, file=file)
    for key, s in report["results"].items():
        if "skipped" in s:
            print(f"{key:<22}  skipped: {s['skipped']}", file=file)
            continue
        e = s["end"]
        print(f"{key:<22}{s['anomaly_map']['max_abs']:>12.2e}{s['score']['max_rel']:>14.2e}{e['map_pearson']:>9.5f}"
              f"{e['score_spearman']:>9.5f}{e['delta_image_auroc']:>+12.4f}{e['delta_pixel_auroc']:>+11.4f}"
              f"{e['verdict_agreement']:>8.1%}  {'PASS' if s['pass'] else 'FAIL'}"
              + (f"  ({len(e['verdict_flips'])} verdict flip(s))" if e["verdict_flips"] else ""), file=file)
