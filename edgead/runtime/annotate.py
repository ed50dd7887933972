"""The operator's picture of one frame: heat-map overlay, region boxes, verdict, score, FPS."""

from __future__ import annotations

import cv2
import numpy as np

from edgead.core.contract import ERROR, NG, OK
from edgead.core.overlay import heatmap_overlay
from edgead.runtime.postprocess_stage import Inspection
from edgead.runtime.preprocess import to_bgr8

COLORS = {OK: (0, 200, 0), NG: (0, 0, 255), ERROR: (0, 200, 255)}  # BGR
PLACEHOLDER_HW = (120, 160)  # the picture of an unreadable frame


def _heatmap(image_bgr: np.ndarray, frame_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    return heatmap_overlay(image_bgr, frame_map, vmin, vmax)  # the figures' own: station and report look alike


def annotate(image: np.ndarray, inspection: Inspection, fps: float, vmin: float, vmax: float) -> np.ndarray:
    """The operator's view: heat-map overlay, region boxes, verdict, score and FPS. A frame that
    could not be read (``image`` None) is shown as a gray placeholder with its ERROR verdict."""
    view = to_bgr8(image) if image is not None else np.full(PLACEHOLDER_HW + (3,), 64, np.uint8)
    if inspection.frame_map is not None:
        view = _heatmap(view, inspection.frame_map, vmin, vmax)
    else:
        view = view.copy()
    color = COLORS.get(inspection.verdict, (255, 255, 255))
    for r in inspection.regions:
        cv2.rectangle(view, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), color, 1)
    scale = max(0.35, view.shape[0] / 480.0)
    text = inspection.verdict
    if np.isfinite(inspection.score):
        text += f" {inspection.score_norm:.2f}"
    cv2.putText(view, text, (4, int(18 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, color, max(1, int(scale)))
    cv2.putText(view, f"{fps:.1f} fps", (4, view.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale,
                (255, 255, 255), 1)
    return view




def has_gui(build_info: str | None = None) -> bool:
    info = build_info if build_info is not None else cv2.getBuildInformation()
    for line in info.splitlines():
        if line.strip().startswith("GUI:"):
            return "NONE" not in line.split(":", 1)[1].upper()
    return False
