"""Defect-free procedural renderers for the synthetic inspection set.

numpy + OpenCV only: the torch-free station runtime imports this too.
Every renderer takes an ``np.random.Generator`` and a square size and returns
an HxWx3 uint8 BGR image; all randomness comes from that generator.
"""
from __future__ import annotations

import math
from functools import lru_cache
from collections.abc import Sequence
from typing import Callable

import cv2
import numpy as np

Renderer = Callable[[np.random.Generator, int], np.ndarray]


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), cached because every renderer needs them."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Low-frequency value noise (~unit std): a coarse random grid upsampled bicubically."""
    n = max(2, int(round(cells))) + 1
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def streak_noise(rng: np.random.Generator, size: int, along: float, across: float) -> np.ndarray:
    """Anisotropic noise stretched along x (brushing marks, wood fibres), unit std."""
    # Upsampling a short-along-x random grid is far cheaper than a wide Gaussian blur.
    n = rng.standard_normal((size, max(2, int(size / max(along, 1.0)) + 1)), dtype=np.float32)
    n = cv2.resize(n, (size, size), interpolation=cv2.INTER_CUBIC)
    if across > 0.3:
        n = cv2.GaussianBlur(n, (1, 0), sigmaX=0, sigmaY=across, borderType=cv2.BORDER_REFLECT)
    return n / (n.std() + 1e-6)


def _rotated(size: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rotated about the image centre, normalised to [0, 1]-ish."""
    x, y = _grid(size)
    t = math.radians(degrees)  # python floats keep the arrays float32 (NEP 50)
    c, s, h = math.cos(t), math.sin(t), size / 2
    u = ((x - h) * c + (y - h) * s + h) / size
    v = (-(x - h) * s + (y - h) * c + h) / size
    return u, v


def _lighting(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Gentle illumination gradient + blotches, so images differ in global brightness."""
    x, y = _grid(size)
    gx, gy = (float(g) * strength for g in rng.uniform(-1, 1, 2))
    ramp = gx * (x / size - 0.5) + gy * (y / size - 0.5)
    return 1.0 + ramp + 0.4 * strength * smooth_noise(rng, size, 2)


def _colorize(intensity: np.ndarray, dark: tuple, light: tuple) -> np.ndarray:
    """Map a [0, 1] intensity field to BGR by lerping between two palette colours."""
    d = np.asarray(dark, np.float32)
    l = np.asarray(light, np.float32)
    return d + np.clip(intensity, 0, 1.2)[..., None] * (l - d)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 2.0) -> np.ndarray:
    """Global gain (exposure drift) + sensor noise, then quantise to uint8."""
    img = img * rng.uniform(0.93, 1.07) + rng.normal(0, 3)
    img += noise * rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _jitter(rng: np.random.Generator, colour: tuple, amount: float = 8) -> tuple:
    return tuple(float(c) + rng.uniform(-amount, amount) for c in colour)


# ---------------------------------------------------------------- textures
def render_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plain-weave cloth: warp/weft threads alternating over/under, random phase."""
    period = rng.uniform(15, 19)  # threads across the image, independent of size
    u, v = _rotated(size, rng.uniform(-3, 3))
    u = u * period + rng.uniform(0, 2)
    v = v * period + rng.uniform(0, 2)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    # Yarns differ slightly in thickness/dye: one random gain per thread index.
    gain_u = 1 + 0.07 * rng.standard_normal(64).astype(np.float32)
    gain_v = 1 + 0.07 * rng.standard_normal(64).astype(np.float32)
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)  # 0 at thread edges, 1 mid-thread
    warp = np.sqrt(su) * (0.6 + 0.4 * sv) * gain_u[iu % 64]
    weft = np.sqrt(sv) * (0.6 + 0.4 * su) * gain_v[iv % 64]
    inten = np.where((iu + iv) % 2 == 0, warp, 0.9 * weft)
    inten = 0.15 + 0.8 * inten + 0.05 * smooth_noise(rng, size, size / 3)
    inten *= _lighting(rng, size, 0.12)
    img = _colorize(inten, _jitter(rng, (55, 40, 30)), _jitter(rng, (205, 160, 120)))
    return _finish(img, rng)


def render_metal(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed steel: fine + coarse streaks along the brushing direction, a soft sheen band."""
    # Long hairline marks over broader, softer brushing bands.
    fine = streak_noise(rng, size, size * 0.3, 0)
    mid = streak_noise(rng, size, size * 0.08, 0.5)
    coarse = streak_noise(rng, size, size * 0.5, size * 0.015)
    field = 0.05 * fine + 0.025 * mid + 0.05 * coarse
    angle = rng.uniform(-4, 4)
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    field = cv2.warpAffine(field, rot, (size, size), borderMode=cv2.BORDER_REFLECT)
    _, v = _rotated(size, angle)
    sheen = 0.1 * np.cos(2 * np.pi * (v * rng.uniform(0.4, 0.9) + rng.uniform(0, 1)))
    inten = (0.6 + sheen + field) * _lighting(rng, size, 0.1)
    img = _colorize(inten, _jitter(rng, (60, 60, 55), 4), _jitter(rng, (215, 208, 200), 4))
    return _finish(img, rng, 1.5)


def render_wood(rng: np.random.Generator, size: int) -> np.ndarray:
    """Plank grain: wavy growth rings (dark latewood lines) plus fine fibres."""
    u, v = _rotated(size, rng.uniform(-5, 5))
    rings = rng.uniform(7, 11)
    phase = (v * rings + 0.7 * smooth_noise(rng, size, 1.5) + 0.06 * smooth_noise(rng, size, 6)
             + 0.1 * np.sin(2 * np.pi * (u * rng.uniform(0.3, 0.8) + rng.uniform(0, 1))))
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    w2 = wave * wave
    w8 = np.square(np.square(w2))
    latewood = 0.75 * w8 + 0.25 * w2  # thin dark lines over a soft seasonal gradient
    fibres = streak_noise(rng, size, size * 0.06, 0.6)
    inten = 0.82 - 0.42 * latewood + 0.05 * fibres + 0.05 * smooth_noise(rng, size, 4)
    inten *= _lighting(rng, size, 0.1)
    img = _colorize(inten, _jitter(rng, (25, 55, 95)), _jitter(rng, (125, 180, 225)))
    return _finish(img, rng, 1.5)


# ---------------------------------------------------------------- objects
def _background(rng: np.random.Generator, size: int, level: tuple) -> np.ndarray:
    """Matte conveyor/tray surface behind object parts."""
    grain = 0.04 * smooth_noise(rng, size, size / 4) + 0.03 * smooth_noise(rng, size, 5)
    inten = (1 + grain) * _lighting(rng, size, 0.1)
    return np.asarray(_jitter(rng, level, 4), np.float32) * inten[..., None]


def _composite(bg: np.ndarray, part: np.ndarray, alpha: np.ndarray, size: int) -> np.ndarray:
    """Alpha-blend a part over the background with a soft drop shadow."""
    shift = np.float32([[1, 0, size * 0.015], [0, 1, size * 0.02]])
    shadow = cv2.warpAffine(alpha, shift, (size, size))
    shadow = cv2.GaussianBlur(shadow, (0, 0), max(size * 0.015, 0.5))
    bg *= (1 - 0.45 * shadow)[..., None]
    bg += (part - bg) * alpha[..., None]
    return bg


def render_washer(rng: np.random.Generator, size: int) -> np.ndarray:
    """Keyed steel washer on a dark tray, with small pose jitter."""
    x, y = _grid(size)
    cx, cy = (size * (0.5 + float(c)) for c in rng.uniform(-0.04, 0.04, 2))
    scale = rng.uniform(0.94, 1.06)
    r_out, r_in = 0.34 * size * scale, 0.15 * size * scale
    key = math.radians(-90 + rng.uniform(-10, 10))  # inner key tab, points up-ish
    dx, dy = x - cx, y - cy
    r = np.sqrt(dx * dx + dy * dy)
    ring = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    along = dx * math.cos(key) + dy * math.sin(key)
    across = np.abs(dy * math.cos(key) - dx * math.sin(key))
    tab = (np.clip(0.06 * size * scale - across + 0.5, 0, 1) * (along > 0)
           * np.clip(r - (r_in - 0.05 * size * scale) + 0.5, 0, 1) * (r < r_in + 1))
    alpha = np.maximum(ring, tab)
    t = np.clip((r - r_in) / (r_out - r_in), 0, 1)
    bevel = 0.12 * (np.square(np.maximum(1 - t / 0.2, 0)) + np.square(np.maximum((t - 0.8) / 0.2, 0)))
    lamp = rng.uniform(0.6, 1.0)  # light direction: cos of the angle, without arctan2
    light = 0.16 * (dx * math.cos(lamp) + dy * math.sin(lamp)) / np.maximum(r, 1)
    turning = 0.015 * np.sin(2 * np.pi * r / max(size * 0.02, 2.5))  # lathe marks
    inten = 0.66 + bevel + light + turning + 0.03 * smooth_noise(rng, size, size / 6)
    part = _colorize(inten, (0, 0, 0), _jitter(rng, (185, 182, 178), 5))
    bg = _background(rng, size, (58, 60, 62))
    return _finish(_composite(bg, part, alpha, size), rng)


# PCB layout in unit coordinates: the same product every time, only its pose varies.
_BOARD = (0.14, 0.2, 0.86, 0.8)
_CHIPS = ((0.28, 0.32, 0.5, 0.54), (0.6, 0.28, 0.74, 0.4), (0.6, 0.52, 0.78, 0.62))
_PADS = tuple((0.2 + 0.06 * k, 0.7, 0.23 + 0.06 * k, 0.74) for k in range(10)) + \
    ((0.18, 0.3, 0.22, 0.34), (0.18, 0.4, 0.22, 0.44), (0.18, 0.5, 0.22, 0.54))
_TRACES = (((0.21, 0.72), (0.21, 0.62), (0.3, 0.56)), ((0.39, 0.72), (0.39, 0.56)),
           ((0.51, 0.72), (0.56, 0.66), (0.62, 0.62)), ((0.69, 0.72), (0.69, 0.62)),
           ((0.22, 0.32), (0.28, 0.36)), ((0.22, 0.42), (0.28, 0.43)),
           ((0.5, 0.36), (0.55, 0.34), (0.6, 0.34)), ((0.67, 0.4), (0.67, 0.52)),
           ((0.8, 0.25), (0.8, 0.68), (0.75, 0.72)))
_HOLES = ((0.18, 0.24), (0.82, 0.24), (0.18, 0.76), (0.82, 0.76))


def _pcb_canvas(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw the board in its canonical pose; returns (BGR float, alpha)."""
    px = lambda v: int(round(v * size))  # noqa: E731
    img = np.zeros((size, size, 3), np.uint8)
    x0, y0, x1, y1 = _BOARD
    cv2.rectangle(img, (px(x0), px(y0)), (px(x1), px(y1)), (38, 105, 30), -1)
    w = max(1, px(0.01))
    for line in _TRACES:
        pts = np.array([[px(a), px(b)] for a, b in line], np.int32)
        cv2.polylines(img, [pts], False, (55, 150, 45), w)
    for a, b, c, d in _PADS:
        cv2.rectangle(img, (px(a), px(b)), (px(c), px(d)), (60, 165, 205), -1)
    for a, b, c, d in _CHIPS:
        pin = max(1, px(0.012))
        for xp in np.arange(a + 0.02, c - 0.01, 0.03):  # legs along the long edges
            cv2.rectangle(img, (px(xp), px(b) - pin - 1), (px(xp) + pin, px(d) + pin + 1),
                          (175, 175, 180), -1)
        cv2.rectangle(img, (px(a), px(b)), (px(c), px(d)), (28, 28, 30), -1)
    cv2.rectangle(img, (px(0.26), px(0.3)), (px(0.52), px(0.56)), (225, 225, 225), 1)
    for hx, hy in _HOLES:
        cv2.circle(img, (px(hx), px(hy)), max(1, px(0.022)), (60, 165, 205), -1)
        cv2.circle(img, (px(hx), px(hy)), max(1, px(0.012)), (0, 0, 0), -1)
    alpha = np.zeros((size, size), np.float32)
    cv2.rectangle(alpha, (px(x0), px(y0)), (px(x1), px(y1)), 1.0, -1)
    for hx, hy in _HOLES:  # drilled holes show the tray through
        cv2.circle(alpha, (px(hx), px(hy)), max(1, px(0.012)), 0.0, -1)
    return img.astype(np.float32), alpha


def render_pcb(rng: np.random.Generator, size: int) -> np.ndarray:
    """Populated circuit board (pads, traces, chips) on a grey tray, with pose jitter."""
    part, alpha = _pcb_canvas(rng, size)
    part *= (1 + 0.04 * smooth_noise(rng, size, size / 8))[..., None]
    shift = size * rng.uniform(-0.04, 0.04, 2)
    m = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-4, 4), rng.uniform(0.95, 1.05))
    m[:, 2] += shift
    part = cv2.warpAffine(part, m, (size, size), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, m, (size, size), flags=cv2.INTER_LINEAR)
    bg = _background(rng, size, (150, 146, 140))
    return _finish(_composite(bg, part, alpha, size), rng)


RENDERERS: dict[str, Renderer] = {
    "fabric": render_fabric,
    "metal": render_metal,
    "wood": render_wood,
    "washer": render_washer,
    "pcb": render_pcb,
}


def render_textures(renderers: Sequence[str], count: int, size: int, seed: int) -> np.ndarray:
    """``count`` normal renders (N, 3, size, size), RGB float32 in [0, 1], cycling through ``renderers``:
    a distillation pool beside the training images (Uninformed Students, the distilled PatchCore)."""
    rng = np.random.default_rng([seed, 7919])
    out = [RENDERERS[renderers[i % len(renderers)]](rng, size)[..., ::-1] for i in range(count)]  # BGR -> RGB
    return (np.stack(out).transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
