"""Defect painters for the synthetic inspection set (numpy + OpenCV only).

Each painter changes pixels *only* inside the boolean mask it returns, so the
ground-truth mask is exactly the painted area. About ``SUBTLE_PROB`` of the
surface defects are subtle: a 10-20 grey-level shift or a texture disruption
(local smudge) that leaves the mean brightness unchanged.
"""
from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np


SUBTLE_PROB = 0.35
MIN_AREA = 0.0015  # smallest defect, as a fraction of the image (~100 px at 256^2)
Painter = Callable[[np.ndarray, np.ndarray, np.random.Generator, str], tuple[np.ndarray, np.ndarray]]

_STAIN_COLOURS = ((30, 60, 95), (20, 22, 25), (40, 90, 150), (205, 205, 200))
_PARTICLE_COLOURS = ((25, 25, 25), (235, 235, 230), (30, 70, 150), (150, 70, 35))
_COMPONENT_COLOURS = ((28, 28, 30), (120, 170, 205), (140, 90, 40), (190, 190, 195))


# ---------------------------------------------------------------- where the part is
def part_mask(image: np.ndarray, kind: str, category: str) -> np.ndarray:
    """Boolean map of the inspected surface: everything for textures, the part for objects."""
    shape = image.shape[:2]
    if kind == "texture":
        return np.ones(image.shape[:2], bool)
    if category == "pcb":
        b, g, r = (image[..., i].astype(np.int16) for i in range(3))
        seed = ((g - np.maximum(b, r)) > 25).astype(np.uint8)
    else:  # bright part on a dark tray: Otsu separates them reliably
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        _, seed = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    seed = cv2.morphologyEx(seed, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    contours, tree = cv2.findContours(seed, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    outer = [i for i in range(len(contours)) if tree[0][i][3] < 0]
    if not outer:
        return np.ones(shape, bool)
    main = max(outer, key=lambda i: cv2.contourArea(contours[i]))
    out = np.zeros(shape, np.uint8)
    if category == "pcb":  # chips/pads are not green: take the board's hull
        cv2.fillConvexPoly(out, cv2.convexHull(contours[main]), 1)
        return out.astype(bool)
    cv2.drawContours(out, contours, main, 1, -1)
    for i, c in enumerate(contours):  # re-open real holes (the washer's bore), not noise pits
        if tree[0][i][3] == main and cv2.contourArea(c) > 0.005 * out.size:
            cv2.drawContours(out, contours, i, 0, -1)
    return out.astype(bool)


def _pick(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    """A random (x, y) inside a boolean region."""
    ys, xs = np.nonzero(region)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _boundary_point(rng: np.random.Generator, region: np.ndarray, outer_only: bool) -> tuple[float, float]:
    mode = cv2.RETR_EXTERNAL if outer_only else cv2.RETR_LIST
    contours, _ = cv2.findContours(region.astype(np.uint8), mode, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c.reshape(-1, 2) for c in contours])
    x, y = pts[rng.integers(len(pts))]
    return float(x), float(y)


def _scale(img: np.ndarray) -> float:
    """Linear image size used to scale defects (works for non-square images too)."""
    return math.sqrt(img.shape[0] * img.shape[1])


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency value noise of any shape (~unit std)."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


# ---------------------------------------------------------------- shapes
def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _blob(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
          area: float) -> np.ndarray:
    """Irregular, possibly elongated blob covering about ``area`` (fraction of the image)."""
    aspect = rng.uniform(1.0, 2.2)
    radius = math.sqrt(area * shape[0] * shape[1] / math.pi)
    t = rng.uniform(0, math.pi)
    harmonics = [(k, rng.uniform(0, 0.12), rng.uniform(0, 2 * math.pi)) for k in range(2, 6)]
    # Only evaluate the bounding window: the blob is small compared with the image.
    reach = int(math.ceil(radius * math.sqrt(aspect) * 1.5)) + 1
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    x0, x1 = max(cx - reach, 0), min(cx + reach + 1, shape[1])
    y0, y1 = max(cy - reach, 0), min(cy + reach + 1, shape[0])
    mask = np.zeros(shape, bool)
    if x0 >= x1 or y0 >= y1:
        return mask
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx -= centre[0]
    dy -= centre[1]
    u = (dx * math.cos(t) + dy * math.sin(t)) / (radius * math.sqrt(aspect))
    v = (-dx * math.sin(t) + dy * math.cos(t)) * math.sqrt(aspect) / radius
    theta = np.arctan2(v, u)
    edge = np.ones_like(theta)
    for k, amp, phase in harmonics:  # wobbly outline from a few random harmonics
        edge += amp * np.cos(k * theta + phase)
    mask[y0:y1, x0:x1] = np.hypot(u, v) < edge
    return mask


def _curve(rng: np.random.Generator, centre: tuple[float, float], length: float) -> np.ndarray:
    """Gently bent line (quadratic Bezier) through ``centre``."""
    a = rng.uniform(0, np.pi)
    d = np.array([np.cos(a), np.sin(a)]) * length / 2
    c = np.array(centre)
    bend = np.array([-d[1], d[0]]) * rng.uniform(-0.35, 0.35)
    t = np.linspace(0, 1, 24)[:, None]
    p0, p1, p2 = c - d, c + bend, c + d
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _walk(rng: np.random.Generator, start: np.ndarray, steps: int, step: float) -> np.ndarray:
    """Jagged random walk with persistent direction: the shape of a crack."""
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.45, steps))
    moves = step * np.stack([np.cos(heading), np.sin(heading)], 1)
    return np.vstack([start, start + np.cumsum(moves, 0)])


def _draw_lines(shape: tuple[int, int], paths: list[np.ndarray], thickness: int) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    pts = [np.round(p).astype(np.int32) for p in paths]
    cv2.polylines(m, pts, False, 1, thickness)
    return m.astype(bool)


# ---------------------------------------------------------------- effects
def _apply(img: np.ndarray, mask: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Take ``new`` inside the mask and the original outside."""
    return np.where(mask[..., None], new, img)


def _amp(rng: np.random.Generator, subtle: bool, lo: float, hi: float) -> float:
    return rng.uniform(10, 20) if subtle else rng.uniform(lo, hi)


def _smudge(img: np.ndarray) -> np.ndarray:
    """Locally smeared texture: same mean brightness, structure destroyed."""
    sigma = max(img.shape[0] * 0.025, 1.0)
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _scratch(img, fg, rng, category):
    size, shape = _scale(img), img.shape[:2]
    pts = _curve(rng, _pick(rng, fg), size * rng.uniform(0.15, 0.6))
    mask = _draw_lines(shape, [pts], max(1, int(round(size * rng.uniform(0.006, 0.016))))) & fg
    sign = 1 if rng.random() < 0.6 else -1  # scratches mostly catch the light
    amp = _amp(rng, rng.random() < SUBTLE_PROB, 45, 90)
    delta = sign * amp * (0.75 + 0.25 * np.tanh(_noise(rng, shape, 6)))
    return _apply(img, mask, img + delta[..., None]), mask


def _crack(img, fg, rng, category):
    size, shape = _scale(img), img.shape[:2]
    main = _walk(rng, np.array(_pick(rng, fg)), int(rng.integers(8, 22)), size * 0.025)
    paths = [main]
    for _ in range(int(rng.integers(0, 3))):  # side branches
        paths.append(_walk(rng, main[rng.integers(len(main))], int(rng.integers(3, 8)), size * 0.02))
    mask = _draw_lines(shape, paths, max(1, int(round(size * rng.uniform(0.004, 0.011))))) & fg
    if rng.random() < SUBTLE_PROB:
        new = img - rng.uniform(10, 20)
    else:
        new = img * rng.uniform(0.2, 0.5)
    return _apply(img, mask, new), mask


def _hole(img, fg, rng, category):
    shape = img.shape[:2]
    mask = _blob(rng, shape, _pick(rng, fg), _log_uniform(rng, 0.004, 0.04)) & fg
    if rng.random() < SUBTLE_PROB:  # shallow dent: smeared texture, barely darker
        return _apply(img, mask, _smudge(img) - rng.uniform(0, 8)), mask
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
    depth = depth / max(float(depth.max()), 1.0)
    shade = 0.12 + 0.35 * (1 - depth) ** 2  # darkest at the bottom of the pit
    return _apply(img, mask, img * shade[..., None] + 8), mask


def _stain(img, fg, rng, category):
    shape = img.shape[:2]
    mask = _blob(rng, shape, _pick(rng, fg), _log_uniform(rng, 0.01, 0.12)) & fg
    colour = np.array(_STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))], np.float32)
    if rng.random() < SUBTLE_PROB:
        if rng.random() < 0.5:
            return _apply(img, mask, _smudge(img)), mask
        tint = (colour - 128) / (np.abs(colour - 128).max() + 1e-6)
        return _apply(img, mask, img + tint * rng.uniform(10, 20)), mask
    alpha = rng.uniform(0.3, 0.6) * (0.7 + 0.3 * np.tanh(_noise(rng, shape, 5)))
    new = img * (1 - alpha[..., None]) + colour * alpha[..., None]
    return _apply(img, mask, new), mask


def _particle(img, fg, rng, category):
    size, shape = _scale(img), img.shape[:2]
    centre = np.array(_pick(rng, fg))
    count = int(rng.integers(1, 4))
    area = _log_uniform(rng, 0.003, 0.025) / count
    mask = np.zeros(img.shape[:2], bool)
    for _ in range(count):  # a small cluster of debris
        c = tuple(centre + rng.normal(0, size * 0.05, 2))
        if rng.random() < 0.35:  # fibre / hair
            thick = max(1, int(round(size * 0.008)))
            length = min(area * shape[0] * shape[1] / thick, 0.4 * size)
            mask |= _draw_lines(shape, [_curve(rng, c, length)], thick)
        else:
            mask |= _blob(rng, shape, c, area)
    if rng.random() < SUBTLE_PROB:
        new = img + rng.choice([-1, 1]) * rng.uniform(10, 20)
    else:
        colour = np.array(_PARTICLE_COLOURS[rng.integers(len(_PARTICLE_COLOURS))], np.float32)
        new = 0.15 * img + 0.85 * colour
    return _apply(img, mask, new), mask


def _fill_like(img: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Full-image fill with the median colour + noise of ``region`` (to paint over parts)."""
    colour = np.median(img[region][::5], axis=0)  # a subsample is plenty for a median
    return colour + rng.normal(0, 2.0, img.shape).astype(np.float32)


def _missing(img, fg, rng, category):
    size, shape = _scale(img), img.shape[:2]
    if category == "pcb" and rng.random() < 0.75:  # a component or pad is absent
        mask = _pcb_component(img, fg, rng)
        if mask is not None:
            b, g, r = img[..., 0], img[..., 1], img[..., 2]
            board = fg & (g - np.maximum(b, r) > 25)
            return _apply(img, mask, _fill_like(img, board, rng)), mask
    # A bite out of the part's edge: show the tray through.
    centre = _boundary_point(rng, fg, outer_only=False)
    mask = _blob(rng, shape, centre, _log_uniform(rng, 0.006, 0.06)) & fg
    k = max(3, int(size * 0.06)) | 1
    tray = ~cv2.dilate(fg.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    return _apply(img, mask, _fill_like(img, tray if tray.any() else ~fg, rng)), mask


def _pcb_component(img, fg, rng) -> np.ndarray | None:
    """Mask of one chip or pad on the board (dark or gold blobs), slightly dilated."""
    b, g, r = img[..., 0], img[..., 1], img[..., 2]
    chip = (img.max(axis=2) < 60) & (g - np.maximum(b, r) < 15)  # black, not green board
    gold = r - b > 70
    parts = (fg & (chip | gold)).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(parts, connectivity=8)
    big = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 3]
    if not big:
        return None
    comp = (labels == big[rng.integers(len(big))]).astype(np.uint8)
    return cv2.dilate(comp, np.ones((3, 3), np.uint8)).astype(bool) & fg


def _extra(img, fg, rng, category):
    shape = img.shape[:2]
    if category == "pcb":  # a stray component soldered where none belongs
        area = _log_uniform(rng, 0.003, 0.03) * shape[0] * shape[1]
        aspect = rng.uniform(1.0, 2.5)
        w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
        box = cv2.boxPoints((_pick(rng, fg), (w, h), rng.uniform(0, 180)))
        m = np.zeros(img.shape[:2], np.uint8)
        cv2.fillConvexPoly(m, np.round(box).astype(np.int32), 1)
        mask = m.astype(bool)
        colour = np.array(_COMPONENT_COLOURS[rng.integers(len(_COMPONENT_COLOURS))], np.float32)
        shade = 1 + 0.06 * _noise(rng, shape, 4)
        return _apply(img, mask, colour * shade[..., None]), mask
    # Burr / excess material welded onto the part's outline.
    centre = _boundary_point(rng, fg, outer_only=True)
    mask = _blob(rng, shape, centre, _log_uniform(rng, 0.004, 0.04)) & ~fg
    metal = np.median(img[fg][::5], axis=0)
    shade = 0.9 + 0.08 * np.tanh(_noise(rng, shape, 6))
    return _apply(img, mask, metal * shade[..., None]), mask


PAINTERS: dict[str, Painter] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "crack": _crack,
    "particle": _particle,
    "missing": _missing,
    "extra": _extra,
}


def paint(image: np.ndarray, kind: str, category: str, defect: str,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one visible defect; retries placement when a draw ends up empty or invisible."""
    fg = part_mask(image, kind, category)
    src = image.astype(np.float32)
    for _ in range(16):
        new, mask = PAINTERS[defect](src, fg, rng, category)
        out = np.clip(np.rint(new), 0, 255).astype(np.uint8)
        big_enough = mask.sum() >= max(3, MIN_AREA * mask.size)
        if big_enough and np.abs(out.astype(np.int16) - image)[mask].mean() > 0.5:
            return out, mask.astype(np.uint8) * 255
    raise RuntimeError(f"could not paint a visible {defect!r} on {category!r}")
