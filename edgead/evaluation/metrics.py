"""Anomaly-detection metrics: image- and pixel-level ROC/PR, AUPRO, F1 at a fixed threshold.

numpy, OpenCV and scikit-learn only (no torch), so a station can evaluate its own logs.

Conventions:
- label 1 / mask 1 = anomalous ("NG"), 0 = good;
- higher score = more anomalous;
- a metric that is undefined for the data (one class only, no defect regions) is ``nan``,
  never an exception, so a report over a partial data set still renders.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

__all__ = [
    "Report",
    "aupro",
    "best_f1",
    "evaluate_arrays",
    "f1_at_threshold",
    "image_auprc",
    "image_auroc",
    "pixel_auroc",
    "per_defect",
    "pro_curve",
]

GOOD = "good"


def _labels_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (anomalous)")
    return y, s


def _both_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


# --------------------------------------------------------------------------- image level


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the image-level ROC curve; nan if only one class is present."""
    y, s = _labels_scores(labels, scores)
    if not _both_classes(y):
        return math.nan
    return float(roc_auc_score(y, s))


def image_auprc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the PR curve, anomalous = positive); nan if one class only."""
    y, s = _labels_scores(labels, scores)
    if not _both_classes(y):
        return math.nan
    return float(average_precision_score(y, s))


def f1_at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion counts and precision/recall/F1/accuracy with NG iff ``score > threshold``.

    Strict ``>`` matches the runtime's decision rule. Ratios with an empty denominator are 0.
    """
    y, s = _labels_scores(labels, scores)
    pred = s > threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    fn = int(np.sum(~pred & pos))
    tn = int(np.sum(~pred & ~pos))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = (tp + tn) / y.size if y.size else math.nan
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": accuracy,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def best_f1(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(best F1, threshold) over all thresholds: an oracle upper bound, chosen on the test labels.

    Never use it to set the deployed threshold. The returned threshold follows this module's
    ``score > threshold`` rule, so ``f1_at_threshold(labels, scores, thr)["f1"]`` reproduces it.
    (nan, nan) if there are no anomalous images.
    """
    y, s = _labels_scores(labels, scores)
    if not y.size or not y.any():
        return math.nan, math.nan
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last PR point (recall 0, precision 1) has no threshold.
    p, r = precision[:-1], recall[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    i = int(np.argmax(f1))
    # sklearn predicts NG for score >= t; the largest float below t gives the same split with ">".
    return float(f1[i]), float(np.nextafter(thresholds[i], -np.inf))


def per_defect(labels: np.ndarray, scores: np.ndarray, defects: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per defect type: AUROC of that type's anomalous images against all good images, and count.

    Good images are those with label 0 (whatever their ``defects`` entry); types are taken from
    the anomalous images. AUROC is nan when there are no good images.
    """
    y, s = _labels_scores(labels, scores)
    names = np.asarray(list(defects), dtype=object)
    if names.shape != y.shape:
        raise ValueError(f"defects has {names.size} entries for {y.size} images")
    good = s[y == 0]
    out: dict[str, dict[str, float]] = {}
    for name in sorted({str(d) for d in names[y == 1]}):
        sel = s[(y == 1) & (names == name)]
        auc = image_auroc(np.r_[np.zeros(good.size), np.ones(sel.size)], np.r_[good, sel])
        out[name] = {"auroc": auc, "count": int(sel.size)}
    return out


# --------------------------------------------------------------------------- pixel level


def _masks_maps(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    a = np.asarray(maps, dtype=np.float64)
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.shape != a.shape or m.ndim != 3:
        raise ValueError(f"masks {m.shape} and maps {a.shape} must both be (N, H, W)")
    if not np.isfinite(a).all():
        raise ValueError("maps contain nan or inf")
    return m > 0, a


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over all pixels of all images; nan if every pixel has the same label."""
    m, a = _masks_maps(masks, maps)
    y = m.reshape(-1)
    if not _both_classes(y.astype(np.int64)):
        return math.nan
    return float(roc_auc_score(y, a.reshape(-1)))


def _region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Ground-truth regions (8-connected) numbered 1..R across all images; 0 = normal pixel."""
    ids = np.zeros(masks.shape, dtype=np.int64)
    offset = 0
    for i, mask in enumerate(masks):
        count, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        ids[i] = np.where(lab > 0, lab + offset, 0)
        offset += count - 1
    return ids, offset


def pro_curve(
    masks: np.ndarray,
    maps: np.ndarray,
    num_thresholds: int | None = 200,
    fpr_limit: float = 1.0,
) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, pro) points of the per-region-overlap curve, fpr non-decreasing, from (0, 0) to (1, 1).

    A pixel is predicted anomalous iff ``map >= t``. PRO(t) is the mean over all ground-truth
    regions of the fraction of the region predicted anomalous; FPR(t) is the fraction of normal
    pixels predicted anomalous. ``num_thresholds=None`` evaluates every distinct map value (exact
    curve); otherwise thresholds are quantiles of all map values plus quantiles of the normal
    pixels' values covering FPR 0..``fpr_limit`` (denser where AUPRO integrates).
    None if there is no defect region or no normal pixel.
    """
    m, a = _masks_maps(masks, maps)
    ids, n_regions = _region_labels(m)
    ids, a = ids.reshape(-1), a.reshape(-1)
    normal = ids == 0
    n_normal = int(normal.sum())
    if n_regions == 0 or n_normal == 0:
        return None

    # PRO(t) is a weighted count: each region pixel weighs 1 / (|region| * R), so the weights of
    # a fully covered region sum to 1/R. One sort then answers every threshold by searchsorted.
    sizes = np.bincount(ids, minlength=n_regions + 1)
    reg_ids = ids[~normal]
    reg_scores = a[~normal]
    order = np.argsort(reg_scores, kind="stable")
    reg_sorted = reg_scores[order]
    reg_w = 1.0 / (sizes[reg_ids[order]] * n_regions)
    # suffix[k] = total weight of region pixels with rank >= k (i.e. score >= reg_sorted[k]).
    suffix = np.concatenate([np.cumsum(reg_w[::-1])[::-1], [0.0]])
    norm_sorted = np.sort(a[normal])

    if num_thresholds is None:
        thresholds = np.unique(a)
    else:
        levels = np.linspace(0.0, 1.0, max(int(num_thresholds), 2))
        fpr_levels = 1.0 - np.linspace(0.0, min(1.0, fpr_limit), max(int(num_thresholds), 2))
        # Just above the highest normal pixel: the exact PRO at FPR 0, where quantiles fall short.
        above_normal = np.nextafter(norm_sorted[-1], np.inf)
        thresholds = np.unique(np.r_[np.quantile(a, levels), np.quantile(norm_sorted, fpr_levels), above_normal])
    # +inf gives the (0, 0) end; the minimum map value (always present) gives (1, 1).
    thresholds = np.r_[np.inf, thresholds[::-1]]  # descending, so fpr and pro are non-decreasing

    fpr = (n_normal - np.searchsorted(norm_sorted, thresholds, side="left")) / n_normal
    pro = suffix[np.searchsorted(reg_sorted, thresholds, side="left")]
    # Cumulative sums of many tiny weights can overshoot 1 by rounding.
    return fpr, np.clip(pro, 0.0, 1.0)


def _area_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under a curve with non-decreasing x from x[0] to x_max (linear interp)."""
    j = int(np.searchsorted(x, x_max, side="right"))  # first point beyond x_max
    xs, ys = x[:j], y[:j]
    if j < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[j - 1], x[j], y[j - 1], y[j]
        xs = np.r_[xs, x_max]
        ys = np.r_[ys, y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3, num_thresholds: int | None = 200) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised so a perfect map scores 1.0.

    As in the MVTec AD paper (Bergmann et al.): every ground-truth region counts equally,
    whatever its size, unlike pixel AUROC where large defects dominate. nan if no defect region.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError("fpr_limit must be in (0, 1]")
    curve = pro_curve(masks, maps, num_thresholds=num_thresholds, fpr_limit=fpr_limit)
    if curve is None:
        return math.nan
    fpr, pro = curve
    return _area_to(fpr, pro, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- report


def _json_safe(value: Any) -> Any:
    """nan/inf -> None and numpy scalars -> Python, recursively, so the dict dumps as strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


@dataclass
class Report:
    """Evaluation of one model on one test set. nan marks a metric the data cannot define."""

    image_auroc: float
    image_auprc: float
    pixel_auroc: float
    aupro: float
    threshold: float
    f1: dict[str, float]  # at the stored (deployed) threshold
    best_f1: float  # oracle, chosen on the test labels: an upper bound only
    best_f1_threshold: float
    per_defect: dict[str, dict[str, float]] = field(default_factory=dict)
    n_images: int = 0
    n_anomalous: int = 0
    aupro_fpr_limit: float = 0.3

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON-safe dict (nan becomes None)."""
        return _json_safe(asdict(self))

    def summary(self) -> str:
        """A few human-readable lines for logs and the CLI."""

        def f(v: float) -> str:
            return "  n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"

        lines = [
            f"images {self.n_images} ({self.n_anomalous} anomalous)",
            f"image AUROC {f(self.image_auroc)}  AUPRC {f(self.image_auprc)}",
            f"pixel AUROC {f(self.pixel_auroc)}  AUPRO@{self.aupro_fpr_limit:g} {f(self.aupro)}",
            f"at threshold {self.threshold:.4g}: F1 {f(self.f1['f1'])}  precision {f(self.f1['precision'])}"
            f"  recall {f(self.f1['recall'])}  (tp {self.f1['tp']} fp {self.f1['fp']}"
            f" tn {self.f1['tn']} fn {self.f1['fn']})",
            f"oracle best F1 {f(self.best_f1)} (threshold {self.best_f1_threshold:.4g}, not deployable)",
        ]
        lines += [f"  {name:<16} AUROC {f(d['auroc'])}  n={d['count']}" for name, d in self.per_defect.items()]
        return "\n".join(lines)


def evaluate_arrays(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    defects: Sequence[str] | None,
    threshold: float,
    fpr_limit: float = 0.3,
) -> Report:
    """All metrics for one test set. Pixel metrics are nan when masks or maps are None.

    ``threshold`` is the deployed one (set from good validation images), never fitted here.
    """
    y, s = _labels_scores(labels, scores)
    if masks is not None and maps is not None:
        px_auroc = pixel_auroc(masks, maps)
        px_aupro = aupro(masks, maps, fpr_limit=fpr_limit)
    else:
        px_auroc = px_aupro = math.nan
    if defects is None:
        defects = [GOOD if v == 0 else "anomalous" for v in y]
    best, best_thr = best_f1(y, s)
    return Report(
        image_auroc=image_auroc(y, s),
        image_auprc=image_auprc(y, s),
        pixel_auroc=px_auroc,
        aupro=px_aupro,
        threshold=float(threshold),
        f1=f1_at_threshold(y, s, threshold),
        best_f1=best,
        best_f1_threshold=best_thr,
        per_defect=per_defect(y, s, defects),
        n_images=int(y.size),
        n_anomalous=int(y.sum()),
        aupro_fpr_limit=float(fpr_limit),
    )
