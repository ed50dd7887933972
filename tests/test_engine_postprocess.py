"""Post-processing on the engine (``edgead export --postprocess``, ``edgead-run --postprocess
engine``): the exported smoothing and normalisation equal the host path (OpenCV's Gaussian with
BORDER_REFLECT, the calibration's normalisation), pass certification at FP32 and FP16, and give
the station the same verdicts and regions as post-processing on the host."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgead.core.calibration import Calibration  # noqa: E402
from edgead.core.contract import MAP_NORM, SCORE_NORM, SMOOTHED_MAP  # noqa: E402
from edgead.core.postprocess import smooth  # noqa: E402
from tests.bundles import SIZE  # noqa: E402


def _calibration(sigma: float) -> Calibration:
    return Calibration(image_threshold=0.3, pixel_threshold=0.4, score_min=0.1, score_max=0.5, map_min=0.0,
                       map_max=0.8, sigma=sigma, n_images=8, quantile=0.99, pixel_quantile=0.999)


@pytest.mark.parametrize("sigma,height,width", [(4.0, 32, 32), (2.0, 17, 40), (1.0, 5, 9), (0.0, 8, 8)])
def test_graph_smoothing_equals_opencv(sigma, height, width):
    import torch

    from edgead.models.postprocess_graph import PostprocessGraph

    cal = _calibration(sigma)
    graph = PostprocessGraph(cal, height, width).eval()
    rng = np.random.default_rng(int(sigma * 10) + height)
    amap = rng.random((2, 1, height, width), dtype=np.float32)
    amap[0, 0, : height // 2, : width // 3] += 3.0  # an edge the border handling must reflect
    score = np.array([0.05, 0.42], np.float32)
    with torch.no_grad():
        smoothed, score_norm, map_norm = (t.numpy() for t in graph(torch.from_numpy(score), torch.from_numpy(amap)))
    want = smooth(amap[:, 0], sigma)
    assert np.abs(smoothed[:, 0] - want).max() <= 2e-6 * (want.max() - want.min())
    np.testing.assert_allclose(score_norm, cal.normalize(score), atol=1e-6)
    np.testing.assert_allclose(map_norm[:, 0], cal.normalize_map(want), atol=1e-5)


def _post_bundle(root: Path) -> Path:
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample
    from edgead.export.bundle_writer import export_run
    from edgead.models import create
    from edgead.training.checkpoint import save_run
    from edgead.training.trainer import calibrate_detector

    detector = create("ssim_ae", image_size=SIZE, channels=3, width=8, latent_dim=16).eval()
    val = np.stack([to_model_input(sample("washer", i, size=SIZE, stream="val")[0], SIZE, 3) for i in range(8)])
    save_run(root / "run", detector, {"data": {"layout": "synthetic", "category": "washer"}},
             calibrate_detector(detector, val))
    return Path(export_run(root / "run", root / "bundle", precisions=["fp32", "fp16"], postprocess=True))


@pytest.fixture(scope="module")
def post_bundle(tmp_path_factory):
    return _post_bundle(tmp_path_factory.mktemp("post"))


def test_export_writes_detector_post_and_certifies_it(post_bundle):
    from edgead.certify.parity import certify_golden
    from edgead.core.bundle import load_bundle

    bundle = load_bundle(post_bundle)
    assert set(bundle.spec.graphs["detector_post"]) == {"fp32", "fp16"}
    assert bundle.manifest["engine_postprocess"]["sigma"] == bundle.calibration.sigma
    report = certify_golden(post_bundle, precisions=("fp32", "fp16"))
    for precision in ("fp32", "fp16"):
        stats = report["results"][f"onnxruntime/{precision} detector_post"]
        assert stats["pass"], stats["checks"]
        assert stats["checks"]["postprocess"] is True
        assert stats["postprocess"][SMOOTHED_MAP]["max_abs"] <= stats["postprocess"][SMOOTHED_MAP]["bound"]
        assert {SCORE_NORM, MAP_NORM} <= set(stats["postprocess"])
        assert report["results"][f"onnxruntime/{precision}"]["pass"]  # the plain graph is certified beside it


def test_a_wrong_smoothing_on_the_engine_fails_certification(post_bundle):
    """An engine whose smoothed map is off by more than the bound fails for that reason alone."""
    from edgead.certify.parity import postprocess_check
    from edgead.core.bundle import load_bundle
    from edgead.engines import open_engine

    bundle = load_bundle(post_bundle)
    engine = open_engine(bundle, precision="fp32", graph="detector_post")
    from edgead.core.golden import read_golden
    from edgead.certify.parity import run_engine

    images = read_golden(bundle.root, bundle.spec.golden).images[:4]
    got = run_engine(engine, images)
    engine.close()
    assert postprocess_check(got, bundle.calibration)["pass"]
    got[SMOOTHED_MAP] = smooth(got["anomaly_map"], bundle.calibration.sigma * 1.1)  # another sigma
    check = postprocess_check(got, bundle.calibration)
    assert not check["pass"] and not check[SMOOTHED_MAP]["pass"] and check[SCORE_NORM]["pass"]


def _run(bundle: Path, out: Path, where: str) -> tuple[list[dict], dict]:
    from edgead.runtime.cli import main

    rc = main(["synthetic://washer", "--model", str(bundle), "--frames", "12", "--results", str(out), "--quiet",
               "--postprocess", where, "--certify"])
    assert rc == 0
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if "verdict" in x], json.loads((out / "summary.json").read_text())


def test_station_gives_the_same_verdicts_and_regions_either_way(post_bundle, tmp_path):
    host, host_summary = _run(post_bundle, tmp_path / "host", "host")
    engine, engine_summary = _run(post_bundle, tmp_path / "engine", "engine")
    assert len(host) == len(engine) == 12
    assert any(a.get("regions") for a in host)  # the region comparison below is not vacuous
    assert host_summary["postprocess"] == "host" and engine_summary["postprocess"] == "engine"
    for a, b in zip(host, engine):
        assert a["verdict"] == b["verdict"] and a["score"] == pytest.approx(b["score"], rel=1e-6)
        assert [r["bbox"] for r in a.get("regions", [])] == [r["bbox"] for r in b.get("regions", [])]
        for ra, rb in zip(a.get("regions", []), b.get("regions", [])):
            assert ra["peak"] == pytest.approx(rb["peak"], abs=1e-4)


def test_engine_postprocess_needs_the_graph(tmp_path, capsys):
    from edgead.runtime.cli import main
    from tests.bundles import tiny_bundle

    bundle = tiny_bundle(tmp_path / "plain")
    rc = main(["synthetic://washer", "--model", str(bundle), "--frames", "2", "--results", str(tmp_path / "r"),
               "--postprocess", "engine"])
    assert rc != 0
    assert "edgead export --postprocess" in capsys.readouterr().err
