"""``edgead eval``: score a run on the test split and write metrics JSON and figures.

Maps are smoothed exactly as the runtime smooths them; the F1 uses the threshold stored from
validation. The oracle best-F1 is reported beside it, labelled as such, never deployed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from edgead.data.datasets import load_arrays
from edgead.data.source import DataSource
from edgead.evaluation import figures, metrics
from edgead.core.postprocess import DEFAULT_SIGMA
from edgead.training.checkpoint import load_run
from edgead.training.predict import predict_smoothed
from edgead.training.trainer import select_device


def evaluate_arrays(detector, calibration, images: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                    defects: list[str]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Metrics of ``detector`` on test arrays, its maps smoothed with the calibration's sigma (as
    the station smooths them); returns (report dict, scores, smoothed maps)."""
    sigma = calibration.sigma if calibration is not None else DEFAULT_SIGMA
    scores, maps = predict_smoothed(detector, images, sigma)
    threshold = calibration.image_threshold if calibration is not None else float("nan")
    report = metrics.evaluate_arrays(labels, scores, masks, maps, defects, threshold).to_dict()
    return report, scores, maps


def evaluate_run(run_dir: str | Path, source: DataSource, out_dir: str | Path | None = None,
                 skip_bad: bool = False, device: str = "auto") -> dict[str, Any]:
    """Metrics and figures of a run on the test images of ``source``."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    detector, calibration, meta = load_run(run_dir, select_device(device))
    cfg = meta["config"]
    samples = source.test()
    images, masks, samples = load_arrays(samples, cfg["image_size"], cfg["channels"], skip_bad=skip_bad,
                                         with_masks=True)
    labels = np.array([s.label for s in samples])
    defects = [s.defect for s in samples]
    report, scores, maps = evaluate_arrays(detector, calibration, images, masks, labels, defects)
    report.update(detector=meta["detector"], category=source.name, data=source.describe(), run=str(run_dir),
                  threshold_source=calibration.source if calibration else "none")
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")

    fpr, tpr, _ = roc_curve(labels, scores)
    pfpr, ptpr, _ = roc_curve(masks.ravel().astype(int), maps.ravel())
    figures.roc_figure({"image": (fpr, tpr, report["image_auroc"]), "pixel": (pfpr, ptpr, report["pixel_auroc"])},
                       out / "roc.png", f"{meta['detector']} / {source.name}")
    preds = (maps > calibration.pixel_threshold).astype(np.uint8) if calibration else None
    pick = _grid_rows(labels, defects)
    captions = [f"{defects[i]} {scores[i]:.4g} {calibration.verdict(scores[i]) if calibration else ''}" for i in pick]
    figures.overlay_grid(images[pick], maps[pick], masks[pick], None if preds is None else preds[pick],
                         out / "overlays.png", captions=captions)
    return report


def _grid_rows(labels: np.ndarray, defects: list[str], per_defect: int = 1) -> list[int]:
    """One normal and one image of each defect type for the overlay grid."""
    chosen, seen = [], {}
    for i, d in enumerate(defects):
        if seen.get(d, 0) < per_defect:
            chosen.append(i)
            seen[d] = seen.get(d, 0) + 1
    return chosen[:8]
