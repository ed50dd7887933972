"""Stage 2: a raw frame -> the model input, written into the engine slot's host buffer.

The conversion is :func:`edgead.data.images.to_model_input`, the very one training and
evaluation use, so frames of any size, gray, BGRA or 16-bit are converted the same way here.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgead.data.images import to_model_input


@dataclass(frozen=True)
class Preprocessor:
    """Fills a preallocated ``(C, S, S)`` float32 buffer (pinned memory on CUDA engines)."""

    size: int
    channels: int

    @classmethod
    def for_input_shape(cls, shape: tuple[int, ...]) -> "Preprocessor":
        _, channels, height, width = shape
        if height != width:
            raise ValueError(f"engine input must be square, got {height}x{width}")
        return cls(size=int(height), channels=int(channels))

    def into(self, frame: np.ndarray, out: np.ndarray) -> np.ndarray:
        # Frames are BGR(A) as OpenCV delivers them; the model takes RGB in [0, 1].
        if out.dtype == np.float32:
            return to_model_input(frame, self.size, self.channels, bgr=True, out=out)
        out[...] = to_model_input(frame, self.size, self.channels, bgr=True)  # e.g. an FP16-input engine
        return out


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """A displayable 8-bit BGR copy of any frame (gray, BGRA, 16-bit, float) for overlays and
    saved NG frames."""
    img = np.asarray(image)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype.kind == "f":
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[..., 0]), cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    return img
