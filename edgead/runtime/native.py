"""The optional native per-frame core (``cpp_bindings/``, module ``edgead_native``).

Stages 2 and 4 use it when it imports and agrees with this machine's OpenCV, and otherwise run the
NumPy/OpenCV path, which stays the reference: the native functions are its twins, never a third
variant. ``EDGEAD_NATIVE=0`` forces the reference path (the tests use it).

What "agrees" means, checked once per process on small synthetic inputs (:func:`preprocess_ok`):

* preprocessing: bit-exact tensors for every resize kernel the rule can pick (the native core
  reproduces OpenCV 5.0's arithmetic; a different OpenCV build may round differently, and then
  this machine keeps the reference path);
* post-processing: the smoothed map within :data:`MAP_RTOL` of ``cv2.GaussianBlur`` (bit-exact
  on pip's OpenCV 5.0 with AVX2, measured) and the same regions.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

ENV = "EDGEAD_NATIVE"
# Maps may differ from the reference by this much relative to the map's range (a few float32
# ulps of reordered arithmetic on another OpenCV build); regions and verdicts must not differ.
MAP_RTOL = 1e-5


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Any | None, str]:
    if os.environ.get(ENV, "").strip() == "0":
        return None, f"{ENV}=0"
    try:
        import edgead_native
    except ImportError as err:
        return None, f"edgead_native not built ({err}); pip install ./cpp_bindings"
    return edgead_native, f"edgead_native {edgead_native.__version__}"


def module() -> Any | None:
    """The native module, or None when it is missing or disabled."""
    return _load()[0]


def reason() -> str:
    return _load()[1]


def _probe_frames(size: int) -> list[np.ndarray]:
    """Colour frames that make the resize rule pick each of its kernels, plus a strided view."""
    rng = np.random.default_rng(16)
    s = size
    shapes = [(s, s), (2 * s, 2 * s), (3 * s, 2 * s), (2 * s + 3, 3 * s + 1), (s // 2 + 1, s // 3 + 2),
              (s + 5, max(2, s // 2 + 1)), (max(2, s // 2), s + 7)]
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    big = rng.integers(0, 256, (2 * s + 2, 3 * s + 4, 3), dtype=np.uint8)
    frames.append(big[1::2, ::-3][: s + 3])  # non-contiguous, negative column stride
    return frames


@functools.lru_cache(maxsize=None)
def preprocess_ok(size: int, channels: int) -> frozenset[str]:
    """The frame kinds ("grey", "colour") whose native preprocessing is bit-exact here."""
    native = module()
    if native is None:
        return frozenset()
    from edgead.data.images import to_model_input

    ok = set()
    frames = _probe_frames(size)
    for kind, views in (("colour", frames), ("grey", [f[..., 1] for f in frames])):
        out = np.empty((channels, size, size), np.float32)
        try:
            if all(_same(native, to_model_input(f, size, channels, bgr=True), f, out) for f in views):
                ok.add(kind)
        except (ValueError, TypeError, RuntimeError):
            pass
    return frozenset(ok)


def _same(native: Any, reference: np.ndarray, frame: np.ndarray, out: np.ndarray) -> bool:
    native.preprocess_into(frame, out)
    return bool(np.array_equal(reference, out))


def frame_kind(frame: np.ndarray) -> str | None:
    """"grey" or "colour" for the uint8 frames the native core takes, else None."""
    if frame.dtype != np.uint8 or frame.size == 0:
        return None
    if frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 1):
        return "grey"
    if frame.ndim == 3 and frame.shape[2] == 3:
        return "colour"
    return None


@functools.lru_cache(maxsize=None)
def postprocess_ok(sigma: float) -> bool:
    """Does the native post-processing agree with the reference here (maps and regions)?"""
    native = module()
    if native is None:
        return False
    from edgead.core.postprocess import gaussian_kernel, regions, smooth, to_frame

    rng = np.random.default_rng(16)
    amap = rng.random((64, 64), dtype=np.float32)
    amap[20:30, 5:17] += 2.0
    reference = smooth(amap, sigma)
    kernel = gaussian_kernel(sigma)
    smoothed, found = native.postprocess(amap, kernel, 97, 131, 1.0, 2)
    span = float(reference.max() - reference.min()) or 1.0
    if not np.allclose(smoothed, reference, rtol=0.0, atol=MAP_RTOL * span):
        return False
    expected = [(r.x, r.y, r.w, r.h, r.area) for r in regions(to_frame(smoothed, 131, 97), 1.0, min_area=2)]
    return [tuple(r[:5]) for r in found] == expected


def status(pre: Any, post: Any) -> dict[str, Any]:
    """What summary.json records: which stages run natively, and why not where they don't."""
    return {"preprocess": bool(getattr(pre, "native", False)), "postprocess": bool(getattr(post, "native", False)),
            "module": reason()}


def describe(pre: Any, post: Any) -> str:
    """The start-up line's words for it."""
    s = status(pre, post)
    stages = [name for name in ("preprocess", "postprocess") if s[name]]
    if stages:
        return f"native core: {' + '.join(stages)} ({s['module']})"
    return f"native core: off, NumPy/OpenCV path ({s['module']})"
