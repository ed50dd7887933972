"""Post-processing as a graph: the runtime's smoothing and normalisation, run by the engine.

``edgead export --postprocess`` appends this component to the fused detector graph
(``detector_post``), so a GPU station smooths and normalises on the device instead of on its
slow ARM cores. It is the torch twin of the host path, not a third copy: the Gaussian taps come
from :func:`edgead.core.postprocess.gaussian_kernel` (what ``cv2.GaussianBlur`` applies), the
border is OpenCV's BORDER_REFLECT (``abc|cba``: a static index, since ONNX's and torch's
"reflect" is REFLECT_101), and the normalisations are :meth:`Calibration.normalize` and
:meth:`Calibration.normalize_map`. Certification checks every output against that host path on
the engine's own raw map (:func:`edgead.certify.parity.postprocess_check`). All of it is an FP32
island: FP16 smoothing drifts by 5e-4..1e-3 of the map range, enough to move region edges.

    (score (B,), anomaly_map (B, 1, H, W)) -> (smoothed_map (B, 1, H, W), score_norm (B,), map_norm (B, 1, H, W))

The image score itself is the detector's own (top-k of the map, a latent distance...), computed
once in its head; it is not recomputed here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from edgead.core.calibration import Calibration
from edgead.core.contract import ANOMALY_MAP, POSTPROCESS_OUTPUTS, SCORE
from edgead.core.postprocess import gaussian_kernel
from edgead.models.base import Component

POSTPROCESS = "postprocess"  # the component's name


def reflect_index(size: int, pad: int) -> np.ndarray:
    """Source indices of a BORDER_REFLECT-padded axis (cv2.borderInterpolate, repeated as needed)."""
    return np.pad(np.arange(size), pad, mode="symmetric")


class GaussianSmoothing(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps with BORDER_REFLECT, as cv2.GaussianBlur."""

    def __init__(self, sigma: float, height: int, width: int) -> None:
        super().__init__()
        taps = torch.from_numpy(gaussian_kernel(sigma).astype(np.float32))
        self.pad = (len(taps) - 1) // 2
        self.register_buffer("kernel_h", taps.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", taps.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("rows", torch.from_numpy(reflect_index(height, self.pad)), persistent=False)
        self.register_buffer("cols", torch.from_numpy(reflect_index(width, self.pad)), persistent=False)

    def forward(self, anomaly_map: Tensor) -> Tensor:
        x = anomaly_map.index_select(3, self.cols)
        x = nn.functional.conv2d(x, self.kernel_h)
        x = x.index_select(2, self.rows)
        return nn.functional.conv2d(x, self.kernel_v)


class Normalisation(nn.Module):
    """Calibration.normalize (score) and Calibration.normalize_map (smoothed map), in the graph."""

    def __init__(self, calibration: Calibration) -> None:
        super().__init__()
        self.threshold = float(calibration.image_threshold)
        self.score_span = max(calibration.score_max - calibration.score_min, 1e-12)
        self.map_min = float(calibration.map_min)
        self.map_span = max(calibration.map_max - calibration.map_min, 1e-12)

    def forward(self, score: Tensor, smoothed: Tensor) -> tuple[Tensor, Tensor]:
        score_norm = ((score - self.threshold) / self.score_span + 0.5).clamp(0.0, 1.0)
        return score_norm, ((smoothed - self.map_min) / self.map_span).clamp(0.0, 1.0)


class PostprocessGraph(nn.Module):
    """(score, raw map) -> (smoothed map, normalised score, normalised map), all FP32."""

    def __init__(self, calibration: Calibration, height: int, width: int) -> None:
        super().__init__()
        self.sigma = float(calibration.sigma)
        self.fp32_smooth = GaussianSmoothing(self.sigma, height, width) if self.sigma > 0 else nn.Identity()
        self.fp32_normalise = Normalisation(calibration)

    def forward(self, score: Tensor, anomaly_map: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        smoothed = self.fp32_smooth(anomaly_map.float())
        score_norm, map_norm = self.fp32_normalise(score.float(), smoothed)
        return smoothed, score_norm, map_norm

    def component(self) -> Component:
        return Component(POSTPROCESS, self, (SCORE, ANOMALY_MAP), POSTPROCESS_OUTPUTS)
