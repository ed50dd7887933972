"""Image reading and the one image -> model-input conversion (numpy + OpenCV only, no torch).

Training, evaluation and the station runtime all go through :func:`to_model_input`, so a
model sees exactly the same pixels on the line as it saw in training.

Conversion rules (recorded in the bundle manifest as :data:`RESIZE_RULE`):

* Output is float32 ``(channels, size, size)`` in ``[0, 1]``; RGB order when ``channels == 3``.
* 8-bit is divided by 255, 16-bit by 65535; float input is taken to be in ``[0, 1]`` already
  (and clipped to it).
* Alpha (BGRA / gray+alpha) is removed by compositing over black: fully transparent pixels
  become 0, opaque pixels are unchanged.
* Gray -> 3 channels by replication; 3 channels -> gray with ``cv2.COLOR_BGR2GRAY``.
* Resize rule "area down / linear up, no aspect-ratio crop": the image is stretched to
  ``size x size`` with ``cv2.INTER_AREA`` when either side shrinks, ``cv2.INTER_LINEAR`` when
  it only grows, and not resampled at all when it is already ``size x size``.
* Files are decoded as stored (``cv2.IMREAD_UNCHANGED``): EXIF orientation is not applied.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "RESIZE_RULE",
    "ImageError",
    "load_image",
    "load_mask",
    "read_image",
    "to_model_input",
]

RESIZE_RULE = "area-down-linear-up"


class ImageError(ValueError):
    """Bad image input; the message always names the file."""


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file as stored: HxW or HxWxC (BGR/BGRA), uint8 or uint16.

    Reads the bytes with numpy and decodes them in memory so that non-ASCII paths work
    (``cv2.imread`` cannot open them on every platform).
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file")
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as err:
        raise ImageError(f"{p}: cannot read ({err.strerror or err})") from err
    if data.size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    try:
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # some codecs raise instead of returning None
        raise ImageError(f"{p}: cannot decode image ({err})") from err
    if image is None or image.size == 0:
        raise ImageError(f"{p}: cannot decode image (corrupt, truncated or unsupported format)")
    return image


def _divisor(dtype: np.dtype) -> float:
    """Value that maps the dtype's full-scale white to 1.0."""
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if dtype.kind == "f":
        return 1.0
    raise ValueError(f"unsupported image dtype {dtype} (expected uint8, uint16 or float in [0, 1])")


def _composite_over_black(image: np.ndarray, full_scale: float) -> np.ndarray:
    """Drop the last (alpha) channel, blending colour over black where it is not opaque."""
    colour, alpha = image[..., :-1], image[..., -1]
    if alpha.min() >= full_scale:  # opaque: keep the native dtype (cheaper resize, exact values)
        out = np.ascontiguousarray(colour)
    else:
        weight = alpha.astype(np.float32) / np.float32(full_scale)
        out = colour.astype(np.float32) * weight[..., None]
    return out[..., 0] if out.shape[-1] == 1 else out


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    # INTER_AREA averages source pixels (no aliasing when shrinking); OpenCV itself falls back
    # to a linear-style kernel along an axis that grows.
    interp = cv2.INTER_AREA if (size < h or size < w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def _check_out(out: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        got = f"{type(out).__name__} {getattr(out, 'dtype', '?')} {getattr(out, 'shape', '?')}"
        raise ValueError(f"out must be a float32 array of shape {shape}, got {got}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out


def to_model_input(
    image: np.ndarray,
    size: int,
    channels: int,
    *,
    bgr: bool = True,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Convert a decoded image to float32 ``(channels, size, size)`` in ``[0, 1]``.

    ``image`` is HxW, HxWx1, HxWx2 (gray+alpha), HxWx3 or HxWx4, uint8, uint16 or float in
    ``[0, 1]``. Colour images are taken to be BGR/BGRA as OpenCV stores them unless
    ``bgr=False`` (then RGB/RGBA). See the module docstring for the exact rules.

    If ``out`` is given (a preallocated float32 array of the right shape, e.g. pinned memory)
    the result is written into it and ``out`` is returned; nothing of that size is allocated.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    if img.ndim == 3 and img.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected 1-4 channels, got {img.shape[2]}")
    divisor = _divisor(img.dtype)
    is_float = img.dtype.kind == "f"
    if is_float and img.dtype != np.float32:  # cv2.resize rejects float16; one dtype path
        img = img.astype(np.float32)

    if img.ndim == 3 and img.shape[2] in (2, 4):
        img = _composite_over_black(img, divisor)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    # Reduce to gray before resizing: one plane is cheaper to resample than three.
    if channels == 1 and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY)
    img = _resize(img, size)

    shape = (channels, size, size)
    dest = np.empty(shape, np.float32) if out is None else _check_out(out, shape)
    div = np.float32(divisor)  # float32 scalar keeps the arithmetic in float32
    if img.ndim == 2:
        np.divide(img, div, out=dest[0], casting="unsafe")
        for c in range(1, channels):
            dest[c] = dest[0]
    else:
        order = (2, 1, 0) if bgr else (0, 1, 2)  # output is always RGB
        for c, src in enumerate(order):
            np.divide(img[..., src], div, out=dest[c], casting="unsafe")
    if is_float:  # integer input is in range by construction
        np.clip(dest, 0.0, 1.0, out=dest)
    return dest


def load_image(path: str | os.PathLike, size: int, channels: int) -> np.ndarray:
    """Read ``path`` and convert it with :func:`to_model_input`; errors name the file."""
    image = read_image(path)
    try:
        return to_model_input(image, size, channels)
    except ValueError as err:
        raise ImageError(f"{Path(path)}: {err}") from err


def load_mask(
    path: str | os.PathLike,
    size: int,
    expect_hw: tuple[int, int] | None = None,
    *,
    image_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Read a ground-truth mask as float32 ``(size, size)`` in ``{0, 1}`` (any value > 0 is defect).

    Resized with nearest neighbour so it stays binary. If ``expect_hw`` (the HxW of the mask's
    image, named by ``image_path`` in the error when given) differs from the mask's own HxW,
    raises :class:`ImageError`: a mask that does not match its image pixel for pixel is a
    dataset error, not something to resample away.
    """
    p = Path(path)
    mask = read_image(p)
    hw = tuple(mask.shape[:2])
    if expect_hw is not None and hw != tuple(expect_hw):
        of = f" of image {Path(image_path)}" if image_path is not None else ""
        raise ImageError(
            f"mask {p} is {hw[0]}x{hw[1]} (HxW) but its image{of} is "
            f"{expect_hw[0]}x{expect_hw[1]}"
        )
    if mask.ndim == 3 and mask.shape[2] in (2, 4):
        mask = mask[..., :-1]  # an opaque alpha channel would mark every pixel as defect
    # Colour masks: a pixel is defect if any colour channel is set.
    binary = (mask > 0) if mask.ndim == 2 else (mask > 0).any(axis=2)
    binary = binary.astype(np.uint8)
    if hw != (size, size):
        binary = cv2.resize(binary, (size, size), interpolation=cv2.INTER_NEAREST)
    return binary.astype(np.float32)
