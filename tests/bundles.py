"""The small real bundle that the runtime, view and line-sink tests run: a random-init SSIM-AE
at 32², calibrated on normal synthetic parts, exported to ONNX with its golden outputs and
certified on this device from them: the same path a real bundle takes, in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SIZE = 32


def tiny_bundle(root: Path, category: str = "washer", n_val: int = 8) -> Path:
    """Build (once per folder) and certify the bundle under ``root``; returns the bundle folder."""
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    pytest.importorskip("torch")
    from edgead.certify.parity import certify_golden
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample
    from edgead.export.bundle_writer import export_run
    from edgead.models import create
    from edgead.training.checkpoint import save_run
    from edgead.training.trainer import calibrate_detector

    root.mkdir(parents=True, exist_ok=True)
    detector = create("ssim_ae", image_size=SIZE, channels=3, width=8, latent_dim=16).eval()
    val = np.stack([to_model_input(sample(category, i, size=SIZE, stream="val")[0], SIZE, 3) for i in range(n_val)])
    save_run(root / "run", detector, {"data": {"layout": "synthetic", "category": category}},
             calibrate_detector(detector, val))
    out = export_run(root / "run", bundle, precisions=["fp32"])
    report = certify_golden(out, precisions=("fp32",))
    assert report["results"]["onnxruntime/fp32"]["pass"], report["results"]["onnxruntime/fp32"]["checks"]
    return Path(out)
