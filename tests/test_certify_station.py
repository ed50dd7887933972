"""Certification on the station: golden outputs in the bundle, certificates bound to the device,
``edgead-run --certify``, ``edgead eval`` on an engine.

One small SSIM-AE (32², 2 epochs on synthetic washers) is exported at FP32, FP16 and INT8 with its
golden outputs; live-PyTorch certification and the torch run's evaluation are taken first, then
the training run is deleted: everything after that works from the bundle alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edgead.certify import certificate  # noqa: E402
from edgead.core.bundle import load_bundle  # noqa: E402
from edgead.core.golden import read_golden, to_model_input  # noqa: E402
from edgead.runtime.cli import main as run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
PRECISIONS = ("fp32", "fp16", "int8")


def fresh(station: dict, tmp_path: Path) -> Path:
    """A copy of the exported bundle, without any certificate."""
    dst = tmp_path / "bundle"
    shutil.copytree(station["bundle"], dst, ignore=shutil.ignore_patterns("*.cert.json"))
    return dst


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("DISPLAY", None)
    return env


def run_args(bundle: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["synthetic://washer", "--model", str(bundle), "--frames", "3", "--results", str(tmp_path / "r"),
            "--headless", "--overwrite", *extra]


# -- the golden outputs --------------------------------------------------------------------------

def test_golden_outputs_are_in_the_bundle_checksummed_and_torch_exact(station):
    bundle = load_bundle(station["bundle"])
    spec = bundle.spec.golden
    assert spec.n_images == 48 and spec.n_normal + spec.n_anomalous == 48
    assert "validation split" in spec.normal_source and "test-split anomalies" in spec.anomaly_source
    for rel in spec.files.values():
        assert rel in bundle.spec.files and rel.endswith(".npy")
        np.load(bundle.root / rel, allow_pickle=False)  # plain arrays, no pickle
    size = sum((bundle.root / rel).stat().st_size for rel in spec.files.values()) / 1e6
    assert abs(spec.size_mb - size) < 1e-3 and size < 3
    golden = read_golden(bundle.root, spec)
    assert golden.images.dtype == np.float32 and golden.images.shape == (48, 3, SIZE, SIZE)
    normal, anomalous = golden.labels == 0, golden.labels == 1
    assert golden.masks[normal].sum() == 0 and all(m.sum() > 0 for m in golden.masks[anomalous])
    # the stored reference is the run's PyTorch FP32 output on exactly these inputs
    np.testing.assert_array_equal(golden.reference["score"], station["live_ref"]["score"].astype(np.float32))
    np.testing.assert_array_equal(golden.reference["anomaly_map"], station["live_ref"]["anomaly_map"])
    # SSIM maps: FP32 is far enough from float64 that the noise-floor rule may be needed
    assert spec.fp64_map and "anomaly_map" in golden.reference64
    assert 1e-6 < np.abs(golden.reference64["anomaly_map"] - golden.reference["anomaly_map"]).max() < 1e-2


def test_uint8_inputs_are_bit_identical():
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    a, b = to_model_input(images), to_model_input(images.copy())
    assert a.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert a.max() <= 1.0 and a.min() >= 0.0


# -- certification without torch -----------------------------------------------------------------

CHILD = r"""
import json, sys
sys.modules["torch"] = None  # any import of torch now fails
from edgead.bench import parity_main
rc = parity_main([sys.argv[1], "--backend", "onnxruntime", "--precision", "fp32", "fp16", "int8",
                  "--out", sys.argv[2]])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m] is not None)
print("CHILD_RC", rc)
"""


def test_certifies_without_torch_or_run_with_the_verdicts_of_live_torch(station, tmp_path):
    bundle = fresh(station, tmp_path)
    assert not station["run"].exists()
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(out)], cwd=tmp_path, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert "CHILD_RC" in proc.stdout, proc.stderr[-3000:]
    golden = json.loads(out.read_text())
    assert golden["reference"].startswith("torch") and "golden outputs" in golden["data"]
    for precision in PRECISIONS:
        key = f"onnxruntime/{precision}"
        g, live = golden["results"][key], station["live"]["results"][key]
        assert g["pass"] == live["pass"] and g["checks"] == live["checks"], key
        for field in ("n_decisive", "n_flips_outside_band", "n_flips_in_band"):
            assert g["end"][field] == live["end"][field], (key, field)
        assert [f["index"] for f in g["end"]["flips_in_band"]] == [f["index"] for f in live["end"]["flips_in_band"]]
        assert g["end"]["delta_image_auroc"] == pytest.approx(live["end"]["delta_image_auroc"], abs=1e-9)
        assert Path(g["certificate"]).is_file()  # this device's certificate, beside the graph
    assert golden["results"]["onnxruntime/fp32"]["pass"]
    assert int(proc.stdout.split("CHILD_RC")[1]) == (0 if all(r["pass"] for r in golden["results"].values()) else 1)
    # certificates are not part of the checksummed bundle: it still verifies
    load_bundle(bundle)


def test_band_rule_reports_rounding_flips_apart():
    from edgead.certify.rules import band, flip_rate_upper, verdict_agreement
    from edgead.core.calibration import Calibration

    cal = Calibration(image_threshold=1.0, score_min=0.5, score_max=1.5, pixel_threshold=0.1, map_min=0.0,
                      map_max=1.0, n_images=40, quantile=0.99, pixel_quantile=0.999)
    assert band(cal, "fp16") == pytest.approx(0.01)  # 1% of the validation range 1.0
    ref = np.r_[np.linspace(0.5, 0.95, 30), 1.0 + 1e-6, 1.2]  # one image a hair above the threshold
    got = ref.copy()
    got[30] = 1.0 - 1e-6  # rounding flip, inside the band
    result = verdict_agreement(ref, got, cal, "fp16")
    assert result["n_flips_in_band"] == 1 and result["n_flips_outside_band"] == 0
    assert result["verdict_agreement"] == 1.0 and result["n_decisive"] == 31
    got[31] = 0.9  # a real flip, 0.2 from the threshold
    result = verdict_agreement(ref, got, cal, "fp16")
    assert result["n_flips_outside_band"] == 1 and result["verdict_agreement"] == pytest.approx(30 / 31)
    assert flip_rate_upper(0, 30) == pytest.approx(0.0950, abs=1e-3)  # ~3/n, the rule of three
    assert flip_rate_upper(1, 31) > flip_rate_upper(0, 31)


# -- certificates bound to the device ------------------------------------------------------------

def test_certificate_of_another_device_is_refused_naming_both(station, tmp_path, capsys, monkeypatch):
    bundle = fresh(station, tmp_path)
    assert run_main(run_args(bundle, tmp_path)) == 0  # certifies here (auto: no certificate yet)
    capsys.readouterr()
    made_here = json.loads(next(bundle.glob("detector.fp32.onnxruntime.*.cert.json")).read_text())
    assert made_here["pass"] and made_here["device"]["backend_version"] and made_here["device"]["detail"]
    here_cpu = made_here["device"]["name"]
    monkeypatch.setattr(certificate, "cpu_fingerprint", lambda: ("Fake Station CPU", "asimd asimddp"))
    assert run_main(run_args(bundle, tmp_path)) == 4
    err = capsys.readouterr().err
    assert here_cpu in err and "Fake Station CPU" in err  # both devices named
    assert "--certify" in err and "edgead bench parity" in err  # and the command to run
    assert run_main(run_args(bundle, tmp_path, "--certify")) == 0  # certified on the "new" device
    assert len(list(bundle.glob("detector.fp32.onnxruntime.*.cert.json"))) == 2


def test_edgead_run_certify_certifies_then_runs(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    assert run_main(run_args(bundle, tmp_path, "--no-certify")) == 4
    assert "no parity certificate for onnxruntime/fp32" in capsys.readouterr().err
    assert not list(bundle.glob("*.cert.json"))
    assert run_main(run_args(bundle, tmp_path, "--certify")) == 0
    err = capsys.readouterr().err
    assert "certifying onnxruntime/fp32" in err and "certification PASS in" in err and "decisive images" in err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["frames"]["inspected"] == 3
    cert = json.loads(next(bundle.glob("detector.fp32.onnxruntime.*.cert.json")).read_text())
    assert cert["manifest_digest"] == load_bundle(bundle).digest and cert["hmac"]
    assert run_main(run_args(bundle, tmp_path)) == 0  # and the certificate is used next time
    assert "certifying" not in capsys.readouterr().err


def test_hand_edited_certificate_is_refused(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    assert run_main(run_args(bundle, tmp_path, "--certify")) == 0
    path = next(bundle.glob("detector.fp32.onnxruntime.*.cert.json"))
    cert = json.loads(path.read_text())
    path.write_text(json.dumps({**cert, "pass": False, "checks": {**cert["checks"], "map_max_abs": False}}))
    capsys.readouterr()
    assert run_main(run_args(bundle, tmp_path)) == 4
    assert "edited after it was made" in capsys.readouterr().err
    # a failing certificate made "passing" by hand: the same
    assert run_main(run_args(bundle, tmp_path, "--certify", "--precision", "int8")) in (0, 4)
    int8 = next(bundle.glob("detector.int8.onnxruntime.*.cert.json"))
    record = json.loads(int8.read_text())
    int8.write_text(json.dumps({**record, "pass": not record["pass"]}))
    capsys.readouterr()
    assert run_main(run_args(bundle, tmp_path, "--precision", "int8")) == 4
    assert "edited after it was made" in capsys.readouterr().err


def test_certificate_of_another_export_is_refused(station, tmp_path, capsys):
    bundle = fresh(station, tmp_path)
    assert run_main(run_args(bundle, tmp_path, "--certify")) == 0
    cert = next(bundle.glob("detector.fp32.onnxruntime.*.cert.json"))
    other = fresh(station, tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    from edgead.core.manifest import manifest_digest

    manifest["created"] = "2000-01-01T00:00:00+00:00"  # another export of the same run
    manifest["digest"] = manifest_digest(manifest)
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.copy(cert, other / cert.name)
    capsys.readouterr()
    assert run_main(run_args(other, tmp_path)) == 4
    assert "another export" in capsys.readouterr().err


def test_tensorrt_certificate_is_bound_to_the_engine_file(station, tmp_path, monkeypatch):
    import test_tensorrt_contract as double

    from edgead.certify.parity import certify_golden
    from edgead.engines import open_engine, tensorrt_engine

    cuda = double.FakeCudaRuntime()
    fake = double.FakeTensorRT(cuda, version="11.4.1")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    monkeypatch.setattr(tensorrt_engine, "_LOGGERS", {})
    bundle = fresh(station, tmp_path)
    report = certify_golden(bundle, backends=("tensorrt",), precisions=("fp32",))
    stats = report["results"]["tensorrt/fp32"]
    assert "GPU Orin (nvgpu) [sm87]" in stats["device"] and "tensorrt 11.4.1" in stats["device"]
    cert = json.loads(Path(stats["certificate"]).read_text())
    b = load_bundle(bundle)
    engine = open_engine(b, "tensorrt", "fp32")
    assert cert["engine_sha256"] == engine.plan_sha256
    assert cert["pass"] and certificate.find_certificate(b, engine, "fp32").problem is None
    engine.plan_sha256 = "0" * 64  # as if TensorRT rebuilt the plan since
    assert "another engine file" in certificate.find_certificate(b, engine, "fp32").problem
    engine.close()
    cuda.gpu = SimpleNamespace(name=b"NVIDIA Jetson AGX Thor", major=11, minor=0)
    engine = open_engine(b, "tensorrt", "fp32")
    finding = certificate.find_certificate(b, engine, "fp32")
    assert finding.others == ["tensorrt 11.4.1 on GPU Orin (nvgpu) [sm87]"]
    assert "of this device" in finding.problem and "Thor" in certificate.device_of(engine).label
    engine.close()


# -- edgead eval on an engine --------------------------------------------------------------------

def test_eval_of_the_onnx_engine_gives_the_torch_runs_metrics_and_figures(station, tmp_path):
    from edgead.cli import main as edgead_main

    out = tmp_path / "eval"
    assert edgead_main(["eval", str(station["bundle"]), "--backend", "onnxruntime", "--precision", "fp32",
                        "--data", str(station["data"]), "--category", "washer", "--out", str(out)]) == 0
    got, ref = json.loads((out / "metrics.json").read_text()), station["torch_eval"]
    assert got["engine"] == "onnxruntime/fp32" and ref["engine"] == "torch/fp32"
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_auprc"):
        assert got[key] == pytest.approx(ref[key], abs=2e-3), key
    # the same verdicts at the stored threshold, but for parts a rounding error away from it
    threshold = load_bundle(station["bundle"]).calibration.image_threshold
    near = int(np.sum(np.abs(station["test_scores"] - threshold) <= 1e-4 * abs(threshold)))
    moved = sum(abs(got["f1"][k] - ref["f1"][k]) for k in ("tp", "fp", "tn", "fn")) // 2
    assert moved <= near, (got["f1"], ref["f1"], near)
    assert (out / "roc.png").stat().st_size > 0 and (out / "overlays.png").stat().st_size > 0
    assert set(got) == set(ref) - {"run"} | {"bundle"}
