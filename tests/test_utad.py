"""UTAD: both training stages, the exported graph against ONNX Runtime, the impression-only mode."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from edgead.models import create, get
from edgead.models.base import TrainConfig, run_components

TINY = {"width": 8, "latent_dim": 16, "ie_hidden": 32, "mlp_dim": 32, "expert_down": 2, "expert_res": 1}


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth stripes with a random phase and a little noise: 'normal' parts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        base = 0.5 + 0.3 * np.sin(2 * np.pi * 3 * xx + phase) * np.cos(2 * np.pi * yy)
        img = np.stack([base, base * 0.8 + 0.1, 1.0 - base]) + rng.normal(0, 0.02, (3, size, size))
        out.append(np.clip(img, 0, 1))
    return np.asarray(out, np.float32)


@pytest.fixture(autouse=True)
def _quiet_random_vgg():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM VGG-19 features.*")
        yield


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from edgead.training.trainer import train_from_arrays

    out = tmp_path_factory.mktemp("utad_run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train = TrainConfig(epochs=1, batch_size=4, extra={"epochs_ie": 1, "epochs_expert": 1})
        return train_from_arrays("utad", _images(8), _images(4, seed=1), out, config=dict(TINY), train=train,
                                 progress=False)


def test_trains_both_stages(trained_run):
    history = json.loads((trained_run / "history.json").read_text())
    assert [h["stage"] for h in history] == ["ie", "expert"]
    assert all(math.isfinite(h[k]) for h in history for k in ("rec",))
    assert {"mi", "kl", "ie"} <= set(history[0]) and {"naive", "detail", "expert"} <= set(history[1])


def test_export_matches_onnxruntime(trained_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from edgead.training.checkpoint import load_run

    detector, _, _ = load_run(trained_run)
    assert [c.name for c in detector.components()] == ["ie_encoder", "ie_decoder", "expert", "head"]
    image = torch.from_numpy(_images(1, seed=2))
    with torch.no_grad():
        score, anomaly_map = detector(image)
    assert score.shape == (1,) and anomaly_map.shape == (1, 1, 32, 32)
    path = tmp_path / "utad.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(detector, (image,), str(path), input_names=["image"],
                          output_names=["score", "anomaly_map"], opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_score, ort_map = session.run(None, {"image": image.numpy()})
    assert np.abs(ort_score - score.numpy()).max() <= 1e-4
    assert np.abs(ort_map - anomaly_map.numpy()).max() <= 1e-4


def test_impression_mode_scores_ie_net_alone(trained_run):
    from edgead.training.checkpoint import load_run

    full, _, meta = load_run(trained_run)
    alone = create("utad", **{**meta["config"], "mode": "impression"}).eval()
    alone.load_state_dict(full.state_dict())  # same networks in both modes
    assert [c.name for c in alone.components()] == ["ie_encoder", "ie_decoder", "head"]
    image = torch.from_numpy(_images(2, seed=3))
    with torch.no_grad():
        score, anomaly_map = alone(image)
        impression = run_components(full.components(), image)["impression"]
        expected = full.head.map_fn.scorer(image, impression)
    torch.testing.assert_close(anomaly_map, expected)
    assert score.shape == (2,) and torch.all(score >= 0)
    _, recipe_cls = get("utad")
    assert recipe_cls(alone, TrainConfig()).stages == ("ie",)


def test_pairs_wiring_and_validation():
    d = create("utad", image_size=32, **TINY, scorer="l1",
               pairs=["image:impression", "image:naive_impression", "impression:reconstruction"])
    shapes = d.component_shapes()
    assert shapes["naive_impression"] == (1, 3, 32, 32) and shapes["anomaly_map"] == (1, 1, 32, 32)
    assert d.components()[-1].inputs == ("image", "impression", "reconstruction", "naive_impression")
    with pytest.raises(ValueError, match="pair"):
        create("utad", image_size=32, pairs=["image:image"])
    with pytest.raises(ValueError, match="mode"):
        create("utad", image_size=32, mode="expert")
    with pytest.raises(ValueError, match="power-of-two"):
        create("utad", image_size=48)
