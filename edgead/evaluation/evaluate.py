"""``edgead eval``: score a run, or any engine of a bundle, on the test split; write metrics JSON
and figures.

Maps are smoothed exactly as the runtime smooths them; the F1 uses the threshold stored from
validation. The oracle best-F1 is reported beside it, labelled as such, never deployed. A bundle
is evaluated through the Engine protocol (no torch), so the lab reads the numbers of the engine
the line runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from edgead.core.calibration import Calibration
from edgead.core.postprocess import DEFAULT_SIGMA, smooth
from edgead.data.datasets import load_arrays
from edgead.data.source import DataSource
from edgead.evaluation import figures, metrics


def evaluate_arrays(detector, calibration, images: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                    defects: list[str]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of ``detector`` on test arrays, its maps smoothed with the calibration's sigma (as
    the station smooths them); returns (report dict, scores, smoothed maps)."""
    from edgead.training.predict import predict_smoothed

    sigma = calibration.sigma if calibration is not None else DEFAULT_SIGMA
    scores, maps = predict_smoothed(detector, images, sigma)
    threshold = calibration.image_threshold if calibration is not None else float("nan")
    report = metrics.evaluate_arrays(labels, scores, masks, maps, defects, threshold).to_dict()
    return report, scores, maps


def _test_split(source: DataSource, size: int, channels: int,
                skip_bad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    images, masks, samples = load_arrays(source.test(), size, channels, skip_bad=skip_bad, with_masks=True)
    return images, masks, np.array([s.label for s in samples]), [s.defect for s in samples]


def write_evaluation(out: Path, report: dict[str, Any], calibration: Calibration | None, images: np.ndarray,
                     masks: np.ndarray, labels: np.ndarray, defects: list[str], scores: np.ndarray,
                     maps: np.ndarray, title: str) -> dict[str, Any]:
    """metrics.json, roc.png and overlays.png: one writer for a torch run and for any engine."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    fpr, tpr, _ = roc_curve(labels, scores)
    pfpr, ptpr, _ = roc_curve(masks.ravel().astype(int), maps.ravel())
    figures.roc_figure({"image": (fpr, tpr, report["image_auroc"]), "pixel": (pfpr, ptpr, report["pixel_auroc"])},
                       out / "roc.png", title)
    preds = (maps > calibration.pixel_threshold).astype(np.uint8) if calibration else None
    pick = _grid_rows(labels, defects)
    captions = [f"{defects[i]} {scores[i]:.4g} {calibration.verdict(scores[i]) if calibration else ''}" for i in pick]
    figures.overlay_grid(images[pick], maps[pick], masks[pick], None if preds is None else preds[pick],
                         out / "overlays.png", captions=captions)
    return report


def evaluate_run(run_dir: str | Path, source: DataSource, out_dir: str | Path | None = None,
                 skip_bad: bool = False, device: str = "auto") -> dict[str, Any]:
    """Metrics and figures of a run on the test images of ``source``."""
    from edgead.training.checkpoint import load_run
    from edgead.training.trainer import select_device

    run_dir = Path(run_dir)
    detector, calibration, meta = load_run(run_dir, select_device(device))
    cfg = meta["config"]
    images, masks, labels, defects = _test_split(source, cfg["image_size"], cfg["channels"], skip_bad)
    report, scores, maps = evaluate_arrays(detector, calibration, images, masks, labels, defects)
    report.update(detector=meta["detector"], category=source.name, data=source.describe(), run=str(run_dir),
                  engine="torch/fp32", threshold_source=calibration.source if calibration else "none")
    return write_evaluation(Path(out_dir) if out_dir else run_dir / "eval", report, calibration, images, masks,
                            labels, defects, scores, maps, f"{meta['detector']} / {source.name}")


def evaluate_bundle(bundle_dir: str | Path, source: DataSource, backend: str = "onnxruntime",
                    precision: str = "fp32", out_dir: str | Path | None = None,
                    skip_bad: bool = False) -> dict[str, Any]:
    """``edgead eval BUNDLE --backend B --precision P``: the same metrics and figures as
    :func:`evaluate_run`, from the engine the line runs, through the Engine protocol and the loop
    certification uses (:func:`edgead.core.engine.run_batch`); maps smoothed as the runtime does."""
    from edgead.core.bundle import load_bundle
    from edgead.core.engine import run_batch
    from edgead.engines import open_engine

    bundle = load_bundle(bundle_dir)
    cal = bundle.calibration
    _, channels, size, _ = bundle.input_shape
    images, masks, labels, defects = _test_split(source, size, channels, skip_bad)
    engine = open_engine(bundle, backend, precision)
    try:
        scores, raw = run_batch(engine, images)
    finally:
        engine.close()
    maps = smooth(raw, cal.sigma)
    report = metrics.evaluate_arrays(labels, scores, masks, maps, defects, cal.image_threshold).to_dict()
    report.update(detector=bundle.detector, category=source.name, data=source.describe(), bundle=str(bundle.root),
                  engine=f"{backend}/{precision}", threshold_source=cal.source)
    out = Path(out_dir) if out_dir else bundle.root.parent / f"{bundle.root.name}-eval-{backend}-{precision}"
    return write_evaluation(out, report, cal, images, masks, labels, defects, scores, maps,
                            f"{bundle.detector} / {source.name} ({backend}/{precision})")


def _grid_rows(labels: np.ndarray, defects: list[str], per_defect: int = 1) -> list[int]:
    """One normal and one image of each defect type for the overlay grid."""
    chosen, seen = [], {}
    for i, d in enumerate(defects):
        if seen.get(d, 0) < per_defect:
            chosen.append(i)
            seen[d] = seen.get(d, 0) + 1
    return chosen[:8]
