"""Golden outputs: the certification set inside a bundle, readable with numpy alone.

``edgead export`` writes ``golden/*.npy`` (never pickle: every file is read with
``allow_pickle=False``); a station certifies its engine against them without torch or the
training run (:mod:`edgead.certify.parity`).

Arrays (N images; the manifest's ``golden`` section states N, the sources and the size in MB):

=========================  =====================  ==============================================
``images``                 uint8 (N, C, H, W)     the engine input is exactly ``images / 255``
                                                  in float32 (:func:`to_model_input`)
``labels``                 uint8 (N,)             0 normal (validation), 1 anomalous
``masks``                  uint8 (N, H, ceil(W/8)) ground truth, bit-packed along W
``score``                  float32 (N,)           PyTorch FP32 score of the training run
``anomaly_map``            float32 (N, H, W)      PyTorch FP32 raw map (before smoothing)
``score_fp64``             float64 (N,)           the same model evaluated in float64
``anomaly_map_fp64_delta`` float32 (N, H, W)      float64 map minus the FP32 map; written only
                                                  where the FP32 noise-floor rule can need it
=========================  =====================  ==============================================

The images are stored as 8-bit and the reference outputs are computed on their float32
conversion, so engine and reference see bit-identical inputs. The float64 map is stored as its
(small) difference from the FP32 map in float32: the difference is below 1e-3, so float32 keeps
it to ~1e-10, far below the 1e-4 FP32 bound it serves, at half the size of a float64 array.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgead.core.contract import ANOMALY_MAP, SCORE
from edgead.core.manifest import BundleError, GoldenSpec

FOLDER = "golden"
ARRAYS = ("images", "labels", "masks", "score", "anomaly_map", "score_fp64", "anomaly_map_fp64_delta")
REQUIRED = ARRAYS[:-1]


def to_model_input(images_u8: np.ndarray) -> np.ndarray:
    """The engine input of 8-bit golden images: float32 in [0, 1], bit-identical everywhere."""
    return np.asarray(images_u8, np.uint8).astype(np.float32) / np.float32(255.0)


def quantize_images(images: np.ndarray) -> np.ndarray:
    """float [0, 1] (N, C, H, W) -> the uint8 images stored (round to nearest)."""
    return np.clip(np.rint(np.asarray(images, np.float64) * 255.0), 0, 255).astype(np.uint8)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(masks) > 0.5, axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    return np.unpackbits(np.asarray(packed, np.uint8), axis=-1)[..., :width].astype(np.float32)


@dataclass
class GoldenSet:
    """The golden arrays, ready for certification: float32 images and the references."""

    images: np.ndarray  # float32 (N, C, H, W)
    labels: np.ndarray  # int (N,)
    masks: np.ndarray  # float32 (N, H, W) in {0, 1}
    reference: dict[str, np.ndarray]  # score (N,) float64, anomaly_map (N, H, W) float32
    reference64: dict[str, np.ndarray]  # score (N,), and anomaly_map (N, H, W) where stored; float64
    spec: GoldenSpec

    @property
    def description(self) -> str:
        return (f"golden outputs: {self.spec.n_normal} normal ({self.spec.normal_source}) + "
                f"{self.spec.n_anomalous} anomalous ({self.spec.anomaly_source}) images")


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Save each array as ``golden/<name>.npy``; returns name -> path relative to the bundle."""
    target = folder / FOLDER
    target.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        if name not in ARRAYS:
            raise ValueError(f"unknown golden array {name!r}")
        np.save(target / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        files[name] = f"{FOLDER}/{name}.npy"
    return files


def _load(root: Path, rel: str) -> np.ndarray:
    path = root / rel
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable golden array ({exc}); re-export the bundle") from exc


def read_golden(root: Path, spec: GoldenSpec | None) -> GoldenSet:
    """The golden set of the bundle at ``root`` (its files were checksum-verified on load)."""
    if spec is None:
        raise BundleError(f"{root}: the bundle has no golden outputs (exported with --no-golden); certify it "
                          "against its training run with `edgead bench parity BUNDLE --against-run RUN`, "
                          "or re-export it with golden outputs")
    missing = [name for name in REQUIRED if name not in spec.files]
    if missing:
        raise BundleError(f"{root}: golden outputs lack {missing}; re-export the bundle")
    a = {name: _load(root, rel) for name, rel in spec.files.items()}
    images = to_model_input(a["images"])
    n, _, h, w = images.shape
    expect = {"labels": (n,), "masks": (n, h, (w + 7) // 8), "score": (n,), "anomaly_map": (n, h, w),
              "score_fp64": (n,), "anomaly_map_fp64_delta": (n, h, w)}
    for name, shape in expect.items():
        if name in a and a[name].shape != shape:
            raise BundleError(f"{root / spec.files[name]}: shape {a[name].shape}, expected {shape}; re-export")
    if n != spec.n_images or int(a["labels"].sum()) != spec.n_anomalous:
        raise BundleError(f"{root}: golden arrays hold {n} images / {int(a['labels'].sum())} anomalous, the "
                          f"manifest says {spec.n_images} / {spec.n_anomalous}; re-export the bundle")
    amap = a["anomaly_map"].astype(np.float32)
    ref64 = {SCORE: a["score_fp64"].astype(np.float64)}
    if "anomaly_map_fp64_delta" in a:
        ref64[ANOMALY_MAP] = amap.astype(np.float64) + a["anomaly_map_fp64_delta"].astype(np.float64)
    return GoldenSet(images, a["labels"].astype(int), unpack_masks(a["masks"], w),
                     {SCORE: a["score"].astype(np.float64), ANOMALY_MAP: amap}, ref64, spec)
