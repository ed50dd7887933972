"""Degenerate input: frames the model cannot judge are ERROR, and scores far outside what
validation saw are flagged, never passed silently.

Frame size (checked before preprocessing; the frame as delivered, after ``--input-width/height``):

- a frame whose shorter side is below :data:`MIN_SIDE` pixels is ERROR ("below the minimum size");
- a frame that the model input (S x S) would upscale by more than :data:`MAX_UPSCALE` along either
  axis (S / width or S / height above it) is ERROR ("upscaled too much"): stretched pixels hold no
  detail the model could inspect, and a tiny blurred frame scores like a clean part.

So a frame needs each side >= max(MIN_SIDE, S / MAX_UPSCALE): 64 px for a 256-px model, 32 px
for a 128-px one. An empty or non-image array is ERROR too.

Score range (checked after inference; the verdict is not changed): the calibration holds the
lowest and highest validation score (``score_min``, ``score_max``; span = max - min). A raw score
below ``score_min - BELOW_SPANS * span`` or above ``score_max + ABOVE_SPANS * span`` is flagged
``"out_of_range": "below"|"above"`` in its JSONL record, counted in the summary and reported as a
warning (terminal, log, summary): far below means the frame looks like no part the model was
calibrated on (a blank, a covered lens, another product) while the verdict may say OK; far above
is an NG that may be a camera fault rather than a defect. ``--out-of-range error`` makes such
frames ERROR instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SIDE = 8  # px: below this a frame has no structure to inspect
MAX_UPSCALE = 4.0  # model side / frame side, per axis
BELOW_SPANS = 1.0  # validation spans below score_min
ABOVE_SPANS = 10.0  # validation spans above score_max (defects are expected above; far above is suspect)
RANGE_POLICIES = ("flag", "error")


def frame_problem(image: Any, model_side: int, min_side: int = MIN_SIDE,
                  max_upscale: float = MAX_UPSCALE) -> str | None:
    """Why ``image`` cannot be inspected by a ``model_side``-px model, or None if it can."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.size == 0:
        shape = getattr(image, "shape", None)
        return f"not an image (shape {shape})"
    height, width = int(image.shape[0]), int(image.shape[1])
    need = max(min_side, int(np.ceil(model_side / max_upscale)))
    if min(height, width) < min_side:
        return (f"frame {width}x{height} is below the minimum size ({min_side} px per side)")
    if min(height, width) < need:
        factor = model_side / min(height, width)
        return (f"frame {width}x{height} would be upscaled {factor:.1f}x to the model's {model_side}x{model_side} "
                f"(limit {max_upscale:g}x: each side needs >= {need} px)")
    return None


@dataclass(frozen=True)
class ScoreRange:
    """The band of raw scores the validation images support (see the module docstring)."""

    low: float
    high: float
    score_min: float
    score_max: float

    @classmethod
    def from_calibration(cls, cal: Any, below_spans: float = BELOW_SPANS,
                         above_spans: float = ABOVE_SPANS) -> "ScoreRange":
        lo, hi = float(cal.score_min), float(cal.score_max)
        span = hi - lo
        if not (np.isfinite(span) and span > 0):  # a degenerate calibration: use the threshold's scale
            span = max(abs(float(cal.image_threshold)) * 0.01, 1e-12)
        return cls(low=lo - below_spans * span, high=hi + above_spans * span, score_min=lo, score_max=hi)

    def flag(self, score: float) -> str | None:
        """"below", "above" or None for a raw score (NaN/Inf are ERROR elsewhere)."""
        if not np.isfinite(score):
            return None
        if score < self.low:
            return "below"
        if score > self.high:
            return "above"
        return None

    def describe(self, direction: str) -> str:
        where = f"below {self.low:.6g}" if direction == "below" else f"above {self.high:.6g}"
        return (f"scores far {direction} the validation range [{self.score_min:.6g}, {self.score_max:.6g}] "
                f"({where}): check the camera, the lighting and the product")
