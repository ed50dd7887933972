"""Synthetic anomalies for training against (DRAEM, Zavrtanik et al., ICCV 2021, §3.3).

A Perlin-noise field (scales 2^u × 2^v, u, v ∈ {0..6}), rotated by an angle in [-90°, 90°] and
thresholded at 0.5, is the mask M. A foreign texture A, colour-augmented by three operations drawn
from {posterise, sharpen, solarise, equalise, brightness, hue shift, auto-contrast} (the paper's
imgaug set), is blended into the normal image I inside M only::

    I_a = I + β·M·(A − I),   β ∈ [0.1, 1] (the texture's opacity)

so every pixel outside M is exactly I. ``shapes=("perlin", "stroke")`` also draws thin curved
strokes (:func:`stroke_mask`, CutPaste-scar's thin shapes filled with foreign texture) for the
distilled PatchCore's pool; DRAEM uses Perlin masks alone, as the paper. With probability
``1 − anomaly_prob`` the image is returned unchanged with an empty mask (the reference code trains
on half clean images).

Texture sources. The DTD set the paper uses is not available here, so A comes from:

* the project's procedural renderers (``synth_render``: cloth, brushed metal, wood grain, washer,
  PCB), rendered once into a pool and then taken at random scales (crops of 1/2× to 2× the image
  side), 90° rotations, flips and colours;
* the training images themselves, with the same scale and colour changes (the reference's
  "foreign" texture is then the part's own, displaced and recoloured);
* or, with ``source_dir`` (``edgead train --anomaly-source DIR``), a folder of any images, which
  then replaces the procedural pool.

The test split's defect painters (``synth_defects``) are never used: training against the very
defects the test split holds would measure the generator, not the detector.

numpy + OpenCV only; all randomness comes from one ``np.random.Generator`` seeded at construction,
so a seed gives the same sequence of (image, mask, has_anomaly).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from edgead.data.synth_render import RENDERERS

PERLIN_MAX_LOG2 = 6  # scales 2^0 .. 2^6, as the reference
PERLIN_THRESHOLD = 0.5
OPACITY = (0.1, 1.0)  # β, the paper's range


# ------------------------------------------------------------------------------------- Perlin
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(rng: np.random.Generator, shape: tuple[int, int], res: tuple[int, int]) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1], ``res`` lattice cells along (y, x); vectorised."""
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0.0, 2.0 * math.pi, (ry + 1, rx + 1))
    grad_y, grad_x = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) * (ry / h)
    x = (np.arange(w) + 0.5) * (rx / w)
    iy, ix = np.minimum(y.astype(np.int64), ry - 1)[:, None], np.minimum(x.astype(np.int64), rx - 1)[None, :]
    fy, fx = (y[:, None] - iy), (x[None, :] - ix)

    def corner(dy: int, dx: int) -> np.ndarray:  # gradient · offset from that lattice corner
        return grad_y[iy + dy, ix + dx] * (fy - dy) + grad_x[iy + dy, ix + dx] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = corner(0, 0) + tx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + tx * (corner(1, 1) - corner(1, 0))
    return (math.sqrt(2.0) * (top + ty * (bottom - top))).astype(np.float32)


def perlin_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A binary (0/1 float32) HxW mask: rotated Perlin noise above :data:`PERLIN_THRESHOLD`."""
    u, v = rng.integers(0, PERLIN_MAX_LOG2 + 1, 2)
    noise = perlin_noise(rng, (size, size), (2 ** int(u), 2 ** int(v)))
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), float(rng.uniform(-90, 90)), 1.0)
    noise = cv2.warpAffine(noise, rot, (size, size), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return (noise > PERLIN_THRESHOLD).astype(np.float32)


def stroke_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A binary HxW mask: one quadratic Bezier stroke, 1/8-1/2 of the side long and 1-3 px wide at
    128² (CutPaste-scar's thin shapes, curved). Filled with foreign texture like a Perlin mask."""
    length = rng.uniform(size / 8, size / 2)
    start = rng.uniform(0, size, 2)
    angle = rng.uniform(0, 2 * math.pi)
    end = start + length * np.array([math.cos(angle), math.sin(angle)])
    bend = (start + end) / 2 + rng.normal(0, length / 4, 2)  # the control point: how far it curves
    t = np.linspace(0, 1, 32)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
    mask = np.zeros((size, size), np.uint8)
    width = int(rng.integers(max(1, size // 128), max(2, 3 * size // 128) + 1))
    cv2.polylines(mask, [np.round(curve).astype(np.int32)], False, 1, width, cv2.LINE_8)
    return mask.astype(np.float32)


MASK_SHAPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "perlin": perlin_mask, "stroke": stroke_mask}


# ---------------------------------------------------------------------- colour augmentations
def _lut(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.clip(fn(np.arange(256, dtype=np.float32)), 0, 255).astype(np.uint8)


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keep = int(rng.integers(2, 6))  # bits kept
    return img & np.uint8((0xFF << (8 - keep)) & 0xFF)


def _sharpen(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blur = cv2.GaussianBlur(img, (0, 0), 1.0)
    return cv2.addWeighted(img, 1.0 + rng.uniform(0.5, 2.0), blur, -rng.uniform(0.5, 2.0), 0)


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(32, 224)
    return cv2.LUT(img, _lut(lambda x: np.where(x >= t, 255 - x, x)))


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.merge([cv2.equalizeHist(c) for c in cv2.split(img)])


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gain, offset = rng.uniform(0.5, 1.5), rng.uniform(-30, 30)
    return cv2.LUT(img, _lut(lambda x: x * gain + offset))


def _hue(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(0, 180))) % 180).astype(np.uint8)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], _lut(lambda x, g=rng.uniform(0.5, 1.5): x * g))
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX)


COLOUR_OPS: tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray], ...] = (
    _posterize, _sharpen, _solarize, _equalize, _brightness, _hue, _autocontrast)


def augment_texture(img: np.ndarray, rng: np.random.Generator, n_ops: int = 3) -> np.ndarray:
    """Three colour operations, drawn without repetition, on an HxWx3 uint8 RGB texture."""
    for i in rng.choice(len(COLOUR_OPS), n_ops, replace=False):
        img = COLOUR_OPS[int(i)](np.ascontiguousarray(img), rng)
    return img


# -------------------------------------------------------------------------------- sources
def _to_hwc_uint8(chw: np.ndarray) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> HxWx3 uint8 RGB (gray repeated)."""
    img = np.clip(chw * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else np.ascontiguousarray(img)


def procedural_pool(rng: np.random.Generator, size: int, count: int) -> list[np.ndarray]:
    """``count`` textures (HxWx3 uint8 RGB, side ``size``) from the procedural renderers, in turn."""
    names = sorted(RENDERERS)
    return [cv2.cvtColor(RENDERERS[names[i % len(names)]](rng, size), cv2.COLOR_BGR2RGB) for i in range(count)]


def folder_pool(folder: str | os.PathLike, size: int, limit: int = 256) -> list[np.ndarray]:
    """The images of ``folder`` (sorted, at most ``limit``), resized to ``size`` square, RGB."""
    from edgead.data.datasets import IMAGE_SUFFIXES
    from edgead.data.images import load_image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"anomaly source {root} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())[:limit]
    if not paths:
        raise FileNotFoundError(f"anomaly source {root} holds no images")
    return [_to_hwc_uint8(load_image(p, size, 3)) for p in paths]


def random_view(texture: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A crop of 1/2× to 2× the image side (so the texture's scale changes), resized to ``size``,
    turned by a multiple of 90° and maybe mirrored."""
    side = texture.shape[0]
    crop = int(np.clip(round(size * 2.0 ** rng.uniform(-1.0, 1.0)), 4, side))
    y, x = rng.integers(0, side - crop + 1, 2)
    view = cv2.resize(texture[y:y + crop, x:x + crop], (size, size), interpolation=cv2.INTER_LINEAR)
    view = np.rot90(view, int(rng.integers(0, 4)))
    return np.ascontiguousarray(view[:, ::-1] if rng.random() < 0.5 else view)


# ----------------------------------------------------------------------------- generator
@dataclass
class SynthAnomaly:
    image: np.ndarray  # (C, H, W) float32 in [0, 1]
    mask: np.ndarray  # (1, H, W) float32, 0/1
    has_anomaly: float  # 1.0 iff the mask is not empty


class AnomalySynthesizer:
    """Deterministic DRAEM anomaly generator over a set of normal training images.

    ``images``: (N, C, H, W) float32 in [0, 1], the training set (also a texture source, chosen
    with probability ``self_fraction``). ``source_dir``: a folder of images that replaces the
    procedural texture pool. ``shapes``: the masks drawn from, in equal shares (:data:`MASK_SHAPES`;
    DRAEM's is ``perlin`` alone).
    """

    def __init__(self, images: np.ndarray, *, seed: int = 0, source_dir: str | os.PathLike | None = None,
                 anomaly_prob: float = 0.5, self_fraction: float = 0.5, pool_size: int = 40,
                 shapes: tuple[str, ...] = ("perlin",)) -> None:
        if images.ndim != 4:
            raise ValueError(f"expected (N, C, H, W) images, got {images.shape}")
        unknown = sorted(set(shapes) - set(MASK_SHAPES))
        if not shapes or unknown:
            raise ValueError(f"anomaly mask shapes must be among {sorted(MASK_SHAPES)}, got {list(shapes)}")
        self.shapes = tuple(shapes)
        self.size = int(images.shape[-1])
        self.channels = int(images.shape[1])
        self.rng = np.random.default_rng(seed)
        self.anomaly_prob, self.self_fraction = anomaly_prob, self_fraction
        self.train = [_to_hwc_uint8(img) for img in images]
        side = 2 * self.size  # room for crops up to 2× the image side
        self.source = "folder" if source_dir is not None else "procedural"
        self.pool = (folder_pool(source_dir, side) if source_dir is not None
                     else procedural_pool(self.rng, side, pool_size))

    def texture(self) -> np.ndarray:
        """One foreign texture, (C, H, W) float32 in [0, 1]."""
        rng = self.rng
        if rng.random() < self.self_fraction:
            base = self.train[int(rng.integers(len(self.train)))]
        else:
            base = self.pool[int(rng.integers(len(self.pool)))]
        rgb = augment_texture(random_view(base, rng, self.size), rng).astype(np.float32) / 255.0
        if self.channels == 1:
            rgb = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[..., None]
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def __call__(self, image: np.ndarray) -> SynthAnomaly:
        """``image`` (C, H, W) in [0, 1] -> an augmented copy, its mask and whether it is anomalous."""
        empty = np.zeros((1, *image.shape[1:]), np.float32)
        if self.rng.random() >= self.anomaly_prob:
            return SynthAnomaly(image.astype(np.float32, copy=True), empty, 0.0)
        # one shape draws nothing here, so a seed gives DRAEM the same sequence as before strokes existed
        shape = self.shapes[int(self.rng.integers(len(self.shapes)))] if len(self.shapes) > 1 else self.shapes[0]
        mask = MASK_SHAPES[shape](self.rng, self.size)[None]
        if not mask.any():
            return SynthAnomaly(image.astype(np.float32, copy=True), empty, 0.0)
        beta = np.float32(self.rng.uniform(*OPACITY))
        texture = self.texture()
        augmented = image + beta * mask * (texture - image)  # outside the mask: I + 0, exactly I
        return SynthAnomaly(augmented.astype(np.float32), mask, 1.0)

    def batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, C, H, W) -> (augmented (N, C, H, W), masks (N, 1, H, W), has_anomaly (N,))."""
        out = [self(img) for img in images]
        return (np.stack([o.image for o in out]), np.stack([o.mask for o in out]),
                np.array([o.has_anomaly for o in out], np.float32))
