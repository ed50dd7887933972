"""The spine: detector API, training, checkpoints, calibration, the train/eval CLI."""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.core.calibration import ERROR, NG, OK, calibrate
from edgead.models import create
from edgead.models.base import TrainConfig
from edgead.models.blocks import dcgan_init
from edgead.models.heads import HEAD, ScoreHead
from edgead.training.checkpoint import CheckpointError, load_run, load_weights, save_weights
from edgead.training.predict import predict
from edgead.training.trainer import augment, cutpaste, train_from_arrays

SPINE = ("ganomaly", "ssim_ae")


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random images: structured enough that a reconstruction is learnable."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, 3, size // 8, size // 8)).astype(np.float32)
    return torch.nn.functional.interpolate(torch.from_numpy(base), size=size, mode="bilinear").numpy()


@pytest.mark.parametrize("name", SPINE)
@pytest.mark.parametrize("scorer", ["l1", "ssim"])
def test_inference_is_the_composition_of_components(name: str, scorer: str) -> None:
    detector = create(name, image_size=32, width=8, scorer=scorer).eval()
    x = torch.rand(2, 3, 32, 32)
    score, amap = assert_forward_is_chain(detector, x)
    # Not run_components again (forward *is* run_components): the paper's formulas from the networks.
    with torch.no_grad():
        if name == "ganomaly":
            z = detector.encoder(x)
            recon = detector.generator(z)
            want_score = ((z - detector.encoder2(recon)) ** 2).flatten(1).mean(dim=1)
        else:
            recon = detector.autoencoder(x)
    if scorer == "l1":
        want_map = (x - recon).abs().mean(dim=1, keepdim=True)
    else:
        from test_references import _scipy_ssim

        pairs = zip(x.double().numpy().transpose(0, 2, 3, 1), recon.double().numpy().transpose(0, 2, 3, 1))
        want_map = torch.from_numpy(np.stack([1.0 - _scipy_ssim(a, b) for a, b in pairs])[:, None]).float()
    torch.testing.assert_close(amap, want_map, atol=5e-4, rtol=1e-4)
    if name == "ganomaly":
        torch.testing.assert_close(score, want_score)
    else:  # the top 1% of the map
        k = max(1, round(0.01 * amap[0].numel()))
        torch.testing.assert_close(score, amap.flatten(1).sort(dim=1, descending=True).values[:, :k].mean(dim=1))


def test_dcgan_init_is_applied() -> None:
    detector = create("ganomaly", image_size=32, width=8)
    conv = detector.encoder.net.features[0]
    # N(0, 0.02): the default kaiming-uniform init would have a std near 0.1 for this fan-in.
    assert abs(conv.weight.std().item() - 0.02) < 0.005
    bn = next(m for m in detector.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert abs(bn.weight.mean().item() - 1.0) < 0.02 and bn.bias.abs().max().item() == 0
    fresh = torch.nn.Conv2d(64, 64, 4)
    dcgan_init(fresh)
    assert abs(fresh.weight.std().item() - 0.02) < 0.002


@pytest.mark.parametrize("name", SPINE)
def test_training_smoke_and_round_trip(name: str, tmp_path) -> None:
    x = _images(24)
    run = train_from_arrays(name, x[:18], x[18:], tmp_path / name, config={"width": 8},
                            train=TrainConfig(epochs=2, batch_size=6), progress=False)
    for file in ("config.json", "model.safetensors", "calibration.json", "history.json"):
        assert (run / file).is_file()
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and "val_proxy_auroc" in history[-1]

    detector, calibration, meta = load_run(run)
    assert meta["detector"] == name and calibration is not None
    again, _, _ = load_run(run)
    s1, m1 = predict(detector, x[18:])
    s2, m2 = predict(again, x[18:])
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    # The stored threshold is the validation quantile of these very scores.
    assert calibration.image_threshold == pytest.approx(np.quantile(s1, 0.99), rel=1e-5)


def test_training_is_seeded(tmp_path) -> None:
    x = _images(16)
    runs = [train_from_arrays("ssim_ae", x[:12], x[12:], tmp_path / f"r{i}", config={"width": 8},
                              train=TrainConfig(epochs=1, batch_size=4, seed=3), progress=False) for i in range(2)]
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()


def test_resume_continues_from_the_last_epoch(tmp_path) -> None:
    x = _images(16)
    out = tmp_path / "run"
    train_from_arrays("ssim_ae", x[:12], x[12:], out, config={"width": 8},
                      train=TrainConfig(epochs=1, batch_size=4), progress=False)
    train_from_arrays("ssim_ae", x[:12], x[12:], out, config={"width": 8},
                      train=TrainConfig(epochs=3, batch_size=4), resume=True, progress=False)
    epochs = [h["epoch"] for h in json.loads((out / "history.json").read_text())]
    assert epochs == [0, 1, 2]


def test_pickle_payloads_are_refused(tmp_path) -> None:
    detector = create("ssim_ae", image_size=32, width=8)
    bad = tmp_path / "model.safetensors"
    torch.save(detector.state_dict(), bad)  # a torch zip with pickled objects inside
    with pytest.raises(CheckpointError, match="pickle"):
        load_weights(detector, bad)
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_weights(detector, bad)
    good = tmp_path / "good.safetensors"
    save_weights(detector, good)
    load_weights(detector, good)


def test_weights_must_match_the_model(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(create("ssim_ae", image_size=32, width=8), path)
    with pytest.raises(CheckpointError, match="don't match"):
        load_weights(create("ganomaly", image_size=32, width=8), path)


UTAD_TINY = {"latent_dim": 16, "ie_hidden": 32, "mlp_dim": 32, "expert_down": 2, "expert_res": 1}


@pytest.mark.parametrize("name, extra", [("ganomaly", {}), ("utad", UTAD_TINY), ("anogan", {})])
def test_a_run_saved_before_the_score_head_still_loads(name: str, extra: dict, tmp_path) -> None:
    """A run saved with the VGG scorer under its old name (``head.scorer.*``; AnoGAN's ``scorer.*``)
    loads into the score head, every weight in place."""
    from safetensors.torch import save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG features
        saved = create(name, image_size=32, width=8, scorer="vgg", **extra)
        fresh = create(name, image_size=32, width=8, scorer="vgg", seed=1, **extra)  # other VGG weights
    ((old, new),) = saved.renamed_state_keys.items()
    state = {(old + k[len(new):] if k.startswith(new) else k): v.contiguous() for k, v in saved.state_dict().items()}
    assert sum(k.startswith(old) for k in state) == 16  # the VGG-19 convs to conv3_4, under the old name
    save_file(state, str(tmp_path / "model.safetensors"))
    load_weights(fresh, tmp_path / "model.safetensors")
    loaded = fresh.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("name", ["ganomaly", "ssim_ae", "skip_ganomaly", "fanogan", "egbad", "alad", "utad", "vae"])
def test_the_last_component_is_the_score_head(name: str) -> None:
    detector = create(name, image_size=32, width=8, scorer="l1")
    last = detector.components()[-1]
    assert last.name == HEAD and last.module is detector.head and isinstance(last.module, ScoreHead)
    assert last.outputs == ("score", "anomaly_map") and last.inputs == detector.head.inputs
    # an L1 map carries no convolution worth FP16: the whole head is FP32 islands
    assert {n.split(".")[0] for n, _ in detector.head.named_children()} == {"fp32_map", "fp32_score"}


def test_calibration_uses_validation_quantiles_and_never_passes_nan() -> None:
    scores = np.linspace(0.0, 1.0, 101)
    calib = calibrate(scores, np.zeros((101, 4, 4)), quantile=0.95)
    assert calib.image_threshold == pytest.approx(0.95)
    assert calib.verdict(0.5) == OK and calib.verdict(0.99) == NG
    assert calib.verdict(float("nan")) == ERROR and calib.verdict(float("inf")) == ERROR
    assert calib.normalize(calib.image_threshold) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="NaN"):
        calibrate(np.array([0.1, np.nan]), np.zeros((2, 4, 4)))


def test_augment_keeps_shape_and_range() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    y = augment(x, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert not torch.equal(x, y)


def test_cutpaste_changes_a_patch_only() -> None:
    x = np.random.default_rng(0).random((3, 3, 32, 32)).astype(np.float32)
    y = cutpaste(x)
    changed = (np.abs(y - x).max(axis=1) > 0).mean(axis=(1, 2))
    assert (changed > 0).all() and (changed < 0.1).all()


def test_cli_synth_train_eval(tmp_path) -> None:
    from edgead.cli import main

    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--categories", "fabric", "--image-size", "32",
                 "--n-train", "16", "--n-test-good", "4", "--n-test-per-defect", "2"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--category", "fabric", "--model", "ssim_ae", "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--width", "8", "--out", str(run)]) == 0
    meta = json.loads((run / "config.json").read_text())
    assert meta["data"]["n_val"] >= 4 and meta["data"]["n_train"] + meta["data"]["n_val"] == 16
    assert main(["eval", str(run), "--data", str(data), "--category", "fabric"]) == 0
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0.0 <= report["image_auroc"] <= 1.0 and 0.0 <= report["pixel_auroc"] <= 1.0
    assert report["per_defect"] and report["threshold_source"].startswith("validation")
    for figure in ("roc.png", "overlays.png"):
        assert (run / "eval" / figure).stat().st_size > 1000
