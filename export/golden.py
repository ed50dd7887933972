"""The golden outputs written into every bundle (format: :mod:`edgead.core.golden`).

A fixed number of images, ``GOLDEN_IMAGES`` (48) by default:

- normal: up to ``GOLDEN_NORMAL`` (32) validation images of the run, evenly spaced (the run's
  held-out split: MVTec ``val_files`` under ``--data``/the recorded root, or the synthetic
  generator's validation stream for synthetic runs), or the images of ``--golden-images DIR``;
- anomalous, the rest: the category's test-split anomalies with their masks when the data has a
  test split, evenly spaced over the defect types; else (or to top up) synthetic anomalies made
  from the validation images: an ellipse of inverted, noisy tone painted on the image, whose mask
  is the ellipse.

For each: the PyTorch FP32 score and raw map of the training run (the reference every engine is
compared with), the float64 score, and the float64 map where the FP32 noise-floor rule can need
it (:func:`edgead.certify.rules.fp64_needed` semantics, restated here without importing the
certification layer). About 130 KB an image at 128² (6 MB for 48 images; 9 MB with an SSIM map's
float64), a quarter of that at 64², four times at 256².
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.core.contract import ANOMALY_MAP, SCORE
from edgead.core.golden import pack_masks, quantize_images, to_model_input, write_arrays
from edgead.core.manifest import GoldenSpec
from edgead.export.onnx_export import ExportError

GOLDEN_IMAGES, GOLDEN_NORMAL = 48, 32
FP32_MAP_BOUND, NOISE_FLOOR_FACTOR = 1e-4, 2.0  # edgead.certify.rules.TOLERANCES["fp32"]
NO_SOURCE = ("no normal images for the golden outputs: the run records no data set; pass --data ROOT --category C "
             "(its validation images), --golden-images DIR (normal images), or --no-golden (a bundle that can then "
             "be certified only against its training run)")


def _spaced(items: list[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, count).round().astype(int))]


def _source(meta: dict[str, Any], data_root: str | Path | None, category: str | None) -> Any:
    """The run's data source (MVTec or Folder layout), or None (synthetic or unrecorded data)."""
    from edgead.data.source import DataSource

    data = meta.get("data") or {}
    if data_root and category:
        return DataSource.mvtec(data_root, category)
    if data.get("layout") in ("mvtec", "folder"):
        return DataSource.from_dict(data)
    return None


def normal_images(meta: dict[str, Any], size: int, channels: int, count: int, data_root: str | Path | None,
                  category: str | None, folder: str | Path | None, n_val: int = 0) -> tuple[np.ndarray, str]:
    """(float images, where they came from): the run's validation split, or ``folder``."""
    from edgead.data.datasets import folder_samples, load_arrays

    data = meta.get("data") or {}
    if folder is not None:
        images, _, _ = load_arrays(_spaced(folder_samples(folder), count), size, channels, skip_bad=True)
        return images, f"{count if len(images) >= count else len(images)} images of {Path(folder).resolve()}"
    source, category = _source(meta, data_root, category), category or data.get("category")
    if source is not None and data.get("val_files"):
        val_files = set(data["val_files"])
        samples = [s for s in source.normal() if s.path.name in val_files]
        images, _, kept = load_arrays(_spaced(samples, count), size, channels, skip_bad=True)
        return images, f"validation split of {source.describe()} ({len(kept)} of {len(val_files)})"
    if data.get("layout") == "synthetic" and category:
        from edgead.data.images import to_model_input as convert
        from edgead.data.synth import sample

        n_val, seed = int(data.get("n_val") or n_val or count), int(data.get("seed") or 0)
        picks = _spaced(list(range(n_val)), count)
        images = np.stack([convert(sample(category, i, size=size, seed=seed, stream="val")[0], size, channels)
                           for i in picks])
        return images, f"synthetic {category} validation stream (seed {seed}, {len(picks)} of {n_val})"
    raise ExportError(NO_SOURCE)


def test_anomalies(meta: dict[str, Any], size: int, channels: int, count: int, data_root: str | Path | None,
                   category: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """Anomalous test images and their masks (empty without a test split, or without masks)."""
    from edgead.data.datasets import DatasetError, load_arrays

    source = _source(meta, data_root, category)
    empty = np.zeros((0, channels, size, size), np.float32), np.zeros((0, size, size), np.float32), ""
    if source is None or count <= 0:
        return empty
    try:
        samples = [s for s in source.test() if s.label == 1 and s.mask_path is not None]
    except DatasetError:
        return empty
    if not samples:
        return empty
    images, masks, kept = load_arrays(_spaced(samples, count), size, channels, skip_bad=True, with_masks=True)
    assert masks is not None
    return images, masks, f"{len(kept)} test-split anomalies of {source.describe()}"


def paint_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic anomaly: an ellipse of inverted, noisy tone blended into a (C, H, W) image."""
    _, h, w = image.shape
    axes = (int(rng.integers(max(2, w // 14), max(3, w // 6))), int(rng.integers(max(2, h // 14), max(3, h // 6))))
    centre = (int(rng.integers(axes[0], w - axes[0])), int(rng.integers(axes[1], h - axes[1])))
    mask = cv2.ellipse(np.zeros((h, w), np.uint8), centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    tone = 1.0 - image.mean(axis=(1, 2), keepdims=True) + rng.normal(0, 0.08, (1, h, w))
    alpha = float(rng.uniform(0.6, 0.9)) * mask[None].astype(np.float32)
    return np.clip(image * (1 - alpha) + tone * alpha, 0, 1).astype(np.float32), mask.astype(np.float32)


def painted_anomalies(normals: np.ndarray, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [paint_defect(normals[i % len(normals)], rng) for i in range(count)]
    if not pairs:
        return normals[:0], np.zeros((0, *normals.shape[-2:]), np.float32)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def write_golden(out: Path, run_dir: Path, meta: dict[str, Any], size: int, channels: int, *,
                 n_images: int = GOLDEN_IMAGES, n_normal: int = GOLDEN_NORMAL, data_root: str | Path | None = None,
                 category: str | None = None, folder: str | Path | None = None, n_val: int = 0) -> GoldenSpec:
    """Make the golden set of the run at ``run_dir`` and save it under ``out/golden/``."""
    import torch

    from edgead.training.reference import reference_outputs

    if n_normal < 1 or n_images <= n_normal:
        raise ExportError(f"golden outputs need at least one normal and one anomalous image "
                          f"(got --golden-count {n_images}, --golden-normal {n_normal})")
    normals, normal_source = normal_images(meta, size, channels, n_normal, data_root, category, folder, n_val)
    tested, tested_masks, test_source = test_anomalies(meta, size, channels, n_images - len(normals), data_root,
                                                       category)
    painted, painted_masks = painted_anomalies(normals, n_images - len(normals) - len(tested))
    sources = [s for s in (test_source, f"{len(painted)} painted on validation images" if len(painted) else "") if s]
    images = quantize_images(np.concatenate([normals, tested, painted]))
    masks = np.concatenate([np.zeros((len(normals), size, size), np.float32), tested_masks, painted_masks])
    labels = np.r_[np.zeros(len(normals)), np.ones(len(tested) + len(painted))].astype(np.uint8)
    x = to_model_input(images)
    ref = reference_outputs(run_dir, x)
    ref64 = reference_outputs(run_dir, x, torch.float64)
    arrays = {"images": images, "labels": labels, "masks": pack_masks(masks),
              "score": ref[SCORE].astype(np.float32), "anomaly_map": ref[ANOMALY_MAP].astype(np.float32),
              "score_fp64": ref64[SCORE].astype(np.float64)}
    delta = ref64[ANOMALY_MAP] - ref[ANOMALY_MAP].astype(np.float64)
    fp64_map = bool((NOISE_FLOOR_FACTOR + 1) * float(np.abs(delta).max(initial=0)) >= FP32_MAP_BOUND)
    if fp64_map:
        arrays["anomaly_map_fp64_delta"] = delta.astype(np.float32)
    files = write_arrays(out, arrays)
    size_mb = sum((out / rel).stat().st_size for rel in files.values()) / 1e6
    return GoldenSpec(files=files, n_images=int(len(images)), n_normal=int(len(normals)),
                      n_anomalous=int(labels.sum()), size_mb=round(size_mb, 3), normal_source=normal_source,
                      anomaly_source="; ".join(sources), reference=f"torch {torch.__version__} fp32 (CPU, eager) "
                      "of the training run, computed at export", fp64_map=fp64_map)
