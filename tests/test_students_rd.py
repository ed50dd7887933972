"""Reverse Distillation, RD++ and Uninformed Students: training smoke, export against ONNX Runtime,
and each method's own behaviour (the student starts unlike the teacher and learns it; the patch
networks see exactly their receptive field; the map is standardised on the validation split)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.models import registry
from edgead.models.base import TrainConfig
from edgead.training.checkpoint import load_run
from edgead.training.predict import detector_outputs
from edgead.training.trainer import train_from_arrays

SIZE = 32
TINY = {
    "rd": {"width": 4},
    "rdpp": {"width": 4, "proj_div": 8, "ot_points": 16},
    "students": {"width": 4, "max_width": 16, "descriptor_dim": 16, "n_textures": 4, "patch_sizes": (17, 33)},
}


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields: 'normal' parts."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.random((n, 3, SIZE // 4, SIZE // 4)).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear").numpy()


@pytest.fixture(scope="module", params=list(TINY))
def trained(request, tmp_path_factory):
    name = request.param
    train = TrainConfig(epochs=1, batch_size=3, extra={"epochs_teacher": 1, "epochs_students": 1})
    run = train_from_arrays(name, _images(6), _images(3, seed=1), tmp_path_factory.mktemp(name), config=TINY[name],
                            train=train, progress=False)
    return name, run


def test_train_smoke_export_and_onnxruntime_parity(trained, tmp_path) -> None:
    from edgead.export.onnx_export import export_detector

    name, run = trained
    detector, calibration, _ = load_run(run)
    assert calibration is not None
    x = torch.from_numpy(_images(2, seed=2))
    score, amap = assert_forward_is_chain(detector.eval(), x)
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    manifest = export_detector(detector, tmp_path)
    assert set(manifest["graphs"]) == {"detector", *(c.name for c in detector.components())}
    one = x[:1]
    with torch.no_grad():
        ref_score, ref_map = detector(one)
    session = ort.InferenceSession(str(tmp_path / manifest["graphs"]["detector"]["fp32"]),
                                   providers=["CPUExecutionProvider"])
    got_score, got_map = session.run(None, {session.get_inputs()[0].name: one.numpy()})
    assert np.isfinite(got_score).all() and np.isfinite(got_map).all() and got_map.shape == (1, 1, SIZE, SIZE)
    scale = float(ref_map.abs().max()) + 1.0
    assert np.abs(got_score - ref_score.numpy()).max() <= 1e-4 * scale
    assert np.abs(got_map - ref_map.numpy()).max() <= 1e-4 * scale


def test_rd_student_starts_unlike_the_teacher_and_learns_one_image() -> None:
    detector = registry.create("rd", image_size=SIZE, width=8)
    _, recipe_cls = registry.get("rd")
    recipe = recipe_cls(detector, TrainConfig(batch_size=2))
    image = torch.from_numpy(_images(2, seed=3))

    def cosine_map() -> torch.Tensor:
        detector.eval()
        values = detector.run(image, until="anomaly_map")
        return values["anomaly_map"]

    before = cosine_map()
    assert float(before.mean()) > 0.3  # three taps: 1 - cos summed; the untrained student is not the teacher
    recipe.prepare(image)
    for _ in range(8):
        detector.train()
        recipe.batch_indices = torch.arange(2)
        recipe.step(image, "main")
    after = cosine_map()
    assert float(after.mean()) < 0.7 * float(before.mean())
    assert all(not p.requires_grad for p in detector.encoder.parameters())  # the teacher stays frozen


def test_rdpp_simulated_anomalies_are_seeded_and_local() -> None:
    from edgead.models.reverse_distillation import simulated_anomalies

    images = torch.full((3, 3, 64, 64), 0.5)
    a = simulated_anomalies(images, torch.Generator().manual_seed(4))
    b = simulated_anomalies(images, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for changed in (a != images).any(dim=1):  # one rectangle per image, sides 5 .. 8 px at 64²
        ys, xs = torch.nonzero(changed, as_tuple=True)
        h, w = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        assert 5 <= h <= 8 and 5 <= w <= 8 and int(changed.sum()) > 0.8 * h * w
        assert float((a - images).abs().max()) <= 0.046


def test_rdpp_has_the_projection_component() -> None:
    detector = registry.create("rdpp", image_size=SIZE, **TINY["rdpp"])
    assert [c.name for c in detector.components()] == ["encoder", "projection", "bottleneck", "decoder", "head"]
    assert [c.name for c in registry.create("rd", image_size=SIZE, width=4).components()] == [
        "encoder", "bottleneck", "decoder", "head"]


@pytest.mark.parametrize("patch_size", [17, 33, 65])
def test_students_patch_network_sees_exactly_its_receptive_field(patch_size: int) -> None:
    from edgead.models.students import PatchNet

    torch.manual_seed(0)
    net = PatchNet(patch_size, out_dim=24, width=4, max_width=8).double().eval()
    assert net.receptive_field == patch_size
    size = 96
    x = torch.rand(1, 3, size, size, dtype=torch.float64)
    y0, x0 = 45, 50
    bumped = x.clone()
    bumped[0, :, y0, x0] += 1.0
    with torch.no_grad():
        out, out2 = net(x), net(bumped)
    stride = net.stride
    assert out.shape == (1, 24, size // stride, size // stride)  # the configured descriptor dimension
    changed = (out2 - out).abs().amax(dim=1)[0] > 0
    half = (patch_size - 1) // 2
    grid = torch.arange(size // stride) * stride
    expected = ((grid[:, None] - y0).abs() <= half) & ((grid[None, :] - x0).abs() <= half)
    assert torch.equal(changed, expected)


def test_students_teacher_descriptor_dim_and_validation_standardised_map() -> None:
    config = {**TINY["students"], "descriptor_dim": 12}
    detector = registry.create("students", image_size=SIZE, **config)
    shapes = detector.component_shapes()
    assert shapes["teacher_17"] == (1, 12, SIZE // 2, SIZE // 2) and shapes["teacher_33"] == (1, 12, SIZE // 4, SIZE // 4)
    assert shapes["students_33"] == (1, 3 * 12, SIZE // 4, SIZE // 4)
    _, recipe_cls = registry.get("students")
    recipe = recipe_cls(detector, TrainConfig())
    val = torch.from_numpy(_images(4, seed=5))
    with torch.no_grad():
        _, raw = detector_outputs(detector.eval(), val)
    recipe.validate(val)
    stats = detector.student_map.stats
    assert torch.all(stats[:, 1] > 0) and torch.all(stats[:, 3] > 0)
    with torch.no_grad():
        _, amap = detector_outputs(detector.eval(), val)
    # e and v each standardised to mean 0, std 1 on the validation images (upsampling moves it a little)
    assert abs(float(amap.mean())) < 0.1 < abs(float(raw.mean()))
    assert 0.3 < float(amap.std()) < 3.0


def test_students_inference_graph_has_no_vgg() -> None:
    detector = registry.create("students", image_size=SIZE, **TINY["students"])
    names = {n for c in detector.components() for n, _ in c.module.named_modules()}
    assert not any("features.convs" in n for n in names)
    assert sum(p.numel() for c in detector.components() for p in c.module.parameters()) < 2e6


def test_students_hard_regression_loss_counts_only_the_hardest_elements() -> None:
    from edgead.models.students import hard_regression_loss

    difference = torch.zeros(2, 4, 3, 3, requires_grad=True)
    with torch.no_grad():
        difference[0, 1, 2, 2] = 3.0
        difference[1, 3, 0, 1] = -2.0
        difference[1, 0, 1, 1] = 0.5
    full = hard_regression_loss(difference)
    assert float(full) == pytest.approx((9 + 4 + 0.25) / (2 * 3 * 3))  # summed over channels, mean over positions
    hard = hard_regression_loss(difference, hard_fraction=2 / difference.numel())  # the two largest squares
    assert float(hard) == pytest.approx((9 + 4) / 2 * 4)
    hard.backward()
    touched = difference.grad != 0
    assert int(touched.sum()) == 2 and bool(touched[0, 1, 2, 2]) and bool(touched[1, 3, 0, 1])


def test_students_penalty_pulls_the_students_output_on_textures_to_zero_and_needs_textures() -> None:
    config = {**TINY["students"], "patch_sizes": (17,), "penalty_weight": 10.0}
    detector = registry.create("students", image_size=SIZE, **config)
    _, recipe_cls = registry.get("students")
    recipe = recipe_cls(detector, TrainConfig(lr=1e-2))
    images = torch.from_numpy(_images(6))
    recipe.prepare(images)
    recipe.begin_stage("students")
    losses = [recipe.step(images[:3], "students") for _ in range(30)]
    assert losses[-1]["penalty"] < 0.2 * losses[0]["penalty"]
    with pytest.raises(ValueError, match="n_textures"):
        registry.create("students", image_size=SIZE, **{**config, "n_textures": 0})


def test_students_teacher_targets_keep_the_taps_geometry_on_a_unit_patch_norm() -> None:
    from edgead.models.students import distillation_target

    torch.manual_seed(0)
    features = torch.rand(4, 6, 5, 5) * torch.tensor([10.0, 1.0, 1.0, 0.1, 0.1, 0.01]).view(1, 6, 1, 1)
    target = distillation_target(features, "patch_norm")
    assert float(target.norm(dim=1).mean()) == pytest.approx(1.0, rel=1e-5)
    ratio = target / features  # one global factor: distances between patches keep their proportions
    assert float(ratio.std()) < 1e-6
    standardised = distillation_target(features, "channel")
    assert torch.allclose(standardised.std(dim=(0, 2, 3)), torch.ones(6), atol=1e-3)  # the tiny channel as loud as the big
    with pytest.raises(ValueError, match="target_scaling"):
        registry.create("students", image_size=SIZE, **{**TINY["students"], "target_scaling": "pca"})


def test_stage_budget_follows_the_recipes_shares_else_the_stages_epochs() -> None:
    from edgead.training.trainer import _stage_deadlines

    train = TrainConfig(epochs=10, time_budget_s=100.0, extra={"epochs_teacher": 30})
    assert _stage_deadlines(("teacher", "students"), train, 5.0) == pytest.approx([80.0, 105.0])  # 30 : 10 epochs
    assert _stage_deadlines(("teacher", "students"), train, 5.0, (0.25, 0.75)) == pytest.approx([30.0, 105.0])
    with pytest.raises(ValueError, match="2 stages"):
        _stage_deadlines(("teacher", "students"), train, 5.0, (1.0,))
    detector = registry.create("students", image_size=SIZE, **{**TINY["students"], "teacher_budget_share": 0.2})
    _, recipe_cls = registry.get("students")
    assert recipe_cls(detector, TrainConfig()).budget_shares() == pytest.approx((0.2, 0.8))


def test_students_train_on_one_random_crop_on_the_coarsest_grid() -> None:
    config = {**TINY["students"], "patch_sizes": (17,), "student_crop": 24}
    detector = registry.create("students", image_size=SIZE, **config)
    _, recipe_cls = registry.get("students")
    recipe = recipe_cls(detector, TrainConfig(seed=3))
    images = torch.arange(2 * 3 * SIZE * SIZE, dtype=torch.float32).view(2, 3, SIZE, SIZE)
    corners = set()
    for _ in range(20):
        crop = recipe._crop(images)
        assert crop.shape == (2, 3, 24, 24)
        y, x = divmod(int(crop[0, 0, 0, 0]), SIZE)
        assert torch.equal(crop, images[..., y:y + 24, x:x + 24]) and y % 2 == 0 and x % 2 == 0  # stride of scale 17
        corners.add((y, x))
    assert len(corners) > 3
    recipe.prepare(torch.from_numpy(_images(4)))
    recipe.begin_stage("students")
    assert np.isfinite(recipe.step(torch.from_numpy(_images(3)), "students")["regression"])
    for bad in (16, 40, 20):  # below the largest patch size (17), above the image, not a multiple of 8
        with pytest.raises(ValueError, match="student_crop"):
            registry.create("students", image_size=SIZE, **{**config, "student_crop": bad})
