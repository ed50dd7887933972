"""DRAEM: the synthetic-anomaly generator, the graph, training via the CLI, export and ORT parity."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.data.anomaly_synth import AnomalySynthesizer, perlin_mask
from edgead.models import registry
from edgead.models.losses import focal_loss

SIZE = 32
TINY = {"image_size": SIZE, "width": 4, "disc_width": 4, "recon_depth": 2, "disc_depth": 3}


def _normals(n: int, seed: int = 0) -> np.ndarray:
    from edgead.data.synth import sample

    return np.stack([sample("wood", i, size=SIZE, seed=seed)[0][..., ::-1].transpose(2, 0, 1) / 255.0
                     for i in range(n)]).astype(np.float32)


def _draws(synth: AnomalySynthesizer, images: np.ndarray, rounds: int = 6) -> list[tuple[np.ndarray, ...]]:
    return [synth.batch(images) for _ in range(rounds)]


def test_generator_is_deterministic_for_a_seed() -> None:
    images = _normals(4)
    a = _draws(AnomalySynthesizer(images, seed=3), images)
    b = _draws(AnomalySynthesizer(images, seed=3), images)
    c = _draws(AnomalySynthesizer(images, seed=4), images)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


@pytest.mark.parametrize("shapes", [("perlin",), ("perlin", "stroke")])
def test_masks_cover_what_was_pasted_and_only_that(shapes: tuple[str, ...]) -> None:
    images = _normals(4)
    synth = AnomalySynthesizer(images, seed=0, shapes=shapes)
    anomalous = 0
    for aug, masks, has in _draws(synth, images, rounds=10):
        assert aug.shape == images.shape and aug.dtype == np.float32 and masks.shape == (4, 1, SIZE, SIZE)
        assert set(np.unique(masks)) <= {0.0, 1.0}
        changed = (aug != images).any(axis=1, keepdims=True)
        inside = masks == 1
        assert not (changed & ~inside).any()  # outside the mask: every pixel exactly the input
        if inside.any():
            assert changed[inside].mean() >= 0.99  # inside: the texture shows
        np.testing.assert_array_equal(has, inside.reshape(4, -1).any(axis=1).astype(np.float32))
        assert ((aug >= 0) & (aug <= 1)).all()
        anomalous += int(has.sum())
    assert 8 <= anomalous <= 32  # about half of 40 draws carry an anomaly


def test_perlin_masks_vary_in_scale() -> None:
    rng = np.random.default_rng(0)
    coverage = [perlin_mask(rng, 64).mean() for _ in range(40)]
    components = [cv2.connectedComponents(perlin_mask(rng, 64).astype(np.uint8))[0] - 1 for _ in range(40)]
    assert 0 < np.mean(coverage) < 0.5 and max(components) >= 4 and min(components) <= 1


def _flat_folder(tmp_path, colours) -> str:
    folder = tmp_path / "textures"
    folder.mkdir()
    for i, bgr in enumerate(colours):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((20, 30, 3), bgr, np.uint8))
    return str(folder)


def _pasted_spread(synth: AnomalySynthesizer, images: np.ndarray) -> list[float]:
    """Per pasted anomaly on black images, the spread of pixel values inside its mask."""
    spreads = []
    for aug, masks, has in _draws(synth, images, rounds=8):
        for img, m, h in zip(aug, masks, has):
            if h:
                spreads.append(float(img[:, m[0] == 1].std(axis=1).max()))
    return spreads


def test_anomaly_source_folder_replaces_the_procedural_textures(tmp_path) -> None:
    black = np.zeros((4, 3, SIZE, SIZE), np.float32)  # the pasted texture alone shows (times β)
    folder = _flat_folder(tmp_path, [(255, 0, 255), (0, 200, 40)])
    synth = AnomalySynthesizer(black, seed=0, source_dir=folder, self_fraction=0.0)
    assert synth.source == "folder" and len(synth.pool) == 2
    flat = _pasted_spread(synth, black)
    procedural = _pasted_spread(AnomalySynthesizer(black, seed=0, self_fraction=0.0), black)
    assert flat and procedural
    assert max(flat) < 1e-6  # flat images stay flat through scale and colour changes
    assert np.median(procedural) > 0.01  # rendered textures do not
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        AnomalySynthesizer(black, source_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        AnomalySynthesizer(black, source_dir=tmp_path / "missing")


def test_graph_is_the_chain_and_the_map_is_the_mean_filtered_softmax() -> None:
    detector = registry.create("draem", **TINY).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    score, amap = assert_forward_is_chain(detector, x)
    with torch.no_grad():
        seg = detector.discriminative(x, detector.reconstructive(x))
    p = torch.softmax(seg, dim=1)[:, 1:2]
    k = 3  # 21 at 256², scaled to 32² and made odd
    padded = torch.nn.functional.pad(p, [k // 2] * 4)
    expected = padded.unfold(2, k, 1).unfold(3, k, 1).mean(dim=(-1, -2))
    torch.testing.assert_close(amap, expected)
    torch.testing.assert_close(score, amap.flatten(1).max(dim=1).values)
    assert [c.name for c in detector.components()] == ["reconstructive", "discriminative", "head"]
    assert hasattr(detector.head, "fp32_map") and hasattr(detector.head, "fp32_score")


def test_focal_loss_down_weights_easy_pixels() -> None:
    target = torch.zeros(1, 1, 2, 2)
    easy = torch.tensor([4.0, -4.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    hard = torch.tensor([0.2, -0.2]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    ce_easy = torch.nn.functional.cross_entropy(easy, target[:, 0].long())
    assert focal_loss(easy, target) < 0.01 * ce_easy  # (1 - p_t)^2 ≈ 1e-7 of the cross-entropy
    assert focal_loss(hard, target, gamma=0.0) == pytest.approx(
        torch.nn.functional.cross_entropy(hard, target[:, 0].long()).item(), rel=1e-6)


def test_recipe_steps_lower_the_segmentation_loss_on_one_batch() -> None:
    from edgead.models.base import TrainConfig

    torch.manual_seed(0)
    detector = registry.create("draem", **TINY).train()
    _, recipe_cls = registry.get("draem")
    recipe = recipe_cls(detector, TrainConfig(lr=2e-3, extra={"anomaly_prob": 1.0}))
    images = torch.from_numpy(_normals(8))
    recipe.prepare(images)
    logs = [recipe.step(images, "main") for _ in range(25)]
    assert set(logs[0]) == {"l2", "ssim", "focal", "loss"}
    first, last = np.mean([l["loss"] for l in logs[:5]]), np.mean([l["loss"] for l in logs[-5:]])
    assert last < first


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    from edgead.cli import main
    from edgead.data.synth import SynthSpec, generate

    tmp = tmp_path_factory.mktemp("draem")
    data = generate(tmp / "data", ["wood"], SynthSpec(image_size=SIZE, n_train=12, n_test_good=2,
                                                        n_test_per_defect=1, seed=0))
    textures = tmp / "textures"
    textures.mkdir()
    cv2.imwrite(str(textures / "t.png"), (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8))
    run = tmp / "run"
    args = ["train", "--model", "draem", "--data", str(data), "--category", "wood", "--image-size", str(SIZE),
            "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--anomaly-source", str(textures),
            "--out", str(run), "--set", *[f"{k}={v}" for k, v in TINY.items() if k != "image_size"]]
    assert main(args) == 0
    return {"tmp": tmp, "data": data, "run": run, "textures": textures}


def test_cli_training_records_the_anomaly_source_and_scores(trained) -> None:
    from edgead.training.checkpoint import load_run
    from edgead.training.predict import detector_outputs

    meta = json.loads((trained["run"] / "config.json").read_text())
    assert meta["train"]["extra"]["anomaly_source"] == str(trained["textures"])
    history = json.loads((trained["run"] / "history.json").read_text())
    assert len(history) == 2 and all(np.isfinite(h["focal"]) and np.isfinite(h["ssim"]) for h in history)
    detector, calibration, _ = load_run(trained["run"])
    assert calibration is not None and detector.config.disc_width == 4
    score, amap = detector_outputs(detector, torch.from_numpy(_normals(2, seed=5)))
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    assert ((amap >= 0) & (amap <= 1)).all()


def test_export_fp32_and_fp16_match_torch_on_ort(trained) -> None:
    from edgead.export.bundle_writer import export_run
    from edgead.training.checkpoint import load_run

    bundle = export_run(trained["run"], trained["tmp"] / "bundle", precisions=("fp32", "fp16"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [c["name"] for c in manifest["components"]] == ["reconstructive", "discriminative", "head"]
    detector, _, _ = load_run(trained["run"])
    detector.eval()
    x = torch.from_numpy(_normals(1, seed=7))
    with torch.no_grad():
        score, amap = detector(x)
        recon = detector.reconstructive(x)
    for precision, tol in (("fp32", 1e-4), ("fp16", 2e-2)):
        sess = ort.InferenceSession(str(bundle / manifest["graphs"]["detector"][precision]),
                                    providers=["CPUExecutionProvider"])
        got_score, got_map = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        assert np.isfinite(got_map).all() and got_map.shape == (1, 1, SIZE, SIZE)
        assert np.abs(got_score - score.numpy()).max() <= tol, precision
        assert np.abs(got_map - amap.numpy()).max() <= tol, precision
    sess = ort.InferenceSession(str(bundle / manifest["graphs"]["reconstructive"]["fp32"]),
                                providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - recon.numpy()).max() <= 1e-4


def test_stroke_masks_are_thin_curves_and_unknown_shapes_are_refused() -> None:
    from edgead.data.anomaly_synth import stroke_mask

    rng = np.random.default_rng(0)
    masks = [stroke_mask(rng, 128) for _ in range(20)]
    areas = np.array([m.sum() for m in masks])
    assert (areas > 0).mean() >= 0.9 and areas.max() < 0.03 * 128 * 128  # a stroke, not a blob
    for m in masks:
        if m.any():  # a few px wide (3 px drawn, more where it bends back): a 7x7 erosion leaves nothing
            assert not cv2.erode(m, np.ones((7, 7), np.uint8)).any()
    np.testing.assert_array_equal(stroke_mask(np.random.default_rng(5), 64), stroke_mask(np.random.default_rng(5), 64))
    with pytest.raises(ValueError, match="mask shapes"):
        AnomalySynthesizer(_normals(2), shapes=("blob",))

