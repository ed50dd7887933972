"""Stage 4: raw engine outputs -> what the line needs (score, verdict, regions, frame-sized map).

Uses :mod:`edgead.core.postprocess` and :class:`edgead.core.calibration.Calibration`, exactly as
evaluation does, so the station's verdicts are the ones the validation report promised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgead.core.calibration import Calibration
from edgead.core.contract import ERROR
from edgead.core.postprocess import Region, regions, smooth, to_frame

MIN_REGION_AREA = 4  # px at the model's resolution; scaled to the frame's


@dataclass
class Inspection:
    """The result for one frame. ``verdict`` is OK, NG or ERROR (then ``error`` says why)."""

    verdict: str
    score: float = float("nan")  # raw, as calibrated
    score_norm: float = float("nan")  # [0, 1], 0.5 = threshold
    regions: list[Region] = field(default_factory=list)
    frame_map: np.ndarray | None = None  # smoothed map at frame resolution (raw units)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"verdict": self.verdict}
        if np.isfinite(self.score):
            out.update(score=float(self.score), score_norm=round(float(self.score_norm), 4))
        else:
            out.update(score=None, score_norm=None)
        out["regions"] = [r.to_dict() for r in self.regions]
        if self.error:
            out["error"] = self.error
        return out


def error_inspection(message: str) -> Inspection:
    return Inspection(verdict=ERROR, error=message)


class Postprocessor:
    def __init__(self, calibration: Calibration, min_area: int = MIN_REGION_AREA) -> None:
        self.calibration = calibration
        self.sigma = calibration.sigma  # the smoothing the thresholds were calibrated with
        self.min_area = min_area

    def __call__(self, score: float, anomaly_map: np.ndarray, frame_hw: tuple[int, int]) -> Inspection:
        cal = self.calibration
        verdict = cal.verdict(score)
        if verdict == ERROR:
            return error_inspection(f"score is not finite ({score})")
        smoothed = smooth(anomaly_map, self.sigma)
        height, width = frame_hw
        frame_map = to_frame(smoothed, width, height)
        # The same physical minimum size at any frame resolution.
        scale = (height * width) / float(anomaly_map.shape[0] * anomaly_map.shape[1])
        found = regions(frame_map, cal.pixel_threshold, min_area=max(1, int(round(self.min_area * scale))))
        return Inspection(verdict=verdict, score=score, score_norm=float(cal.normalize(score)),
                          regions=found, frame_map=frame_map)

    def localized(self, inspection: Inspection, mask: np.ndarray) -> bool:
        """Does the defect outline overlap the ground-truth mask (for the synthetic summary)?"""
        if inspection.frame_map is None or mask.shape != inspection.frame_map.shape:
            return False
        return bool(((inspection.frame_map > self.calibration.pixel_threshold) & (mask > 0)).any())
