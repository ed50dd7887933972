"""Shared by the station-view tests: a real small bundle (built once per session, on disk) and a
way to run ``edgead-run`` in a subprocess and find its view's URL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the model's input; frames are larger and resized by the pipeline
CATEGORY = "metal"
URL = re.compile(r"station view on (http://\S+/)")


def view_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init SSIM-AE at 32², calibrated on normal synthetic metal parts, exported to ONNX and
    certified for onnxruntime/fp32, as tests/test_runtime_e2e.py builds one; shared through the
    session's base temp folder, so both view test modules build it once."""
    root = tmp_path_factory.getbasetemp() / "view_bundle"
    bundle = root / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    pytest.importorskip("torch")
    from edgead.bench import certify_against_run
    from edgead.data.images import to_model_input
    from edgead.data.synth import Conveyor, sample
    from edgead.export.bundle_writer import export_run
    from edgead.models import create
    from edgead.training.checkpoint import save_run
    from edgead.training.trainer import calibrate_detector

    root.mkdir(parents=True, exist_ok=True)
    detector = create("ssim_ae", image_size=SIZE, channels=3, width=8, latent_dim=16).eval()
    val = np.stack([to_model_input(sample(CATEGORY, i, size=SIZE, stream="val")[0], SIZE, 3) for i in range(8)])
    save_run(root / "run", detector, {"data": {"layout": "synthetic", "category": CATEGORY}},
             calibrate_detector(detector, val))
    out = export_run(root / "run", bundle, precisions=["fp32"])
    parts = [Conveyor(CATEGORY, size=SIZE, seed=5, defect_rate=0.5)[i] for i in range(8)]
    images = np.concatenate([val, np.stack([to_model_input(p[0], SIZE, 3) for p in parts])])
    labels = np.r_[np.zeros(8, int), [int(p[2] is not None) for p in parts]]
    report = certify_against_run(out, images, None, labels, root / "run", precisions=("fp32",))
    assert report["results"]["onnxruntime/fp32"]["pass"]
    return Path(out)


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, **extra)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("DISPLAY", None)
    if "EDGEAD_VIEW_TOKEN" not in extra:  # a token in the tester's shell must not leak into a test
        e.pop("EDGEAD_VIEW_TOKEN", None)
    return e


class Station:
    """``edgead-run`` in a subprocess, its stderr in a file that is read for the view's URL."""

    def __init__(self, tmp: Path, *args: str, **environ: str) -> None:
        self.results = tmp / "results"
        self.stderr_path = tmp / "stderr.txt"
        self._stderr = open(self.stderr_path, "w")
        cmd = [sys.executable, "-m", "edgead.runtime.cli", *args, "--results", str(self.results)]
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env(**environ), stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def url(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout  # a loaded 2-core machine starts slowly
        while time.monotonic() < deadline:
            if match := URL.search(self.stderr()):
                return match.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no station view URL; stderr:\n{self.stderr()[-3000:]}")

    def wait(self, timeout: float = 60.0) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._stderr.close()
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
        self._stderr.close()
