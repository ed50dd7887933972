"""A small bundle at every precision (FP32, FP16, INT8) with its golden outputs, for the tests of
the certifier itself: a seeded random-init SSIM-AE at 32² with the L1 map, calibrated on normal
synthetic parts. Built in seconds; nothing is certified here, the tests decide what they certify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SIZE = 32
PRECISIONS = ("fp32", "fp16", "int8")


def multi_precision_bundle(root: Path, n_val: int = 8) -> Path:
    """Build (once per folder) the bundle under ``root``; returns the bundle folder."""
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    pytest.importorskip("torch")
    import cv2

    from edgead.data.images import to_model_input
    from edgead.data.synth import sample
    from edgead.export.bundle_writer import export_run
    from edgead.models import create
    from edgead.training.checkpoint import save_run
    from edgead.training.trainer import calibrate_detector

    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib"
    calib.mkdir(exist_ok=True)
    for i in range(8):  # INT8 calibration images: normal parts of the training stream
        cv2.imwrite(str(calib / f"{i}.png"), cv2.cvtColor(sample("washer", i, size=SIZE, stream="train")[0],
                                                          cv2.COLOR_RGB2BGR))
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)  # the same weights, so the same scores, on every run
    detector = create("ssim_ae", image_size=SIZE, channels=3, width=8, latent_dim=16, scorer="l1").eval()
    val = np.stack([to_model_input(sample("washer", i, size=SIZE, stream="val")[0], SIZE, 3) for i in range(n_val)])
    run = save_run(root / "run", detector, {"data": {"layout": "synthetic", "category": "washer"}},
                   calibrate_detector(detector, val))
    return Path(export_run(run, bundle, precisions=PRECISIONS, calib_images=calib, calib_count=8))
