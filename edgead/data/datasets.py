"""Dataset layouts (MVTec AD, anomalib-style Folder), the held-out split and array loading.

numpy + OpenCV only (no torch): the station runtime imports this module.

Listings are non-recursive, ignore hidden files (``.DS_Store``, macOS ``._*`` forks) and
anything whose suffix is not in :data:`IMAGE_SUFFIXES` (case-insensitive), and are sorted by
name, so the same folder always gives the same samples in the same order.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .images import ImageError, load_mask, read_image, to_model_input

__all__ = [
    "IMAGE_SUFFIXES",
    "BadImageWarning",
    "DatasetError",
    "Sample",
    "folder_samples",
    "load_arrays",
    "mvtec_samples",
    "split_train_val",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" or the defect type / folder name
    mask_path: Path | None


class DatasetError(ValueError):
    """Bad dataset layout or use; messages name the folder/file."""


class BadImageWarning(UserWarning):
    """A bad image was skipped by :func:`load_arrays` with ``skip_bad=True``."""


# ------------------------------------------------------------------ listing helpers
def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"{what} {folder} {state}")


def _require_images(folder: Path, what: str) -> list[Path]:
    images = _list_images(folder)
    if not images:
        raise DatasetError(
            f"{what} {folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return images


# ------------------------------------------------------------------ MVTec AD
def mvtec_samples(
    root: str | os.PathLike, category: str, split: Literal["train", "test"]
) -> list[Sample]:
    """Samples of one MVTec AD category and split.

    Layout: ``<root>/<category>/train/good/*``, ``<root>/<category>/test/<defect>/*`` and masks
    at ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png`` (``good`` has none).
    Order: defect folders by name, then files by name.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    _require_dir(root, "MVTec AD root")
    cat_dir = root / category
    split_dir = cat_dir / split
    if not split_dir.is_dir():
        available = [
            c for c in _subdirs(root) if any((root / c / s).is_dir() for s in ("train", "test"))
        ]
        listed = ", ".join(available) if available else "none"
        missing = cat_dir if not cat_dir.is_dir() else split_dir
        raise DatasetError(f"{missing} does not exist; available categories under {root}: {listed}")

    if split == "train":
        good = split_dir / "good"
        _require_dir(good, "MVTec AD train folder")
        return [Sample(p, 0, "good", None) for p in _require_images(good, "MVTec AD train folder")]

    defects = _subdirs(split_dir)
    if not defects:
        raise DatasetError(f"MVTec AD test folder {split_dir} has no defect sub-folders")
    samples: list[Sample] = []
    for defect in defects:
        images = _require_images(split_dir / defect, "MVTec AD test folder")
        if defect == "good":
            samples += [Sample(p, 0, "good", None) for p in images]
            continue
        for p in images:
            mask = cat_dir / "ground_truth" / defect / f"{p.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"test image {p} has no mask: expected {mask}")
            samples.append(Sample(p, 1, defect, mask))
    _refuse_orphan_masks(cat_dir, {s.mask_path for s in samples if s.mask_path is not None})
    return samples


def _refuse_orphan_masks(cat_dir: Path, used: set[Path]) -> None:
    """A mask under ground_truth/ that no test image claims means a missing or misnamed image:
    the test set is not what its author thinks, so it is an error naming the mask."""
    truth = cat_dir / "ground_truth"
    if not truth.is_dir():
        return
    orphans = sorted(m for d in _subdirs(truth) for m in _list_images(truth / d) if m not in used)
    if orphans:
        first = orphans[0]
        image = cat_dir / "test" / first.parent.name / (first.stem.removesuffix("_mask") + ".png")
        raise DatasetError(
            f"mask {first} matches no test image (expected {image}, any image suffix)"
            + (f" ({len(orphans) - 1} more unmatched masks)" if len(orphans) > 1 else "")
            + "; add the image or remove the mask")


# ------------------------------------------------------------------ Folder (anomalib style)
def _match_masks(abnormal: list[Path], mask_dir: Path) -> dict[Path, Path]:
    """Pair each abnormal image with ``<stem>.png`` or ``<stem>_mask.png`` (any image suffix)."""
    masks_by_stem: dict[str, list[Path]] = {}
    for m in _list_images(mask_dir):
        masks_by_stem.setdefault(m.stem, []).append(m)

    seen_stems: dict[str, Path] = {}
    pairs: dict[Path, Path] = {}
    used: set[Path] = set()
    for img in abnormal:
        if img.stem in seen_stems:  # a.png and a.jpg would both claim the same mask
            raise DatasetError(
                f"abnormal images {seen_stems[img.stem]} and {img} share the stem "
                f"{img.stem!r}, so masks cannot be matched by stem"
            )
        seen_stems[img.stem] = img
        found = masks_by_stem.get(img.stem, []) + masks_by_stem.get(f"{img.stem}_mask", [])
        if not found:
            raise DatasetError(
                f"abnormal image {img} has no mask in {mask_dir} "
                f"(expected {img.stem}.png or {img.stem}_mask.png)"
            )
        if len(found) > 1:
            raise DatasetError(
                f"abnormal image {img} matches several masks: {', '.join(map(str, found))}"
            )
        pairs[img] = found[0]
        used.add(found[0])

    orphans = [m for ms in masks_by_stem.values() for m in ms if m not in used]
    if orphans:
        raise DatasetError(
            f"mask {sorted(orphans)[0]} matches no abnormal image in "
            f"{abnormal[0].parent if abnormal else '?'}"
            + (f" ({len(orphans) - 1} more unmatched masks)" if len(orphans) > 1 else "")
        )
    return pairs


def folder_samples(
    normal_dir: str | os.PathLike,
    abnormal_dir: str | os.PathLike | None = None,
    mask_dir: str | os.PathLike | None = None,
) -> list[Sample]:
    """Samples of an anomalib Folder-style dataset: normal first, then abnormal, each by name.

    Normal images get ``defect="good"``; abnormal ones ``defect="abnormal"``. With ``mask_dir``
    every abnormal image needs a mask matched by file stem (``<stem>.png`` or
    ``<stem>_mask.png``) and every mask needs an image.
    """
    normal = Path(normal_dir)
    _require_dir(normal, "normal folder")
    samples = [Sample(p, 0, "good", None) for p in _require_images(normal, "normal folder")]
    if abnormal_dir is None:
        if mask_dir is not None:
            raise DatasetError(f"mask folder {mask_dir} given without an abnormal folder")
        return samples

    abnormal = Path(abnormal_dir)
    _require_dir(abnormal, "abnormal folder")
    images = _require_images(abnormal, "abnormal folder")
    if mask_dir is None:
        return samples + [Sample(p, 1, "abnormal", None) for p in images]
    masks = Path(mask_dir)
    _require_dir(masks, "mask folder")
    pairs = _match_masks(images, masks)
    return samples + [Sample(p, 1, "abnormal", pairs[p]) for p in images]


# ------------------------------------------------------------------ held-out split
def split_train_val(
    samples: list[Sample], val_fraction: float = 0.15, seed: int = 0, min_val: int = 4
) -> tuple[list[Sample], list[Sample]]:
    """Split normal samples into (train, val) with a seeded shuffle.

    The validation part is held out of training: score normalisation and the threshold are
    computed on it, so they reflect images the model has not fitted. It holds
    ``max(min_val, round(len * val_fraction))`` images. The split depends only on the set of
    paths and the seed (input order does not matter); both parts come back sorted by path.
    """
    anomalous = [s for s in samples if s.label != 0]
    if anomalous:
        raise DatasetError(
            f"split_train_val takes normal images only; {anomalous[0].path} has label "
            f"{anomalous[0].label} ({len(anomalous)} anomalous in all)"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(samples, key=lambda s: str(s.path))
    n = len(ordered)
    n_val = max(min_val, int(math.floor(n * val_fraction + 0.5)))
    if n - n_val < 1:
        where = f" (from {ordered[0].path.parent})" if ordered else ""
        raise DatasetError(
            f"{n} normal images{where} are too few to hold out {n_val} for validation "
            f"and still train on at least 1"
        )
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [s for i, s in enumerate(ordered) if i not in val_idx]
    val = [s for i, s in enumerate(ordered) if i in val_idx]
    return train, val


# ------------------------------------------------------------------ arrays
def load_arrays(
    samples: Sequence[Sample],
    size: int,
    channels: int,
    *,
    skip_bad: bool = False,
    with_masks: bool = False,
) -> tuple[np.ndarray, np.ndarray | None, list[Sample]]:
    """Load samples into float32 ``(N, channels, size, size)`` (+ masks ``(N, size, size)``).

    Returns ``(images, masks_or_None, loaded_samples)``; ``loaded_samples[i]`` is the sample of
    ``images[i]``. With ``with_masks`` normal images get all-zero masks and each anomalous mask
    must have its image's HxW. A bad image or mask raises :class:`ImageError` naming it, or,
    with ``skip_bad=True``, is skipped with a :class:`BadImageWarning` naming it and left out of
    ``loaded_samples``.
    """
    if not samples:
        raise DatasetError("no samples to load")
    if with_masks:
        unmasked = [s for s in samples if s.label != 0 and s.mask_path is None]
        if unmasked:  # a usage error, not a bad file: never skipped
            raise DatasetError(
                f"with_masks=True but anomalous image {unmasked[0].path} has no mask "
                f"({len(unmasked)} in all)"
            )

    n = len(samples)
    images = np.empty((n, channels, size, size), np.float32)
    masks = np.zeros((n, size, size), np.float32) if with_masks else None
    kept: list[Sample] = []
    for sample in samples:
        k = len(kept)
        try:
            raw = read_image(sample.path)
            try:
                to_model_input(raw, size, channels, out=images[k])
            except ValueError as err:
                raise ImageError(f"{sample.path}: {err}") from err
            if masks is not None and sample.mask_path is not None:
                masks[k] = load_mask(
                    sample.mask_path, size, expect_hw=raw.shape[:2], image_path=sample.path
                )
        except ImageError as err:
            if not skip_bad:
                raise
            # Slot k is reused by the next sample; its mask slot was never written (the
            # assignment happens only after load_mask succeeds), so it is still zero.
            warnings.warn(f"skipping bad sample: {err}", BadImageWarning, stacklevel=2)
            continue
        kept.append(sample)

    if not kept:
        raise DatasetError(f"none of the {n} samples could be loaded (all skipped as bad)")
    k = len(kept)
    # Slicing the leading axis keeps the arrays C-contiguous without a copy.
    return images[:k], (masks[:k] if masks is not None else None), kept
