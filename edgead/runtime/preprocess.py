"""Stage 2: a raw frame -> the model input, written into the engine slot's host buffer.

The conversion is :func:`edgead.data.images.to_model_input`, the very one training and
evaluation use, so frames of any size, gray, BGRA or 16-bit are converted the same way here.
For 8-bit grey and BGR frames the native core (:mod:`edgead.runtime.native`), when built, does the
same conversion in one pass and bit-exactly; it is used only where a start-up check on this
machine's OpenCV confirms that.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edgead.data.images import to_model_input
from edgead.runtime import native as native_core


@dataclass(frozen=True)
class Preprocessor:
    """Fills a preallocated ``(C, S, S)`` float32 buffer (pinned memory on CUDA engines).

    ``use_native=False`` keeps every frame on the NumPy/OpenCV path; otherwise uint8 grey/BGR
    frames go through the native core where it is built and verified (``native`` says so).
    """

    size: int
    channels: int
    use_native: bool = True

    def __post_init__(self) -> None:
        kinds = native_core.preprocess_ok(self.size, self.channels) if self.use_native else frozenset()
        object.__setattr__(self, "_native_kinds", kinds)

    @property
    def native(self) -> bool:
        return bool(self._native_kinds)

    @classmethod
    def for_input_shape(cls, shape: tuple[int, ...], use_native: bool = True) -> "Preprocessor":
        _, channels, height, width = shape
        if height != width:
            raise ValueError(f"engine input must be square, got {height}x{width}")
        return cls(size=int(height), channels=int(channels), use_native=use_native)

    def into(self, frame: np.ndarray, out: np.ndarray) -> np.ndarray:
        # Frames are BGR(A) as OpenCV delivers them; the model takes RGB in [0, 1].
        if out.dtype == np.float32:
            if self._native_kinds and native_core.frame_kind(frame) in self._native_kinds and self._fits(out):
                native_core.module().preprocess_into(frame, out)
                return out
            return to_model_input(frame, self.size, self.channels, bgr=True, out=out)
        out[...] = to_model_input(frame, self.size, self.channels, bgr=True)  # e.g. an FP16-input engine
        return out

    def _fits(self, out: np.ndarray) -> bool:
        return out.shape == (self.channels, self.size, self.size) and out.flags.c_contiguous and out.flags.writeable


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
