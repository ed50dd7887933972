"""Proxy anomalies for model selection: made from normal validation images, never from the test split.

* ``cutpaste``: a rectangle of the image copied elsewhere in it (Li et al. 2021), the default.
* ``cutpaste+lines``: the mean of that AUROC and the AUROC against one thin-line copy of each
  image (1-2 px at 128², 1/8-1/2 of the side long, 10-64 grey levels brighter or darker). CutPaste
  saturates early for some detectors (Reverse Distillation on washer: 1.0 from epoch 4 on), so it
  stops ranking epochs; thin lines stay hard, like the scratches real lines produce.

Both are unlike the painted defects of the synthetic test split's generator.
"""

from __future__ import annotations

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

PROXIES = ("cutpaste", "cutpaste+lines")


def cutpaste(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Copy a random rectangle of each image to another place in it (the proxy anomaly)."""
    rng = np.random.default_rng(seed)
    out = images.copy()
    _, _, h, w = images.shape
    for img in out:
        ph, pw = rng.integers(max(2, h // 8), max(3, h // 4)), rng.integers(max(2, w // 8), max(3, w // 4))
        sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
        dy, dx = rng.integers(0, h - ph), rng.integers(0, w - pw)
        patch = img[:, sy:sy + ph, sx:sx + pw].copy()
        img[:, dy:dy + ph, dx:dx + pw] = np.clip(patch * rng.uniform(0.8, 1.2), 0, 1)
    return out


def lines_with_masks(images: np.ndarray, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A thin straight line (1-2 px at 128², 1/8-1/2 of the side long) brightened or darkened by 10-64 levels."""
    rng = np.random.default_rng(seed)
    out, masks = images.copy(), np.zeros((len(images),) + images.shape[2:], np.uint8)
    _, _, h, w = images.shape
    for img, mask in zip(out, masks):
        half = rng.uniform(h / 16, h / 4)
        angle = rng.uniform(0, np.pi)
        centre = np.array([rng.uniform(half, w - half), rng.uniform(half, h - half)])
        step = half * np.array([np.cos(angle), np.sin(angle)])
        ends = [tuple(int(v) for v in np.round(centre + sign * step)) for sign in (-1, 1)]
        cv2.line(mask, ends[0], ends[1], 1, int(rng.integers(max(1, h // 128), max(2, h // 64) + 1)))
        line = mask.astype(bool)
        img[:, line] = np.clip(img[:, line] + rng.choice([-1.0, 1.0]) * rng.uniform(10, 64) / 255, 0, 1)
    return out, masks


def proxy_images(val_images: np.ndarray, kind: str, seed: int = 0) -> list[np.ndarray]:
    """The anomalous sets whose AUROCs against ``val_images`` are averaged for ``kind``."""
    if kind not in PROXIES:
        raise ValueError(f"unknown selection proxy {kind!r}; choose one of {', '.join(PROXIES)}")
    sets = [cutpaste(val_images, seed)]
    if kind == "cutpaste+lines":
        sets.append(lines_with_masks(val_images, seed + 2)[0])
    return sets


def mean_auroc(normal: np.ndarray, anomalous: list[np.ndarray]) -> float:
    """Mean over the proxy sets of the image AUROC of their scores against the normal scores; NaN
    when any score is not finite (an epoch that diverged is never selected)."""
    if not (np.isfinite(normal).all() and all(np.isfinite(a).all() for a in anomalous)):
        return float("nan")
    return float(np.mean([roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(a))], np.r_[normal, a])
                          for a in anomalous]))
