"""Metrics checked against hand-computed values; figures checked as readable PNGs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edgead.evaluation import figures
from edgead.evaluation.metrics import (
    Report,
    aupro,
    best_f1,
    evaluate_arrays,
    f1_at_threshold,
    image_auprc,
    image_auroc,
    per_defect,
    pixel_auroc,
    pro_curve,
)

# --------------------------------------------------------------------------- image level


def test_image_auroc_hand_value():
    # Positive/negative pairs: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)


def test_image_auprc_hand_value():
    # Ranked: 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5*1 + 0.5*(2/3).
    assert image_auprc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)


def test_single_class_gives_nan_not_exception():
    for labels in ([0, 0, 0], [1, 1, 1]):
        assert math.isnan(image_auroc(labels, [0.1, 0.2, 0.3]))
        assert math.isnan(image_auprc(labels, [0.1, 0.2, 0.3]))
    assert best_f1([0, 0], [0.1, 0.2]) == (pytest.approx(math.nan, nan_ok=True),) * 2
    masks = np.zeros((2, 4, 4), np.uint8)
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(pixel_auroc(masks, maps))
    assert math.isnan(aupro(masks, maps))
    assert math.isnan(pixel_auroc(np.ones_like(masks), maps))
    assert math.isnan(aupro(np.ones_like(masks), maps))  # no normal pixel: FPR undefined


def test_f1_at_threshold_counts():
    labels = [0, 0, 1, 1, 1, 0]
    scores = [0.1, 0.6, 0.7, 0.2, 0.9, 0.5]
    r = f1_at_threshold(labels, scores, 0.5)  # 0.5 itself is OK: NG needs score > threshold
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 2, 1)
    assert all(isinstance(r[k], int) for k in ("tp", "fp", "tn", "fn"))
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["accuracy"] == pytest.approx(4 / 6)
    none = f1_at_threshold(labels, scores, 1.0)  # nothing flagged: ratios 0, not nan
    assert (none["tp"], none["fp"], none["precision"], none["f1"]) == (0, 0, 0.0, 0.0)


def test_best_f1_is_oracle_and_consistent_with_strict_rule():
    labels = [0, 0, 1, 1, 1, 0]
    scores = [0.1, 0.6, 0.7, 0.2, 0.9, 0.5]
    # Flagging {0.9, 0.7}: precision 1, recall 2/3 -> F1 0.8, the best split.
    f1, thr = best_f1(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert 0.6 <= thr < 0.7
    assert f1_at_threshold(labels, scores, thr)["f1"] == pytest.approx(f1)


def test_per_defect_two_types():
    labels = [0, 0, 0, 1, 1, 1, 1]
    defects = ["good", "good", "good", "crack", "crack", "scratch", "scratch"]
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.15, 0.25]
    out = per_defect(labels, scores, defects)
    assert set(out) == {"crack", "scratch"}
    assert out["crack"] == {"auroc": pytest.approx(1.0), "count": 2}
    # scratch 0.15 beats 1 of 3 good, 0.25 beats 2 of 3 -> 3/6.
    assert out["scratch"] == {"auroc": pytest.approx(0.5), "count": 2}
    no_good = per_defect([1, 1], [0.3, 0.4], ["crack", "crack"])
    assert math.isnan(no_good["crack"]["auroc"]) and no_good["crack"]["count"] == 2


# --------------------------------------------------------------------------- pixel level


def test_pixel_auroc_hand_value():
    masks = np.array([[[0, 1], [0, 0]], [[0, 0], [1, 0]]])
    maps = np.array([[[0.1, 0.9], [0.2, 0.3]], [[0.5, 0.4], [0.35, 0.0]]])
    # Positives 0.9 (beats all 6 negatives) and 0.35 (beats 0.1, 0.2, 0.3, 0.0): 10/12.
    assert pixel_auroc(masks, maps) == pytest.approx(10 / 12)


def _two_regions() -> np.ndarray:
    """One image, a 1-pixel region A at (1, 1) and a 4x4 region B at rows/cols 8..11."""
    mask = np.zeros((1, 16, 16), np.uint8)
    mask[0, 1, 1] = 1
    mask[0, 8:12, 8:12] = 1
    return mask


@pytest.mark.parametrize("num_thresholds", [200, None])
def test_aupro_perfect_map_is_one(num_thresholds):
    masks = _two_regions()
    assert aupro(masks, masks.astype(float), num_thresholds=num_thresholds) == pytest.approx(1.0)


@pytest.mark.parametrize("num_thresholds", [200, None])
def test_aupro_regions_weigh_equally(num_thresholds):
    # The map finds the 1-pixel region A and misses the 16-pixel region B at every threshold
    # that keeps FPR <= 1, so PRO is 0.5 on (0, 1): AUPRO 0.5, whatever the region sizes.
    masks = _two_regions()
    maps = np.full(masks.shape, 0.5)
    maps[0, 1, 1] = 1.0
    maps[0, 8:12, 8:12] = 0.0
    assert aupro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(0.5)


@pytest.mark.parametrize("num_thresholds", [200, None])
def test_aupro_interpolates_at_fpr_limit(num_thresholds):
    # Region B ties with the normal pixels: curve (0,0) -> (0,0.5) -> (1,1). At FPR 0.3 the
    # segment gives PRO 0.65, area 0.3 * (0.5 + 0.65) / 2 = 0.1725, normalised 0.575.
    masks = _two_regions()
    maps = np.zeros(masks.shape)
    maps[0, 1, 1] = 1.0
    assert aupro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(0.575)
    assert aupro(masks, maps, fpr_limit=1.0, num_thresholds=num_thresholds) == pytest.approx(0.75)


def test_aupro_map_high_only_on_normal_pixels_is_zero():
    masks = _two_regions()
    maps = np.zeros(masks.shape)
    maps[0, :, 12:] = 1.0  # right and bottom strips, all normal: FPR 100/239 before any region pixel
    maps[0, 13:, :] = 1.0
    assert aupro(masks, maps) == pytest.approx(0.0, abs=1e-9)


def test_aupro_uses_8_connectivity():
    # (0,0), (1,1), (1,2) touch diagonally: one 3-pixel region, of which the map finds 1/3.
    # With 4-connectivity it would be two regions and PRO 0.5.
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 1, 2] = 1
    maps = np.full(mask.shape, 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1:3] = 0.0
    assert aupro(mask, maps) == pytest.approx(1 / 3)


def test_pro_curve_ends_and_monotone():
    rng = np.random.default_rng(1)
    masks = np.zeros((3, 32, 32), np.uint8)
    masks[0, 4:10, 4:10] = 1
    masks[2, 20:30, 5:8] = 1
    maps = rng.random(masks.shape) + masks
    fpr, pro = pro_curve(masks, maps)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


def _aupro_brute_force(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Reference: one threshold at a time, regions looped over explicitly."""
    regions = []
    for i in range(len(masks)):
        n, lab = cv2.connectedComponents(masks[i].astype(np.uint8), connectivity=8)
        regions += [(i, lab == k) for k in range(1, n)]
    normal = masks == 0
    pts = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        pro = np.mean([pred[i][r].mean() for i, r in regions])
        pts.append(((pred & normal).sum() / normal.sum(), pro))
    x, y = np.array(pts).T
    j = np.searchsorted(x, fpr_limit, side="right")
    xs, ys = list(x[:j]), list(y[:j])
    if j < len(x) and xs[-1] < fpr_limit:
        ys.append(ys[-1] + (y[j] - ys[-1]) * (fpr_limit - xs[-1]) / (x[j] - xs[-1]))
        xs.append(fpr_limit)
    xs, ys = np.array(xs), np.array(ys)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2) / fpr_limit)


def test_aupro_matches_brute_force_reference():
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[0, 2:6, 2:9] = 1
    masks[0, 15:17, 15:23] = 1
    masks[1, 10:20, 10:12] = 1
    masks[3, 0:3, 20:24] = 1
    # Rounded so there are ties, as with real quantised maps.
    maps = np.round(rng.random(masks.shape) * 0.8 + 0.5 * masks * rng.random(masks.shape), 2)
    ref = _aupro_brute_force(masks, maps, 0.3)
    assert 0.05 < ref < 0.95
    assert aupro(masks, maps, num_thresholds=None) == pytest.approx(ref, abs=1e-9)
    assert aupro(masks, maps, num_thresholds=200) == pytest.approx(ref, abs=0.01)


def test_aupro_on_realistic_size_matches_the_exact_curve():
    rng = np.random.default_rng(3)
    masks = np.zeros((100, 128, 128), np.uint8)
    for i in range(0, 100, 2):
        y, x = rng.integers(0, 100, size=2)
        masks[i, y : y + 20, x : x + 12] = 1
    maps = cv2.GaussianBlur(rng.random((100 * 128, 128)).astype(np.float32), (0, 0), 3).reshape(100, 128, 128)
    maps = maps + 0.05 * masks
    a = aupro(masks, maps)  # its speed is a benchmark's business, not an assertion on a shared CPU
    assert 0.0 < a < 1.0
    assert a == pytest.approx(aupro(masks, maps, num_thresholds=None), abs=0.01)


# --------------------------------------------------------------------------- report


def test_evaluate_arrays_report():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.25])
    defects = ["good", "good", "good", "crack", "scratch"]
    masks = np.zeros((5, 16, 16), np.uint8)
    masks[3, 2:6, 2:6] = 1
    masks[4, 10:14, 3:5] = 1
    maps = rng.random(masks.shape) * 0.5 + masks * 0.6
    rep = evaluate_arrays(labels, scores, masks, maps, defects, threshold=0.28)
    assert isinstance(rep, Report)
    assert rep.image_auroc == pytest.approx(image_auroc(labels, scores))
    assert rep.aupro == pytest.approx(1.0)  # maps separate perfectly
    assert rep.pixel_auroc == pytest.approx(1.0)
    assert (rep.n_images, rep.n_anomalous) == (5, 2)
    assert rep.f1["tp"] == 1 and rep.f1["fp"] == 1  # 0.8 NG, 0.3 false alarm, 0.25 missed
    assert set(rep.per_defect) == {"crack", "scratch"}
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["per_defect"]["crack"]["count"] == 1
    assert "image AUROC" in rep.summary()


def test_report_to_dict_maps_nan_to_none():
    rep = evaluate_arrays([0, 0, 0], [0.1, 0.2, 0.3], None, None, None, threshold=0.5)
    d = rep.to_dict()
    assert d["image_auroc"] is None and d["pixel_auroc"] is None and d["aupro"] is None
    json.dumps(d, allow_nan=False)
    assert "n/a" in rep.summary()


def test_modules_do_not_import_torch():
    code = (
        "import sys, edgead.evaluation.metrics, edgead.evaluation.figures; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --------------------------------------------------------------------------- figures


def _read_png(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None and img.size > 0
    assert (img != img[0, 0]).any()  # not one flat colour
    return img


def test_roc_figure_png(tmp_path):
    labels = np.r_[np.zeros(50), np.ones(50)]
    rng = np.random.default_rng(5)
    from sklearn.metrics import roc_curve

    curves = {}
    for name, sep in (("ssim_ae", 1.5), ("ganomaly", 0.5)):
        scores = rng.normal(size=100) + sep * labels
        fpr, tpr, _ = roc_curve(labels, scores)
        curves[name] = (fpr, tpr, image_auroc(labels, scores))
    out = figures.roc_figure(curves, tmp_path / "sub" / "roc.png", "image ROC")
    assert out.exists()
    assert _read_png(out).shape == (480, 480, 3)


def test_overlay_grid_png(tmp_path):
    rng = np.random.default_rng(6)
    n, h, w = 10, 64, 64
    images = rng.random((n, 3, h, w)).astype(np.float32)
    maps = rng.random((n, 16, 16)).astype(np.float32)  # coarser than the image: resized
    masks = np.zeros((n, h, w), np.uint8)
    masks[:, 20:40, 20:40] = 1
    preds = np.zeros_like(masks)
    preds[:, 25:45, 18:38] = 1
    caps = [f"crack score 0.{i}3 NG" for i in range(n)]
    out = figures.overlay_grid(images, maps, masks, preds, tmp_path / "grid.png", caps, max_rows=8)
    img = _read_png(out)
    tile = 64 * 3  # upscaled to at least 160 px
    assert img.shape[1] == 4 * tile + 5 * 4
    assert img.shape[0] > 8 * tile
    # Without masks and predictions: two columns; grey images accepted.
    out2 = figures.overlay_grid(images[:2, :1], maps[:2], None, None, tmp_path / "grid2.png")
    assert _read_png(out2).shape[1] == 2 * tile + 3 * 4


def test_heatmap_overlay_shape_and_effect():
    img = np.full((40, 60, 3), 128, np.uint8)
    amap = np.zeros((10, 15), np.float32)  # lower resolution than the image
    amap[2:5, 3:7] = 1.0
    out = figures.heatmap_overlay(img, amap, vmin=0.0, vmax=1.0)
    assert out.shape == img.shape and out.dtype == np.uint8
    hot, cold = out[14, 20].astype(int), out[35, 55].astype(int)
    assert not np.array_equal(out[14, 20], img[14, 20])
    assert hot[2] > cold[2] + 50  # red where the map is high (BGR)
    assert cold[0] > hot[0]  # blue where it is low
    gray = figures.heatmap_overlay(img[..., 0], amap, 0.0, 1.0)
    assert gray.shape == img.shape
