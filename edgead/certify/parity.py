"""Parity: certify the engines of a bundle against reference outputs (``edgead bench parity``).

The reference is the PyTorch FP32 model's score and map on the same images: by default the
bundle's golden outputs (:mod:`edgead.core.golden`, computed at export), so a station certifies
with numpy and its engine runtime only; or live PyTorch arrays passed in by the caller
(``--against-run``: :func:`edgead.bench.certify_against_run`). This module never imports torch.

Per output (score, anomaly_map), Polygraphy-style: max / mean / median / p99 absolute error,
max / mean relative error, and Polygraphy's element-wise rule (an element fails only where
absdiff > atol AND reldiff > rtol). End results: Pearson r of the maps, Spearman r of the scores,
Δ image AUROC, Δ pixel AUROC (on maps smoothed as the runtime smooths them) and the OK/NG verdicts
under the band rule of :mod:`edgead.certify.rules`. Raw maps are compared before smoothing.

Each result becomes a device certificate beside the graph (:mod:`edgead.certify.certificate`);
the bundle itself is never rewritten, and a bundle that fails its checksums is not certified.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgead.certify import certificate
from edgead.core import machine
from edgead.certify.rules import MIN_DECISIVE, POSTPROCESS_ATOL, TOLERANCES, checks, verdict_agreement
from edgead.core.bundle import FUSED, Bundle, BundleError, load_bundle
from edgead.core.calibration import Calibration
from edgead.core.contract import (ANOMALY_MAP, IMAGE, MAP_NORM, POSTPROCESS_GRAPH, POSTPROCESS_OUTPUTS, SCORE,
                                  SCORE_NORM, SMOOTHED_MAP)
from edgead.core.engine import Engine, run_batch
from edgead.core.golden import read_golden
from edgead.core.postprocess import smooth
from edgead.core.statistics import auroc, pearson, spearman
from edgead.engines import EngineError, engine_precisions, open_engine

__all__ = ["TOLERANCES", "certify", "certify_engine", "certify_golden", "compare", "error_stats", "noise_floor",
           "load_data", "print_table", "run_engine"]

OUTPUTS = (SCORE, ANOMALY_MAP)
Outputs = dict[str, np.ndarray]


def error_stats(ref: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, float]:
    """Polygraphy's statistics of ``got`` against ``ref`` (both float arrays, same shape)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    absdiff = np.abs(got - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        reldiff = np.where(absdiff == 0, 0.0, absdiff / np.abs(ref))
    failing = (absdiff > atol) & (reldiff > rtol)
    return {"max_abs": float(absdiff.max()), "mean_abs": float(absdiff.mean()),
            "median_abs": float(np.median(absdiff)), "p99_abs": float(np.quantile(absdiff, 0.99)),
            "max_rel": float(reldiff.max()), "mean_rel": float(reldiff[np.isfinite(reldiff)].mean()),
            "elementwise_pass_rate": float(1.0 - failing.mean()), "elementwise_pass": bool(not failing.any()),
            "finite": bool(np.isfinite(got).all())}


def _pixel_auroc(masks: np.ndarray | None, maps: np.ndarray) -> float:
    return math.nan if masks is None else auroc(np.asarray(masks) > 0.5, maps)


def pair_swaps(labels: np.ndarray, ref_scores: np.ndarray, got_scores: np.ndarray, width: float) -> int:
    """(anomalous, normal) pairs whose reference scores differ by more than the verdict band and
    whose order the engine reverses: the only ranking changes that are not numerical noise. On a
    small set one swap of a near-tie moves the image AUROC by 1/(n_pos x n_neg), above any tolerance."""
    labels = np.asarray(labels).astype(bool).ravel()
    ref_s, got_s = np.asarray(ref_scores, np.float64).ravel(), np.asarray(got_scores, np.float64).ravel()
    ref_gap = ref_s[labels][:, None] - ref_s[~labels][None, :]
    got_gap = got_s[labels][:, None] - got_s[~labels][None, :]
    return int(((np.abs(ref_gap) > width) & (np.sign(ref_gap) != np.sign(got_gap))).sum())


def compare(ref: Outputs, got: Outputs, labels: np.ndarray, masks: np.ndarray | None, calibration: Calibration,
            precision: str, ref64: Outputs | None = None) -> dict[str, Any]:
    """All statistics of one engine's outputs against the reference, and its verdict."""
    tol = TOLERANCES[precision]
    out: dict[str, Any] = {name: error_stats(ref[name], got[name], tol["atol"], tol["rtol"]) for name in OUTPUTS}
    sigma = calibration.sigma
    ref_smooth, got_smooth = smooth(ref[ANOMALY_MAP], sigma), smooth(got[ANOMALY_MAP], sigma)
    end = {
        "map_pearson": pearson(ref[ANOMALY_MAP], got[ANOMALY_MAP]),
        "score_spearman": spearman(ref[SCORE], got[SCORE]),
        "image_auroc_ref": auroc(labels, ref[SCORE]), "image_auroc": auroc(labels, got[SCORE]),
        "pixel_auroc_ref": _pixel_auroc(masks, ref_smooth), "pixel_auroc": _pixel_auroc(masks, got_smooth),
        **verdict_agreement(ref[SCORE], got[SCORE], calibration, precision),
    }
    end["delta_image_auroc"] = end["image_auroc"] - end["image_auroc_ref"]
    end["n_pair_swaps_outside_band"] = pair_swaps(labels, ref[SCORE], got[SCORE], end["band"])
    end["delta_pixel_auroc"] = end["pixel_auroc"] - end["pixel_auroc_ref"]
    out["end"] = end
    if precision == "fp32" and ref64:
        out["fp64"] = noise_floor(ref, got, ref64, tol["noise_floor_factor"])
    out["checks"] = results = checks(out, precision)
    out["pass"] = all(v for v in results.values() if v is not None)
    return out


def noise_floor(ref: Outputs, got: Outputs, ref64: Outputs, factor: float) -> dict[str, Any]:
    """Per output present in ``ref64``: is the engine within ``factor`` x PyTorch FP32's own
    error against float64?"""
    out: dict[str, Any] = {}
    for name in (n for n in OUTPUTS if n in ref64):
        torch_err = float(np.abs(ref[name] - ref64[name]).max())
        engine_err = float(np.abs(got[name] - ref64[name]).max())
        out[f"{name}_torch_fp32_vs_fp64"] = torch_err
        out[f"{name}_engine_vs_fp64"] = engine_err
        out[name] = bool(engine_err <= factor * torch_err)
    return out


def run_engine(engine: Engine, images: np.ndarray) -> Outputs:
    """Score (N,) and raw map (N, H, W) of ``engine`` on images (N, C, H, W), one at a time; plus
    the post-processing outputs when the engine runs them (``detector_post``)."""
    if SMOOTHED_MAP not in {spec.name for spec in engine.outputs}:
        scores, maps = run_batch(engine, images)
        return {SCORE: scores, ANOMALY_MAP: maps}
    got: dict[str, list[np.ndarray]] = {name: [] for name in (*OUTPUTS, *POSTPROCESS_OUTPUTS)}
    for image in images:
        out = engine.run({IMAGE: image[None].astype(np.float32, copy=False)})
        for name, values in got.items():
            if name in (SCORE, SCORE_NORM):
                values.append(np.asarray(out[name], np.float64).reshape(-1)[0])
            else:
                values.append(np.array(out[name], np.float32).reshape(images.shape[-2:]))
    return {name: np.stack(values) for name, values in got.items()}


def postprocess_check(got: Outputs, calibration: Calibration) -> dict[str, Any]:
    """The engine's post-processing outputs against the host path (smoothing, normalisation)
    applied to the engine's own raw score and map: the same maths, so within ``POSTPROCESS_ATOL``."""
    smoothed = smooth(got[ANOMALY_MAP], calibration.sigma)
    span = max(calibration.map_max - calibration.map_min, 1e-12)
    host = {SMOOTHED_MAP: smoothed, SCORE_NORM: calibration.normalize(got[SCORE]),
            MAP_NORM: calibration.normalize_map(smoothed)}
    bounds = {SMOOTHED_MAP: POSTPROCESS_ATOL * span, SCORE_NORM: POSTPROCESS_ATOL, MAP_NORM: POSTPROCESS_ATOL}
    out: dict[str, Any] = {}
    for name, want in host.items():
        value = np.asarray(got[name], np.float64)
        err = float(np.abs(value - want).max()) if np.isfinite(value).all() else math.inf
        out[name] = {"max_abs": err, "bound": bounds[name], "pass": bool(err <= bounds[name])}
    out["pass"] = all(v["pass"] for v in out.values())
    return out


def _beyond_fp32_bound(ref: Outputs, got: Outputs) -> bool:
    tol = TOLERANCES["fp32"]
    return bool(error_stats(ref[ANOMALY_MAP], got[ANOMALY_MAP], 0, 0)["max_abs"] > tol["map_max_abs"]
                or error_stats(ref[SCORE], got[SCORE], 0, 0)["max_rel"] > tol["score_max_rel"])


def certify_engine(bundle: Bundle, engine: Engine, precision: str, images: np.ndarray, masks: np.ndarray | None,
                   labels: np.ndarray, reference: Outputs,
                   reference64: Outputs | Callable[[], Outputs] | None = None) -> dict[str, Any]:
    """One open engine against the reference: the statistics of :func:`compare`. ``reference64``
    (arrays, or a callable asked only when an FP32 engine misses the plain bound)."""
    got = run_engine(engine, images)
    ref64 = None
    if precision == "fp32" and reference64 is not None and _beyond_fp32_bound(reference, got):
        ref64 = reference64() if callable(reference64) else reference64
    out = compare(reference, got, np.asarray(labels).astype(int), masks, bundle.calibration, precision, ref64)
    if SMOOTHED_MAP in got:
        out["postprocess"] = post = postprocess_check(got, bundle.calibration)
        out["checks"]["postprocess"] = post["pass"]
        out["pass"] = out["pass"] and post["pass"]
    return out


def certify(bundle_dir: str | Path | Bundle, images: np.ndarray, masks: np.ndarray | None, labels: np.ndarray,
            reference: Outputs, reference64: Outputs | Callable[[], Outputs] | None = None,
            backends: Sequence[str] = ("onnxruntime",), precisions: Sequence[str] | None = None,
            data: str = "arrays", reference_name: str = "torch fp32", write: bool = True,
            engine_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """Certify the bundle's fused graphs on ``backends`` x ``precisions`` against ``reference``.

    ``images`` (N, C, H, W) float32 in [0, 1], ``labels`` (N,) 0/1, ``masks`` (N, H, W) or None.
    Returns ``{"reference": ..., "results": {"backend/precision": stats}}``; with ``write`` each
    result becomes this device's certificate beside the graph. The bundle is verified first: a
    bundle that fails its checksums is never certified.
    """
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir, verify=True)
    if not bundle.verified:
        raise BundleError(f"{bundle.root}: an unverified bundle is never certified; re-export it")
    results: dict[str, Any] = {}
    report = {"bundle": str(bundle.root.resolve()), "reference": reference_name, "data": data,
              "n_images": int(len(images)), "n_anomalous": int(np.asarray(labels).sum()),
              "tolerances": TOLERANCES, "min_decisive": MIN_DECISIVE, "machine": machine.describe(),
              "results": results}
    graphs = [g for g in (FUSED, POSTPROCESS_GRAPH) if g in bundle.spec.graphs]
    for backend in backends:
        for graph in graphs:
            for precision in precisions or engine_precisions(bundle, backend, graph):
                key = f"{backend}/{precision}" + ("" if graph == FUSED else f" {graph}")
                results[key] = _certify_one(bundle, backend, precision, graph, images, masks, labels, reference,
                                            reference64, report if write else None, (engine_kw or {}).get(backend, {}))
    return report


def _certify_one(bundle: Bundle, backend: str, precision: str, graph: str, images: np.ndarray,
                 masks: np.ndarray | None, labels: np.ndarray, reference: Outputs,
                 reference64: Outputs | Callable[[], Outputs] | None, report: dict[str, Any] | None,
                 engine_kw: dict[str, Any]) -> dict[str, Any]:
    """One engine's statistics; with ``report``, also its certificate written beside the graph."""
    try:
        engine = open_engine(bundle, backend, precision, graph=graph, **engine_kw)
    except (EngineError, BundleError) as exc:
        return {"skipped": str(exc)}
    try:
        stats = certify_engine(bundle, engine, precision, images, masks, labels, reference, reference64)
        stats["device"] = certificate.device_of(engine).label
        if report is not None:
            path = certificate.write_certificate(bundle, engine, precision, summary(stats, report), graph)
            stats["certificate"] = str(path)
        return stats
    finally:
        engine.close()


def certify_golden(bundle_dir: str | Path | Bundle, backends: Sequence[str] = ("onnxruntime",),
                   precisions: Sequence[str] | None = None, write: bool = True,
                   engine_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`certify` against the bundle's own golden outputs: no torch, no training run."""
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else load_bundle(bundle_dir, verify=True)
    golden = read_golden(bundle.root, bundle.spec.golden)
    return certify(bundle, golden.images, golden.masks, golden.labels, golden.reference, golden.reference64,
                   backends, precisions, data=golden.description, reference_name=golden.spec.reference,
                   write=write, engine_kw=engine_kw)


def load_data(bundle_dir: str | Path, root: str | Path, category: str, run_meta: dict[str, Any] | None,
              max_images: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Validation images of the run (normal, held out of training) + the category's test set:
    the images of ``edgead bench parity --against-run RUN --data ROOT --category C``."""
    from edgead.data.datasets import load_arrays, mvtec_samples

    bundle = load_bundle(bundle_dir)
    _, channels, size, _ = bundle.input_shape
    val_files = set(((run_meta or {}).get("data") or {}).get("val_files") or [])
    val = [s for s in mvtec_samples(root, category, "train") if s.path.name in val_files]
    samples = val + mvtec_samples(root, category, "test")
    if max_images and len(samples) > max_images:
        samples = [samples[i] for i in np.unique(np.linspace(0, len(samples) - 1, max_images).round().astype(int))]
    images, masks, kept = load_arrays(samples, size, channels, with_masks=True)
    labels = np.array([s.label for s in kept])
    val_paths = {s.path for s in val}
    n_val = sum(s.path in val_paths for s in kept)
    return images, masks, labels, f"{root}/{category}: {n_val} validation + {len(kept) - n_val} test images"


def summary(stats: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """What a certificate keeps of the statistics."""
    end = stats["end"]
    keep = ("band", "n_decisive", "n_in_band", "n_flips_outside_band", "n_flips_in_band", "verdict_agreement",
            "verdict_agreement_all", "flip_rate_upper95", "flips_outside_band", "flips_in_band",
            "delta_image_auroc", "delta_pixel_auroc", "map_pearson", "score_spearman")
    return json_safe({"pass": stats["pass"], "checks": stats["checks"], "data": report["data"],
                      "n_images": report["n_images"], "n_anomalous": report["n_anomalous"],
                      "reference": report["reference"], "score_max_abs": stats[SCORE]["max_abs"],
                      "score_max_rel": stats[SCORE]["max_rel"], "map_max_abs": stats[ANOMALY_MAP]["max_abs"],
                      "map_p99_abs": stats[ANOMALY_MAP]["p99_abs"], "fp64": stats.get("fp64"),
                      "postprocess": stats.get("postprocess"),
                      **{k: end[k] for k in keep}})


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


def print_table(report: dict[str, Any], file: Any = None) -> None:
    file = file or sys.stdout  # looked up per call: a default bound at import outlives a redirected stdout
    print(f"reference: {report['reference']}  ({report['n_images']} images, {report['n_anomalous']} anomalous)",
          file=file)
    print(f"{'engine':<20}{'map max|Δ|':>11}{'score rel':>11}{'map r':>9}{'ΔAUROC img':>11}{'ΔAUROC px':>10}"
          f"{'decisive':>9}{'flips':>7}{'in band':>8}  result", file=file)
    for key, s in report["results"].items():
        if "skipped" in s:
            print(f"{key:<20}  skipped: {s['skipped']}", file=file)
            continue
        e = s["end"]
        failed = [k for k, ok in s["checks"].items() if ok is False]
        print(f"{key:<20}{s['anomaly_map']['max_abs']:>11.2e}{s['score']['max_rel']:>11.2e}{e['map_pearson']:>9.5f}"
              f"{e['delta_image_auroc']:>+11.4f}{e['delta_pixel_auroc']:>+10.4f}{e['n_decisive']:>9d}"
              f"{e['n_flips_outside_band']:>7d}{e['n_flips_in_band']:>8d}  {'PASS' if s['pass'] else 'FAIL'}"
              + (f" ({', '.join(failed)})" if failed else ""), file=file)
