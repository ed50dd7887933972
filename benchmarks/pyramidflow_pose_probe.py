"""Is PyramidFlow's map driven by the parts' pose? Normal validation images only.

    python -m benchmarks.pyramidflow_pose_probe --categories fabric washer pcb --epochs 10 \
        --out results/pyramidflow_pose_probe.json

PyramidFlow compares each image's latent pyramid with one *pixel-aligned* template (the mean latent
of the training images). The synthetic washers and boards are placed with a few pixels of pose
jitter; the textures (fabric, metal, wood) have no pose. For each category this trains PyramidFlow
briefly (``--epochs``, the quality table's CPU settings), then, on the normal validation images:

* ``map_vs_pose_r``: Pearson r between the mean anomaly map of the normal images and the per-pixel
  standard deviation of the training images (where the pose jitter moves edges);
* ``shift_auroc``: image AUROC of the normal images translated by ``--shift`` px (still normal
  parts, inside the training jitter for the objects) against the same images untranslated. 0.5: the
  score ignores the shift; near 1: a small shift alone looks like a defect.

No test image is read.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _shifted(images: np.ndarray, shift: int) -> np.ndarray:
    """Translate by ``shift`` px right and down, repeating the border (what a camera offset does)."""
    padded = np.pad(images, ((0, 0), (0, 0), (shift, 0), (shift, 0)), mode="edge")
    return padded[:, :, :images.shape[2], :images.shape[3]]


def probe_category(data_root: Path, work: Path, category: str, size: int, epochs: int, shift: int) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    from benchmarks.quality import CPU_OVERRIDES, load_category
    from edgead.training.checkpoint import load_run

    run = work / f"run-{category}"
    overrides = [f"{k}={v}" for k, v in CPU_OVERRIDES["pyramidflow"].items()]
    subprocess.run([sys.executable, "-m", "edgead.cli", "train", "--data", str(data_root), "--category", category,
                    "--model", "pyramidflow", "--image-size", str(size), "--epochs", str(epochs),
                    "--set", *overrides, "--out", str(run)], check=True, stdout=subprocess.DEVNULL)
    detector, _, _ = load_run(run)
    data = load_category(data_root, category, size)
    with torch.no_grad():
        scores, maps = detector(torch.from_numpy(data["val"]))
        moved, _ = detector(torch.from_numpy(_shifted(data["val"], shift)))
    pose = data["train"].mean(axis=1).std(axis=0).ravel()  # grey level spread per pixel
    mean_map = maps[:, 0].mean(dim=0).numpy().ravel()
    labels = np.r_[np.zeros(len(scores)), np.ones(len(moved))]
    row = {"category": category, "epochs": epochs, "shift_px": shift,
           "map_vs_pose_r": float(np.corrcoef(mean_map, pose)[0, 1]),
           "shift_auroc": float(roc_auc_score(labels, np.r_[scores.numpy(), moved.numpy()]))}
    print(row, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import write_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", nargs="*", default=["fabric", "washer", "pcb"])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--shift", type=int, default=3)
    p.add_argument("--out", default="results/pyramidflow_pose_probe.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edgead-pfpose-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "edgead.cli", "synth", "--out", str(work / "data"), "--categories",
                        *args.categories, "--image-size", str(args.image_size)], check=True, stdout=subprocess.DEVNULL)
        rows = [probe_category(work / "data", work, c, args.image_size, args.epochs, args.shift)
                for c in args.categories]
    write_report(args.out, {"selection": "normal validation images only; no test image", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
