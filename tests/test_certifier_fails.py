"""The certifier seen to fail: engines that are wrong in known ways FAIL at every precision, for
the reason the rules give; an engine inside the tolerance PASSES; and a certificate of another
backend or precision never unlocks an engine.

The wrong engines wrap the bundle's real ONNX Runtime engine of that precision and change its
outputs: a bias, noise, one verdict flipped across the threshold, one NaN. The checks are those
of :mod:`edgead.certify.rules`: at FP32 the map/score bounds, at FP16/INT8 the AUROC deltas, and
at every precision finiteness and the verdicts outside the band.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

from certify_support import PRECISIONS, multi_precision_bundle
from edgead.certify import certificate
from edgead.certify.parity import certify_engine, certify_golden
from edgead.core.bundle import load_bundle
from edgead.core.golden import read_golden
from edgead.engines import open_engine
from edgead.runtime.infer import BundleRefused, open_certified_engine

Change = Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(multi_precision_bundle(tmp_path_factory.mktemp("cert_fail")))


@pytest.fixture(scope="module")
def golden(bundle):
    """The bundle's golden images, masks and references, labelled here from the reference score:
    the top 20 anomalous, the bottom 20 normal, the 8 in the middle left out. A random-init model
    scores its images near-tied, and an AUROC on near-ties moves with rounding alone; with a gap
    between the classes every AUROC delta is the engine's doing. These tests exercise the
    certifier, not the model."""
    g = read_golden(bundle.root, bundle.spec.golden)
    order = np.argsort(g.reference["score"])
    keep = np.sort(np.concatenate([order[:20], order[-20:]]))
    labels = np.isin(keep, order[-20:]).astype(int)
    return SimpleNamespace(images=g.images[keep], masks=g.masks[keep], labels=labels,
                           reference={k: v[keep] for k, v in g.reference.items()},
                           reference64={k: v[keep] for k, v in g.reference64.items()})


class Changed:
    """An engine whose outputs are the real engine's, changed by ``change(image_index, outputs)``."""

    def __init__(self, inner, change: Change) -> None:
        self.inner, self.change, self.calls = inner, change, 0
        self.backend, self.precision = inner.backend, inner.precision
        self.inputs, self.outputs, self.num_slots = inner.inputs, inner.outputs, inner.num_slots

    def run(self, feeds):
        out = {k: np.array(v, np.float32, copy=True) for k, v in self.inner.run(feeds).items()}
        i, self.calls = self.calls, self.calls + 1
        return self.change(i, out)

    def close(self) -> None:
        self.inner.close()


def _certify(bundle, golden, precision: str, change: Change | None = None) -> dict:
    engine = open_engine(bundle, "onnxruntime", precision)
    try:
        wrapped = Changed(engine, change) if change else engine
        return certify_engine(bundle, wrapped, precision, golden.images, golden.masks, golden.labels,
                              golden.reference, golden.reference64)
    finally:
        engine.close()


def _failed(stats: dict) -> set[str]:
    return {k for k, ok in stats["checks"].items() if ok is False}


def _add(name: str, delta: Callable[[int, np.ndarray], np.ndarray]) -> Change:
    def change(i, out):
        out[name] = (out[name] + delta(i, out[name])).astype(np.float32)
        return out
    return change


def test_the_real_engines_pass_and_the_data_can_decide(bundle, golden):
    for precision in PRECISIONS:
        stats = _certify(bundle, golden, precision)
        assert stats["pass"], (precision, stats["checks"])
        assert stats["end"]["n_decisive"] >= 30 and golden.masks.max() > 0
        assert stats["end"]["image_auroc_ref"] == 1.0 and abs(stats["end"]["pixel_auroc_ref"] - 0.5) > 0.2


def test_fp32_inside_the_tolerance_passes(bundle, golden):
    rng = np.random.default_rng(0)
    stats = _certify(bundle, golden, "fp32", _add("anomaly_map", lambda i, m: rng.normal(0, 1e-6, m.shape)))
    assert stats["pass"], stats["checks"]
    assert 0 < stats["anomaly_map"]["max_abs"] <= 1e-4 and stats["score"]["max_rel"] <= 1e-4


@pytest.mark.parametrize("precision", PRECISIONS)
def test_score_bias_fails_on_the_verdicts(bundle, golden, precision):
    cal = bundle.calibration
    bias = 2.0 * (cal.score_max - cal.score_min)  # every part ends above the threshold
    stats = _certify(bundle, golden, precision, _add("score", lambda i, s: np.full_like(s, bias)))
    assert not stats["pass"]
    want = {"score_max_rel", "verdict_agreement"} if precision == "fp32" else {"verdict_agreement"}
    assert _failed(stats) == want, stats["checks"]  # a shift keeps the image AUROC: only verdicts move
    assert stats["end"]["n_flips_outside_band"] > 0


def test_fp32_map_bias_fails_the_map_bound_alone(bundle, golden):
    stats = _certify(bundle, golden, "fp32", _add("anomaly_map", lambda i, m: np.full_like(m, 1e-2)))
    assert not stats["pass"] and _failed(stats) == {"map_max_abs"}, stats["checks"]
    assert stats["anomaly_map"]["max_abs"] == pytest.approx(1e-2, abs=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_map_bias_is_what_reduced_precision_may_do(bundle, golden, precision):
    """A constant offset of the map changes no pixel ranking and no verdict: FP16/INT8 pass."""
    stats = _certify(bundle, golden, precision, _add("anomaly_map", lambda i, m: np.full_like(m, 1e-2)))
    assert stats["pass"], stats["checks"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_map_noise_fails_for_the_map(bundle, golden, precision):
    rng = np.random.default_rng(1)
    stats = _certify(bundle, golden, precision, _add("anomaly_map", lambda i, m: rng.normal(0, 0.5, m.shape)))
    assert not stats["pass"]
    assert _failed(stats) == ({"map_max_abs"} if precision == "fp32" else {"pixel_auroc"}), stats["checks"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_score_noise_fails_the_image_auroc(bundle, golden, precision):
    cal = bundle.calibration
    rng = np.random.default_rng(2)
    spread = 3.0 * (cal.score_max - cal.score_min)
    stats = _certify(bundle, golden, precision, _add("score", lambda i, s: rng.normal(0, spread, s.shape)))
    assert not stats["pass"] and "image_auroc" in _failed(stats), stats["checks"]


def _nearest_decisive(bundle, golden, precision: str) -> int:
    """The decisive image (outside the band) whose reference score lies nearest the threshold."""
    from edgead.certify.rules import band

    t, ref = bundle.calibration.image_threshold, golden.reference["score"]
    dist = np.abs(ref - t)
    dist[dist <= band(bundle.calibration, precision)] = np.inf
    return int(np.argmin(dist))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_verdict_flipped_at_the_threshold_fails(bundle, golden, precision):
    t = bundle.calibration.image_threshold
    k = _nearest_decisive(bundle, golden, precision)
    mirrored = 2 * t - float(golden.reference["score"][k])  # the same distance, the other side

    def flip(i, out):
        if i == k:
            out["score"] = np.full_like(out["score"], mirrored)
        return out

    stats = _certify(bundle, golden, precision, flip)
    assert not stats["pass"] and "verdict_agreement" in _failed(stats), stats["checks"]
    assert stats["end"]["n_flips_outside_band"] == 1 and stats["end"]["flips_outside_band"][0]["index"] == k
    if precision != "fp32":  # one image moved: the AUROC deltas stay inside their tolerance
        assert _failed(stats) == {"verdict_agreement"}, stats["checks"]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("output", ["anomaly_map", "score"])
def test_one_nan_fails_as_not_finite(bundle, golden, precision, output):
    def nan(i, out):
        if i == 3:
            out[output].reshape(-1)[0] = np.nan
        return out

    stats = _certify(bundle, golden, precision, nan)
    assert not stats["pass"] and "finite" in _failed(stats), stats["checks"]


# ------------------------------------------------------------------ certificates
@pytest.fixture()
def own_bundle(bundle, tmp_path):
    """A private copy: these tests write certificates beside its graphs."""
    shutil.copytree(bundle.root, tmp_path / "b")
    return load_bundle(tmp_path / "b")


def test_a_certificate_lists_only_its_own_precision_and_backend(own_bundle):
    report = certify_golden(own_bundle, precisions=("fp32",))
    assert report["results"]["onnxruntime/fp32"]["pass"]
    assert len(certificate.certificates_for(own_bundle, "onnxruntime", "fp32")) == 1
    for backend, precision in (("onnxruntime", "fp16"), ("onnxruntime", "int8"), ("tensorrt", "fp32")):
        assert certificate.certificates_for(own_bundle, backend, precision) == []


def test_a_passing_certificate_of_another_precision_does_not_unlock_an_engine(own_bundle, capsys):
    certify_golden(own_bundle, precisions=("fp32",))
    (fp32_cert,) = certificate.certificates_for(own_bundle, "onnxruntime", "fp32")
    assert json.loads(fp32_cert.read_text())["pass"] is True
    for precision in ("fp16", "int8"):
        engine = open_engine(own_bundle, "onnxruntime", precision)
        target = certificate.certificate_path(own_bundle, precision, certificate.device_of(engine))
        engine.close()
        shutil.copy(fp32_cert, target)  # the right name for this precision, the body of FP32's
        with pytest.raises(BundleRefused, match="fp32|precision"):
            open_certified_engine(str(own_bundle.root), "onnxruntime", precision, certify="never", warn=print)
    bundle, engine, status = open_certified_engine(str(own_bundle.root), "onnxruntime", "fp32", certify="never")
    assert status["status"] == "certified"
    engine.close()


def _tensorrt_double():
    return SimpleNamespace(backend="tensorrt", backend_version="10.3.0", device_name="Orin (nvgpu)",
                           compute_capability="87", plan_sha256="ab" * 32)


def test_a_passing_certificate_of_another_backend_does_not_unlock_an_engine(own_bundle):
    summary = {"pass": True, "checks": {"finite": True}}
    path = certificate.write_certificate(own_bundle, _tensorrt_double(), "fp32", summary)
    assert ".tensorrt." in path.name and json.loads(path.read_text())["pass"] is True
    with pytest.raises(BundleRefused, match="no parity certificate"):
        open_certified_engine(str(own_bundle.root), "onnxruntime", "fp32", certify="never")
    # renamed to this backend's file name: still TensorRT's certificate, still refused
    engine = open_engine(own_bundle, "onnxruntime", "fp32")
    shutil.copy(path, certificate.certificate_path(own_bundle, "fp32", certificate.device_of(engine)))
    engine.close()
    with pytest.raises(BundleRefused, match="tensorrt|made on"):
        open_certified_engine(str(own_bundle.root), "onnxruntime", "fp32", certify="never")


def test_image_auroc_ignores_near_tie_swaps_but_not_decisive_ones():
    """On a small set one swapped near-tie moves the image AUROC by 1/(n_pos x n_neg), above the
    INT8 tolerance: the check lets it through only when no pair outside the band changed order."""
    from edgead.certify.parity import pair_swaps
    from edgead.certify.rules import checks

    labels = np.array([0, 0, 0, 1, 1])
    ref = np.array([0.10, 0.20, 0.500, 0.501, 0.90])
    near_tie = np.array([0.10, 0.20, 0.502, 0.500, 0.90])  # the 0.500 / 0.501 pair swaps
    decisive = np.array([0.10, 0.95, 0.500, 0.501, 0.90])  # normal 0.20 jumps above anomalous 0.90
    assert pair_swaps(labels, ref, near_tie, width=0.01) == 0  # inside the band: not counted
    assert pair_swaps(labels, ref, near_tie, width=0.0) == 1
    assert pair_swaps(labels, ref, decisive, width=0.01) == 2

    def int8_checks(swaps: int, delta: float) -> dict:
        end = {"delta_image_auroc": delta, "delta_pixel_auroc": 0.0, "n_pair_swaps_outside_band": swaps,
               "n_decisive": 40, "verdict_agreement": 1.0}
        finite = {"finite": True}
        return checks({"end": end, "score": finite, "anomaly_map": finite}, "int8")

    assert int8_checks(0, -1 / 6)["image_auroc"] is True
    assert int8_checks(2, -1 / 3)["image_auroc"] is False
    assert int8_checks(1, 0.005)["image_auroc"] is True  # within the tolerance anyway
