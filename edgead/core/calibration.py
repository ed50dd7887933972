"""Score normalisation and thresholds, from normal validation images held out of training.

Nothing here ever sees a test image: a threshold fitted on the test set would look better in the
lab than it works on the line. Stored with the run and copied into every bundle. No torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgead.core.contract import ERROR, NG, OK
from edgead.core.postprocess import DEFAULT_SIGMA


@dataclass(frozen=True)
class Calibration:
    """Thresholds on the raw score and the raw (smoothed) map.

    ``image_threshold`` is the ``quantile`` of validation scores: about 1 - quantile of normal parts
    are expected to be rejected. ``pixel_threshold`` is the ``pixel_quantile`` of validation map
    values; it outlines defect regions. ``normalize`` maps a raw score to [0, 1] with the
    threshold at 0.5 (anomalib's convention), scaled by the validation score range.
    """

    image_threshold: float
    score_min: float
    score_max: float
    pixel_threshold: float
    map_min: float
    map_max: float
    n_images: int
    quantile: float
    pixel_quantile: float
    sigma: float = DEFAULT_SIGMA  # Gaussian smoothing of the map before the pixel threshold
    source: str = "validation split: normal images held out of training"

    def normalize(self, raw: float | np.ndarray) -> float | np.ndarray:
        span = max(self.score_max - self.score_min, 1e-12)
        return np.clip((np.asarray(raw, dtype=np.float64) - self.image_threshold) / span + 0.5, 0.0, 1.0)

    def normalize_map(self, smoothed: np.ndarray) -> np.ndarray:
        """A smoothed map in [0, 1] on the calibration's map range (the heat map's scale)."""
        span = max(self.map_max - self.map_min, 1e-12)
        return np.clip((np.asarray(smoothed, dtype=np.float64) - self.map_min) / span, 0.0, 1.0)

    def verdict(self, raw: float) -> str:
        """OK / NG for a raw score; NaN or Inf is an ERROR, never an OK.

        NG means strictly above the threshold: a score exactly at ``image_threshold`` is OK. The
        threshold is the ``quantile`` of the validation scores, so the normal part that defines it
        passes, and about 1 - quantile of normal parts (those above it) are rejected.
        """
        if not np.isfinite(raw):
            return ERROR
        return NG if raw > self.image_threshold else OK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def problem(self) -> str | None:
        """Why these values cannot have come from :func:`calibrate` (None when they can).

        Thresholds are quantiles of the validation values, so they are finite and lie inside the
        validation range: a NaN threshold would pass every part, one above every validation
        score (a hand-edited 99) would pass almost every part. Both are refused, whatever the
        checksums say.
        """
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float))
               or not np.isfinite(v)]
        if bad:
            return f"calibration values {bad} are not finite numbers"
        if not self.score_min <= self.image_threshold <= self.score_max:
            return (f"image_threshold {self.image_threshold!r} lies outside the validation scores "
                    f"[{self.score_min!r}, {self.score_max!r}] it is a quantile of")
        if not self.map_min <= self.pixel_threshold <= self.map_max:
            return f"pixel_threshold {self.pixel_threshold!r} / map range [{self.map_min!r}, {self.map_max!r}] disagree"
        if not (0 < self.quantile < 1 and 0 < self.pixel_quantile < 1 and self.sigma >= 0 and self.n_images >= 2):
            return "quantiles must lie in (0, 1), sigma >= 0 and n_images >= 2"
        return None

    @classmethod
    def from_dict(cls, values: dict[str, Any], strict: bool = False) -> "Calibration":
        """``strict`` (bundles): an unknown or missing key, the sigma included, is a TypeError."""
        if strict:
            names = {f.name for f in dataclasses.fields(cls)}
            missing, unknown = sorted(names - {"source"} - set(values)), sorted(set(values) - names)
            if missing or unknown:
                raise TypeError(f"missing {missing}, unknown {unknown}")
        return cls(**values)


def calibrate(val_scores: np.ndarray, val_maps: np.ndarray, quantile: float = 0.99,
              pixel_quantile: float = 0.999, sigma: float = DEFAULT_SIGMA) -> Calibration:
    """Fit thresholds on validation scores (N,) and validation maps (N, H, W) already smoothed
    with ``sigma`` (recorded, so the runtime smooths exactly as calibration did)."""
    scores = np.asarray(val_scores, dtype=np.float64)
    maps = np.asarray(val_maps, dtype=np.float64)
    if scores.size < 2:
        raise ValueError("calibration needs at least 2 validation images")
    if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
        raise ValueError("validation scores or maps contain NaN/Inf: the model diverged")
    return Calibration(
        image_threshold=float(np.quantile(scores, quantile)),
        score_min=float(scores.min()),
        score_max=float(scores.max()),
        pixel_threshold=float(np.quantile(maps, pixel_quantile)),
        map_min=float(maps.min()),
        map_max=float(np.quantile(maps, 0.9999)),
        n_images=int(scores.size),
        quantile=quantile,
        pixel_quantile=pixel_quantile,
        sigma=float(sigma),
    )
