"""Deterministic synthetic industrial-inspection data in the MVTec AD layout.

numpy + OpenCV only (the torch-free station runtime uses it for ``synthetic://``
sources). Every image draws from its own ``np.random.default_rng`` keyed by
(seed, category, stream, defect, index), so generating one category, one split
or one image gives exactly the same pixels as generating everything::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png   (uint8 0/255)

Renderers live in ``synth_render`` and defect painters in ``synth_defects``.
"""
from __future__ import annotations

import itertools
import os
import pathlib
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import cv2
import numpy as np

from .synth_defects import SUBTLE_PROB, paint
from .synth_render import RENDERERS

__all__ = ["CATEGORIES", "DEFECTS", "SUBTLE_PROB", "SynthSpec", "render_normal", "add_defect",
           "sample", "generate", "Conveyor"]

CATEGORIES: dict[str, str] = {
    "fabric": "texture",
    "metal": "texture",
    "wood": "texture",
    "washer": "object",
    "pcb": "object",
}

DEFECTS: dict[str, tuple[str, ...]] = {
    "fabric": ("hole", "stain", "particle", "scratch"),  # scratch = pulled thread
    "metal": ("scratch", "hole", "stain", "crack", "particle"),
    "wood": ("scratch", "hole", "stain", "crack", "particle"),
    "washer": ("scratch", "crack", "stain", "particle", "missing", "extra"),
    "pcb": ("scratch", "stain", "particle", "missing", "extra"),
}


@dataclass(frozen=True)
class SynthSpec:
    """Size and counts of a generated data set (per category)."""

    image_size: int = 256
    n_train: int = 200
    n_test_good: int = 40
    n_test_per_defect: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if min(self.n_train, self.n_test_good, self.n_test_per_defect, self.seed) < 0:
            raise ValueError("counts and seed must be non-negative")


def _check(category: str, defect: str | None = None) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose from {sorted(CATEGORIES)}")
    if defect is not None and defect not in DEFECTS[category]:
        raise ValueError(f"defect {defect!r} not available for {category!r}: {DEFECTS[category]}")


def _key(text: str) -> int:
    # crc32, not hash(): Python salts str hashes per process.
    return zlib.crc32(text.encode())


def _rng(seed: int, category: str, stream: str, defect: str | None, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _key(category), _key(stream), _key(defect or "good"), index])


def render_normal(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free HxWx3 uint8 BGR image of ``category``."""
    _check(category)
    return RENDERERS[category](rng, size)


def add_defect(image: np.ndarray, category: str, defect: str,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (defective copy, mask uint8 HxW 0/255); ``image`` is not modified."""
    _check(category, defect)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 BGR image, got {image.shape} {image.dtype}")
    return paint(image, CATEGORIES[category], category, defect, rng)


def sample(category: str, index: int, *, size: int = 256, seed: int = 0,
           defect: str | None = None, stream: str = "conveyor") -> tuple[np.ndarray, np.ndarray]:
    """One deterministic (image, mask) pair; ``defect=None`` gives an all-zero mask."""
    _check(category, defect)
    rng = _rng(seed, category, stream, defect, index)
    image = render_normal(category, rng, size)
    if defect is None:
        return image, np.zeros(image.shape[:2], np.uint8)
    return add_defect(image, category, defect, rng)


def _write_png(path: pathlib.Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def _jobs(category: str, spec: SynthSpec) -> list[tuple[str, str, str | None, int]]:
    """(category, split, defect, index) for every file of one category."""
    groups = [("train", None, spec.n_train), ("test", None, spec.n_test_good)]
    groups += [("test", d, spec.n_test_per_defect) for d in DEFECTS[category]]
    return [(category, split, d, i) for split, d, n in groups for i in range(n)]


def _write_one(root: pathlib.Path, spec: SynthSpec, job: tuple[str, str, str | None, int]) -> str:
    category, split, defect, i = job
    image, mask = sample(category, i, size=spec.image_size, seed=spec.seed, defect=defect, stream=split)
    _write_png(root / category / split / (defect or "good") / f"{i:03d}.png", image)
    if defect is not None:
        _write_png(root / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return category


def generate(root: str | os.PathLike, categories: Sequence[str] | None = None,
             spec: SynthSpec = SynthSpec(), progress: bool = False) -> pathlib.Path:
    """Write the MVTec-layout data set under ``root`` (all categories if None); return root.

    Existing files are overwritten but stale extra files are not removed. Images are
    rendered on a few threads (numpy/OpenCV release the GIL); each has its own RNG,
    so the output does not depend on scheduling.
    """
    root = pathlib.Path(root)
    names = list(CATEGORIES) if categories is None else list(categories)
    for name in names:
        _check(name)
    jobs = [job for name in names for job in _jobs(name, spec)]
    for category, split, defect, _ in jobs:
        (root / category / split / (defect or "good")).mkdir(parents=True, exist_ok=True)
        if defect is not None:
            (root / category / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
    total = {name: len(_jobs(name, spec)) for name in names}
    t0, done = time.perf_counter(), dict.fromkeys(names, 0)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for category in pool.map(lambda job: _write_one(root, spec, job), jobs):
            done[category] += 1
            if progress and done[category] == total[category]:
                print(f"synth: {category}: {done[category]} images "
                      f"({time.perf_counter() - t0:.1f}s elapsed)", file=sys.stderr, flush=True)
    return root


class Conveyor:
    """Endless deterministic stream of parts: each item = (image BGR uint8, mask uint8, defect name or None)."""

    def __init__(self, category: str, size: int = 256, seed: int = 0, defect_rate: float = 0.3):
        _check(category)
        if not 0.0 <= defect_rate <= 1.0:
            raise ValueError(f"defect_rate must be in [0, 1], got {defect_rate}")
        self.category, self.size, self.seed, self.defect_rate = category, size, seed, defect_rate

    def defect_at(self, index: int) -> str | None:
        """Which defect (or None) part ``index`` carries, without rendering it."""
        rng = _rng(self.seed, self.category, "conveyor/choice", None, index)
        if rng.random() >= self.defect_rate:
            return None
        options = DEFECTS[self.category]
        return options[int(rng.integers(len(options)))]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, str | None]:
        if index < 0:
            raise IndexError("a conveyor is endless: negative indices are undefined")
        defect = self.defect_at(index)
        image, mask = sample(self.category, index, size=self.size, seed=self.seed,
                             defect=defect, stream="conveyor")
        return image, mask, defect

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, str | None]]:
        return (self[i] for i in itertools.count())
