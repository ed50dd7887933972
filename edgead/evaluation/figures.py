"""Evaluation figures drawn with OpenCV (no matplotlib): ROC curves and image/map/mask grids.

numpy + OpenCV only; the overlay itself (``heatmap_overlay``) lives in :mod:`edgead.core.overlay`,
shared with the station runtime's sinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from edgead.core.overlay import heatmap_overlay

__all__ = ["heatmap_overlay", "overlay_grid", "roc_figure"]

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GREY = (160, 160, 160)
GT_COLOUR = (0, 255, 0)  # green: ground truth
PRED_COLOUR = (0, 0, 255)  # red: prediction
# Distinguishable BGR colours (Tableau 10), cycled for ROC curves.
PALETTE = [
    (180, 119, 31),
    (14, 127, 255),
    (44, 160, 44),
    (40, 39, 214),
    (189, 103, 148),
    (75, 86, 140),
    (194, 119, 227),
    (127, 127, 127),
    (34, 189, 188),
    (207, 190, 23),
]


def _write(path: str | Path, image: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")
    return path


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, colour=BLACK, thickness: int = 1) -> None:
    cv2.putText(img, text, org, FONT, scale, colour, thickness, cv2.LINE_AA)


# --------------------------------------------------------------------------- ROC


def roc_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str,
    size: int = 480,
) -> Path:
    """Draw ROC curves (label -> (fpr, tpr, auc)) with a diagonal and a legend to a PNG."""
    img = np.full((size, size, 3), 255, np.uint8)
    left, right, top, bottom = 58, 16, 40, 50
    w, h = size - left - right, size - top - bottom

    def xy(fpr: float, tpr: float) -> tuple[int, int]:
        return int(round(left + fpr * w)), int(round(top + (1.0 - tpr) * h))

    # Grid, ticks and tick labels every 0.2.
    for k in range(6):
        v = k / 5
        gx, _ = xy(v, 0)
        _, gy = xy(0, v)
        cv2.line(img, (gx, top), (gx, top + h), (235, 235, 235), 1)
        cv2.line(img, (left, gy), (left + w, gy), (235, 235, 235), 1)
        cv2.line(img, (gx, top + h), (gx, top + h + 5), BLACK, 1)
        cv2.line(img, (left - 5, gy), (left, gy), BLACK, 1)
        _text(img, f"{v:.1f}", (gx - 11, top + h + 20), 0.4)
        _text(img, f"{v:.1f}", (left - 34, gy + 4), 0.4)
    cv2.rectangle(img, (left, top), (left + w, top + h), BLACK, 1)

    # Chance diagonal, dashed.
    n_dash = 30
    for k in range(0, n_dash, 2):
        cv2.line(img, xy(k / n_dash, k / n_dash), xy((k + 1) / n_dash, (k + 1) / n_dash), GREY, 1, cv2.LINE_AA)

    for i, (label, (fpr, tpr, _)) in enumerate(curves.items()):
        pts = np.array([xy(float(a), float(b)) for a, b in zip(np.asarray(fpr), np.asarray(tpr))], np.int32)
        if len(pts):
            cv2.polylines(img, [pts.reshape(-1, 1, 2)], False, PALETTE[i % len(PALETTE)], 2, cv2.LINE_AA)

    # Title and axis labels.
    (tw, _), _ = cv2.getTextSize(title, FONT, 0.55, 1)
    _text(img, title, (max(4, (size - tw) // 2), 25), 0.55)
    _text(img, "false positive rate", (left + w // 2 - 70, size - 12), 0.45)
    label_img = np.full((20, 130, 3), 255, np.uint8)
    _text(label_img, "true positive rate", (2, 14), 0.45)
    rotated = cv2.rotate(label_img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    y0 = top + h // 2 - rotated.shape[0] // 2
    img[y0 : y0 + rotated.shape[0], 2 : 2 + rotated.shape[1]] = rotated

    # Legend in the lower right, where ROC curves rarely go.
    entries = [f"{label}  AUROC {auc:.3f}" for label, (_, _, auc) in curves.items()]
    if entries:
        line_h = 18
        text_w = max(cv2.getTextSize(e, FONT, 0.42, 1)[0][0] for e in entries)
        box_w, box_h = text_w + 40, line_h * len(entries) + 8
        x0, y0 = left + w - box_w - 6, top + h - box_h - 6
        cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + box_h), WHITE, -1)
        cv2.rectangle(img, (x0, y0), (x0 + box_w, y0 + box_h), GREY, 1)
        for i, e in enumerate(entries):
            cy = y0 + 4 + line_h * i + line_h // 2
            cv2.line(img, (x0 + 6, cy), (x0 + 28, cy), PALETTE[i % len(PALETTE)], 2, cv2.LINE_AA)
            _text(img, e, (x0 + 34, cy + 5), 0.42)
    return _write(path, img)


# --------------------------------------------------------------------------- maps


def _to_bgr_uint8(image_chw: np.ndarray) -> np.ndarray:
    """(C, H, W) float RGB/grey in [0, 1] -> (H, W, 3) uint8 BGR."""
    x = np.clip(np.asarray(image_chw, dtype=np.float32), 0.0, 1.0)
    x = (x * 255 + 0.5).astype(np.uint8)
    if x.shape[0] == 1:
        return cv2.cvtColor(x[0], cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(np.ascontiguousarray(x[:3].transpose(1, 2, 0)), cv2.COLOR_RGB2BGR)


def _contour(img: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    m = (np.asarray(mask) > 0).astype(np.uint8)
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = img.copy()
    cv2.drawContours(out, contours, -1, colour, 1, cv2.LINE_AA)
    return out


def _colour_bar(width: int, vmin: float, vmax: float) -> np.ndarray:
    bar = np.full((34, width, 3), 255, np.uint8)
    ramp = np.linspace(0, 255, max(width - 120, 16)).astype(np.uint8)[None, :].repeat(10, 0)
    coloured = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    x0 = 60
    bar[4:14, x0 : x0 + coloured.shape[1]] = coloured
    _text(bar, f"{vmin:.3g}", (4, 14), 0.4)
    _text(bar, f"{vmax:.3g}", (x0 + coloured.shape[1] + 6, 14), 0.4)
    _text(bar, "map scale (common to all rows)", (x0, 29), 0.38, GREY)
    return bar


def overlay_grid(
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    preds: np.ndarray | None,
    path: str | Path,
    captions: Sequence[str] | None = None,
    max_rows: int = 8,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> Path:
    """One row per image: image | heat-map overlay | ground-truth contour | prediction contour.

    images (N, C, H, W) float RGB/grey in [0, 1]; maps (N, h, w) (resized to the image);
    masks / preds (N, h, w) {0, 1}, their column left out when None. The map colour scale is
    shared by all rows (default: min/max of the shown maps) so rows are comparable. Small
    images are upscaled so captions stay legible. At most ``max_rows`` rows (the first ones).
    """
    images = np.asarray(images)
    n = min(len(images), max_rows)
    if n == 0:
        raise ValueError("no images to draw")
    shown_maps = np.asarray(maps, dtype=np.float32)[:n]
    lo = float(np.nanmin(shown_maps)) if vmin is None else float(vmin)
    hi = float(np.nanmax(shown_maps)) if vmax is None else float(vmax)

    h, w = images.shape[2:]
    scale = max(1, int(np.ceil(160 / w)))  # integer upscale keeps pixels crisp
    th, tw = h * scale, w * scale
    headers = ["image", "anomaly map"] + (["ground truth"] if masks is not None else [])
    headers += ["prediction"] if preds is not None else []
    gap, cap_h, head_h = 4, 20, 22
    width = len(headers) * tw + (len(headers) + 1) * gap

    header = np.full((head_h, width, 3), 255, np.uint8)
    for j, name in enumerate(headers):
        _text(header, name, (gap + j * (tw + gap) + 4, 15), 0.45)
    rows = [header]
    for i in range(n):
        base = _to_bgr_uint8(images[i])
        if scale > 1:
            base = cv2.resize(base, (tw, th), interpolation=cv2.INTER_NEAREST)
        tiles = [base, heatmap_overlay(base, shown_maps[i], lo, hi, alpha)]
        if masks is not None:
            tiles.append(_contour(base, masks[i], GT_COLOUR))
        if preds is not None:
            tiles.append(_contour(base, preds[i], PRED_COLOUR))
        row = np.full((cap_h + th + gap, width, 3), 255, np.uint8)
        if captions is not None and i < len(captions):
            _text(row, str(captions[i]), (gap + 2, cap_h - 6), 0.45)
        for j, tile in enumerate(tiles):
            x = gap + j * (tw + gap)
            row[cap_h : cap_h + th, x : x + tw] = tile
        rows.append(row)
    rows.append(_colour_bar(width, lo, hi))
    return _write(path, np.vstack(rows))
