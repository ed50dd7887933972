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
