"""Zoo B: EGBAD (BiGAN and Wasserstein BiGAN) and ALAD (with and without spectral norm) -- training
smoke, graph, export, method specifics."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain
from torch import nn

from edgead.training.predict import detector_outputs
from edgead.models import registry
from edgead.models.base import TrainConfig
from edgead.training.checkpoint import load_run
from edgead.training.trainer import train_from_arrays

SIZE = 32
TINY = {"image_size": SIZE, "width": 8, "latent_dim": 16}
VARIANTS = {
    "egbad_bce": ("egbad", {"loss": "bce"}),
    "egbad_wgan": ("egbad", {"loss": "wgan"}),
    "alad_sn": ("alad", {"spectral_norm": True}),
    "alad_plain": ("alad", {"spectral_norm": False}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: one thread is ~10x faster than two on a shared, loaded CPU (no OpenMP spinning).
    A fixture, not a module-level call, so other test modules keep their own setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.random((n, 3, SIZE // 8, SIZE // 8)).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=SIZE, mode="bilinear").numpy()


def _create(variant: str, **extra):
    name, config = VARIANTS[variant]
    return registry.create(name, **TINY, **{**config, **extra})


def _recipe(detector, **train):
    _, recipe_cls = registry.get(detector.name)
    return recipe_cls(detector, TrainConfig(**train))


def _trained(variant: str, steps: int = 2, **extra):
    """A detector after a few optimisation steps: batch-norm statistics and spectral-norm vectors moved."""
    torch.manual_seed(0)
    detector = _create(variant, **extra)
    recipe = _recipe(detector, lr=1e-3)
    images = torch.from_numpy(_images(4))
    detector.train()
    for _ in range(steps):
        recipe.step(images, "main")
    return detector.eval()


def _ort(path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_smoke_then_load_run(variant: str, tmp_path) -> None:
    name, config = VARIANTS[variant]
    run = train_from_arrays(name, _images(4), _images(4, seed=1), tmp_path / variant,
                            config={"width": 8, "latent_dim": 16, **config}, train=TrainConfig(epochs=1, batch_size=4),
                            progress=False)
    detector, calibration, meta = load_run(run)
    assert calibration is not None and meta["detector"] == name
    x = torch.from_numpy(_images(2, seed=2))
    score, amap = detector_outputs(detector, x)
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    again, _, _ = load_run(run)  # the round trip is exact
    torch.testing.assert_close(detector_outputs(again, x), (score, amap), rtol=0, atol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_is_the_chain_of_components(variant: str) -> None:
    detector = _create(variant).eval()
    assert_forward_is_chain(detector, torch.rand(2, 3, SIZE, SIZE))
    # the feature extractor is one module under two component entries (no aliased state dict)
    comps = {c.name: c.module for c in detector.components()}
    assert comps["features_real"] is comps["features_fake"]
    state = detector.state_dict()
    assert len({t.data_ptr() for t in state.values()}) == len(state)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_onnx_matches_torch(variant: str, tmp_path) -> None:
    from edgead.export.onnx_export import export_detector

    detector = _trained(variant)
    info = export_detector(detector, tmp_path, components=[])
    assert not detector.training
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        score, amap = detector(x)
    fused = _ort(tmp_path / info["graphs"]["detector"]["fp32"], {"image": x.numpy()})
    assert np.abs(fused["score"] - score.numpy()).max() <= 1e-4
    assert np.abs(fused["anomaly_map"] - amap.numpy()).max() <= 1e-4
    if variant == "alad_sn":  # spectral norm folds into plain convolution weights
        ops = {n.op_type for n in onnx.load(str(tmp_path / info["graphs"]["detector"]["fp32"])).graph.node}
        assert "MatMul" not in ops and "Conv" in ops


@pytest.mark.parametrize("variant, extra", [("alad_sn", {}), ("egbad_bce", {"latent_weight": 0.5})])
def test_component_graphs_chain_to_the_fused_graph(variant: str, extra: dict, tmp_path) -> None:
    from edgead.export.int8 import open_sessions, run_chain
    from edgead.export.onnx_export import export_detector

    info = export_detector(_trained(variant, steps=1, **extra), tmp_path)
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    fused = _ort(tmp_path / info["graphs"]["detector"]["fp32"], {"image": x})
    sessions = open_sessions({c["name"]: tmp_path / f"{c['name']}.fp32.onnx" for c in info["components"]})
    chained = run_chain(info["components"], sessions, x)
    for out in ("score", "anomaly_map"):
        assert np.abs(fused[out] - chained[out]).max() <= 1e-5
    for comp in info["components"]:  # each graph declares exactly its wiring (f_xx(x, x) reads "image" once)
        model = onnx.load(str(tmp_path / f"{comp['name']}.fp32.onnx"))
        assert [i.name for i in model.graph.input] == comp["inputs"]


def test_egbad_score_formula_and_latent_term() -> None:
    detector = _trained("egbad_bce", latent_weight=0.5)
    assert "z" in detector.components()[-1].inputs
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        score, _ = detector(x)
        z = detector.encoder(x)
        recon = detector.generator(z)
        f_real, f_fake = detector.discriminator(x, z), detector.discriminator(recon, z)
    img = (2 * (x - recon)).abs().flatten(1).mean(1)
    feat = (f_real - f_fake).abs().flatten(1).mean(1)
    expected = 0.9 * img + 0.1 * feat + 0.5 * z.flatten(1).norm(dim=1)
    torch.testing.assert_close(score, expected)
    assert "z" not in _create("egbad_bce").components()[-1].inputs  # α = 0: z does not reach the scorer


def test_egbad_wasserstein_critic_and_feature_loss() -> None:
    detector = _create("egbad_wgan")
    critic = detector.discriminator
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    assert not any(isinstance(m, nn.Dropout) for m in critic.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in _create("egbad_bce").discriminator.modules())
    with pytest.raises(ValueError, match="batch norm"):
        _create("egbad_wgan", disc_norm="batch")
    recipe = _recipe(detector)
    assert recipe.lr == 1e-4 and recipe.opt_d.defaults["betas"] == (0.1, 0.9)
    bce = _recipe(_create("egbad_bce"))
    assert bce.lr == 1e-5 and bce.opt_d.defaults["betas"] == (0.5, 0.999)
    assert _recipe(_create("egbad_bce"), lr=3e-4).lr == 3e-4
    images = torch.from_numpy(_images(4))
    detector.train()
    generator_before = [p.detach().clone() for p in detector.generator.parameters()]
    logs = [recipe.step(images, "main") for _ in range(detector.config.n_critic)]
    assert all("feat" not in entry for entry in logs[:-1])  # G/E update every n_critic critic steps
    assert logs[-1]["feat"] > 0 and np.isfinite(logs[-1]["gp"])
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, detector.generator.parameters()))
    assert _create("egbad_wgan", feature_weight=0.0).config.feature_weight == 0.0


def test_alad_spectral_norm() -> None:
    from edgead.models.bigan_blocks import SpectralNorm, has_spectral_norm

    fresh = _create("alad_sn")
    for conv in [m for m in fresh.disc_xz.modules() if isinstance(m, nn.Conv2d)]:  # converged at registration
        assert abs(torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item() - 1.0) < 0.05
    sn, plain = _trained("alad_sn", steps=3), _create("alad_plain")
    for net in (sn.disc_xx, sn.disc_xz, sn.disc_zz):
        assert has_spectral_norm(net)
    assert not any(has_spectral_norm(n) for n in (sn.encoder, sn.generator, plain.disc_xx, plain.disc_xz))
    assert any(".parametrizations.weight.original" in k for k in sn.state_dict())
    for conv in [m for m in sn.disc_xx.modules() if isinstance(m, nn.Conv2d)]:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert abs(sigma.item() - 1.0) < 0.15  # one power iteration per step trails the weights a little
    assert any(isinstance(m, SpectralNorm) for m in sn.modules())
    # eval mode: the buffers stay put, so the score is deterministic
    buffers = {k: v.clone() for k, v in sn.state_dict().items() if k.endswith(("._u", "._v"))}
    x = torch.rand(2, 3, SIZE, SIZE)
    first = detector_outputs(sn, x)
    torch.testing.assert_close(detector_outputs(sn, x), first, rtol=0, atol=0)
    assert all(torch.equal(v, sn.state_dict()[k]) for k, v in buffers.items())


def test_alad_step_logs_cycle_terms() -> None:
    detector = _create("alad_sn")
    detector.train()
    logs = _recipe(detector).step(torch.from_numpy(_images(4)), "main")
    assert {"d_xz", "d_xx", "d_zz", "adv", "cycle_x", "cycle_z"} <= set(logs)
    assert all(np.isfinite(v) for v in logs.values())
    no_zz = _create("alad_sn", allow_zz=False).train()
    assert "cycle_z" not in _recipe(no_zz).step(torch.from_numpy(_images(4)), "main")
