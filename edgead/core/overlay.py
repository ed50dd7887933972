"""The heat-map overlay, the same in the lab's figures and on the station's screen (numpy + OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np


def heatmap_overlay(
    image_bgr_uint8: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a JET-coloured anomaly map over a BGR uint8 image; returns a new (H, W, 3) uint8 image.

    The map is resized to the image and scaled by fixed ``vmin``/``vmax`` (not per image), so
    colours mean the same score on every frame. A grey image is converted to BGR first.
    """
    img = np.asarray(image_bgr_uint8)
    if img.ndim == 2 or img.shape[-1] == 1:
        img = cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    img = img.astype(np.uint8, copy=False)
    h, w = img.shape[:2]
    m = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float32), nan=float(vmin))
    if m.shape != (h, w):
        m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
    span = max(float(vmax) - float(vmin), 1e-12)
    scaled = np.clip((m - float(vmin)) / span, 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(img, 1.0 - alpha, heat, alpha, 0.0)
