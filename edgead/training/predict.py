"""Batched scoring of numpy image arrays with a detector (used by training, evaluation and parity)."""

from __future__ import annotations

import numpy as np
import torch

from edgead.models.base import Detector
from edgead.core.postprocess import DEFAULT_SIGMA, smooth


def detector_outputs(detector: Detector, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, map) of a batch: the forward graph, which is what every bundle exports; a torch-only
    detector (``exportable = False``: AnoGAN) runs its own search instead."""
    if not detector.exportable:
        return detector.search_score(batch)  # type: ignore[attr-defined]
    with torch.no_grad():
        return detector(batch)


def predict(detector: Detector, images: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores (N,) and raw maps (N, H, W) for float32 images (N, C, H, W) in [0, 1]."""
    detector.eval()
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(detector.device)
        score, anomaly_map = detector_outputs(detector, batch)
        scores.append(score.detach().float().cpu().numpy())
        maps.append(anomaly_map.detach().float().cpu().numpy()[:, 0])
    return np.concatenate(scores), np.concatenate(maps)


def predict_smoothed(detector: Detector, images: np.ndarray, sigma: float = DEFAULT_SIGMA,
                     batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`predict`, with the maps smoothed exactly as the runtime smooths them."""
    scores, maps = predict(detector, images, batch_size)
    return scores, smooth(maps, sigma)
