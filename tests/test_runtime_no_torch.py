"""The station side runs a bundle with numpy, OpenCV and onnxruntime only: torch never loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys
import numpy as np
import edgead, edgead.core.bundle, edgead.engines, edgead.engines.ort_engine
import edgead.core.calibration, edgead.core.postprocess, edgead.data.images
from edgead.engines import open_engine

bundle = edgead.core.bundle.load_bundle(sys.argv[1])
engine = open_engine(bundle, "onnxruntime", "fp32")
image = np.random.default_rng(0).random(bundle.input_shape, dtype=np.float32)
out = engine.run({"image": image})
smoothed = edgead.core.postprocess.smooth(out["anomaly_map"][0, 0], bundle.calibration.sigma)
verdict = bundle.calibration.verdict(float(out["score"][0]))
engine.enqueue(1)
slot = engine.synchronize(1)
assert verdict in ("OK", "NG") and np.isfinite(smoothed).all() and set(slot) == {"score", "anomaly_map"}
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("no-torch-ok", verdict)
"""


def test_runtime_imports_and_runs_without_torch(tmp_path: Path) -> None:
    from edgead.core.calibration import calibrate
    from edgead.models import registry
    from edgead.training.checkpoint import save_run
    from edgead.export.bundle_writer import export_run

    detector = registry.create("ganomaly", image_size=32, width=8, latent_dim=16).eval()
    rng = np.random.default_rng(0)
    calibration = calibrate(rng.random(8), rng.random((8, 32, 32)))
    save_run(tmp_path / "run", detector, {"data": {"layout": "synthetic"}}, calibration)
    bundle = export_run(tmp_path / "run", tmp_path / "bundle", golden=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no-torch-ok" in proc.stdout
