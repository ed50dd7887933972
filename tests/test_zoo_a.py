"""Zoo A: Skip-GANomaly, f-AnoGAN, AnoGAN, VAE -- training smoke, graph, export, method specifics."""

from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.training.predict import detector_outputs
from edgead.models import registry
from edgead.models.base import TrainConfig
from edgead.training.checkpoint import load_run
from edgead.training.trainer import train_from_arrays

SIZE = 32
TINY = {"image_size": SIZE, "width": 8}
ZOO = {"skip_ganomaly": {}, "fanogan": {}, "anogan": {"search_steps": 3}, "vae": {}}
EXPORTABLE = ("skip_ganomaly", "fanogan", "vae")



def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.random((n, 3, SIZE // 8, SIZE // 8)).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear").numpy()


def _create(name: str, **extra):
    return registry.create(name, **TINY, **ZOO[name], **extra)


def _ort(path, x: torch.Tensor) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


@pytest.mark.parametrize("name", list(ZOO))
def test_train_smoke_then_score(name: str, tmp_path) -> None:
    train = TrainConfig(epochs=1, batch_size=4, extra={"epochs_gan": 1, "epochs_encoder": 1})
    run = train_from_arrays(name, _images(4), _images(4, seed=1), tmp_path / name,
                            config={"width": 8, **ZOO[name]}, train=train, progress=False)
    detector, calibration, _ = load_run(run)
    assert calibration is not None
    score, amap = detector_outputs(detector, torch.from_numpy(_images(2, seed=2)))
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()


@pytest.mark.parametrize("name", EXPORTABLE)
def test_forward_is_the_chain_of_components(name: str) -> None:
    detector = _create(name).eval()
    assert_forward_is_chain(detector, torch.rand(2, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", EXPORTABLE)
def test_fused_onnx_matches_torch(name: str, tmp_path) -> None:
    from edgead.export.onnx_export import export_detector

    detector = _create(name).eval()
    manifest = export_detector(detector, tmp_path, components=[])
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        score, amap = detector(x)
    got_score, got_map = _ort(tmp_path / manifest["graphs"]["detector"]["fp32"], x)
    assert np.abs(got_score - score.numpy()).max() <= 1e-4
    assert np.abs(got_map - amap.numpy()).max() <= 1e-4


def test_anogan_refuses_the_fused_graph_and_exports_its_generator(tmp_path) -> None:
    from edgead.export.onnx_export import ExportError, export_detector, export_onnx

    detector = _create("anogan").eval()
    assert not detector.exportable
    for refused in (detector.components, lambda: detector(torch.rand(1, 3, SIZE, SIZE))):
        with pytest.raises(RuntimeError, match="iterative latent search .* torch backend"):
            refused()
    with pytest.raises(ExportError, match="iterative latent search"):
        export_detector(detector, tmp_path)
    (gen,) = detector.exportable_components()
    shapes = detector.component_shapes()
    z = torch.randn(shapes["z"])
    export_onnx(gen.module, [z], gen.inputs, gen.outputs, tmp_path / "generator.onnx")
    with torch.no_grad():
        expected = gen.module(z).numpy()
    assert expected.shape == shapes["generated"]
    assert np.abs(_ort(tmp_path / "generator.onnx", z)[0] - expected).max() <= 1e-4


def test_anogan_search_reduces_its_loss() -> None:
    detector = _create("anogan").eval()
    before = [p.detach().clone() for p in detector.parameters()]
    x = torch.rand(2, 3, SIZE, SIZE)
    _, history = detector.search(x, steps=15)
    assert history[-1] < history[0]
    assert all(torch.equal(a, b) for a, b in zip(before, detector.parameters()))  # only z moved
    assert all(p.grad is None for p in detector.parameters())


def test_vae_monte_carlo_is_part_of_the_graph() -> None:
    """MC scoring is in the forward graph (fixed seeded noise), so the bundle outputs the very
    score the threshold was calibrated on; it differs from the mean-decoded score."""
    x = torch.rand(2, 3, SIZE, SIZE)
    detector = _create("vae").eval()
    with torch.no_grad():
        fused = detector(x)
    sampled = _create("vae", mc_samples=3).eval()
    sampled.load_state_dict(detector.state_dict())
    with torch.no_grad():
        score, amap = sampled(x)
        again = sampled(x)
        # an independent computation from the components' outputs: mean over the 3 decoded samples
        mu, logvar = sampled.encoder(x)
        z = mu[None] + (0.5 * logvar).exp()[None] * sampled.sampler.eps
        recons = sampled.decoder(z.flatten(0, 1)).view(3, 2, 3, SIZE, SIZE)
    rec = ((x[None] - recons) ** 2).flatten(2).sum(dim=2).mean(dim=0)
    kl = -0.5 * (1 + logvar - mu ** 2 - logvar.exp()).flatten(1).sum(dim=1)
    torch.testing.assert_close(score, rec + kl)
    torch.testing.assert_close(amap, (x[None] - recons).abs().mean(dim=2, keepdim=True).mean(dim=0))
    assert not torch.equal(score, fused[0]) and not torch.equal(amap, fused[1])
    torch.testing.assert_close(again, (score, amap), rtol=0, atol=0)  # fixed noise: repeatable
    assert [c.name for c in sampled.components()] == ["encoder", "sampler", "decoder", "head"]


@pytest.mark.parametrize("mode", ["izif", "izi", "ziz"])
def test_fanogan_encoder_stage_freezes_generator_and_critic(mode: str) -> None:
    _, recipe_cls = registry.get("fanogan")
    detector = _create("fanogan", encoder_mode=mode)
    recipe = recipe_cls(detector, TrainConfig())
    images = torch.from_numpy(_images(4))
    recipe.begin_stage("gan")
    detector.train()
    for _ in range(5):  # n_critic critic steps make one generator step
        logs = recipe.step(images, "gan")
    assert "g" in logs
    frozen = {k: v.clone() for k, v in detector.state_dict().items() if k.startswith(("generator.", "critic."))}
    encoder = {k: v.clone() for k, v in detector.encoder.state_dict().items()}
    recipe.begin_stage("encoder")
    detector.train()  # the trainer does this every epoch; the recipe must still keep G's BN frozen
    for _ in range(2):
        recipe.step(images, "encoder")
    state = detector.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, detector.encoder.state_dict()[k]) for k, v in encoder.items())
    with pytest.raises(ValueError, match="batch norm"):
        _create("fanogan", critic_norm="batch")
