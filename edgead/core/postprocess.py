"""Map post-processing shared by evaluation and the runtime (numpy + OpenCV, no torch).

Evaluation scores the very maps the line sees: the same smoothing and the same regions.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

DEFAULT_SIGMA = 4.0  # Gaussian smoothing of the map, in pixels at the model's resolution (anomalib: 4)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel cv2.GaussianBlur applies to a float map at this sigma (ksize (0, 0))."""
    size = int(np.rint(sigma * 4 * 2 + 1)) | 1
    return cv2.getGaussianKernel(size, sigma, cv2.CV_32F).ravel()


def smooth(anomaly_map: np.ndarray, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Gaussian-smooth one (H, W) map or a batch (N, H, W); sigma 0 leaves it as is."""
    m = np.asarray(anomaly_map, dtype=np.float32)
    if sigma <= 0:
        return m
    if m.ndim == 3:
        return np.stack([smooth(x, sigma) for x in m])
    return cv2.GaussianBlur(m, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def to_frame(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize an (H, W) map to the frame's resolution."""
    return cv2.resize(np.asarray(anomaly_map, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Region:
    x: int
    y: int
    w: int
    h: int
    area: int
    peak: float
    mean: float = float("nan")

    def to_dict(self) -> dict[str, float | int]:
        return {"bbox": [self.x, self.y, self.w, self.h], "area": self.area, "peak": round(self.peak, 6),
                "mean": round(self.mean, 6)}


def regions(anomaly_map: np.ndarray, threshold: float, min_area: int = 4) -> list[Region]:
    """Connected defect regions (8-connected) of ``map > threshold``, largest first."""
    binary = (anomaly_map > threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    found = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        if area < min_area:
            continue
        values = anomaly_map[labels == i]
        found.append(Region(x, y, w, h, area, float(values.max()), float(values.mean(dtype=np.float64))))
    return sorted(found, key=lambda r: r.area, reverse=True)
