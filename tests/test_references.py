"""The score maths against independent references, written here and not taken from edgead.

- the SSIM map against scikit-image (Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on a real
  photograph and on random images, and against a SciPy re-implementation with edgead's padding;
- the top-k mean against a plain NumPy sort;
- each detector's score (and map) computed from its own networks' outputs, with the paper's
  formula spelled out in this file: GANomaly's latent distance, Skip-GANomaly's 0.9/0.1 mix,
  f-AnoGAN's kappa, ALAD's feature distance, the VAE's terms, UTAD's VGG distance on features
  built by hand from the conv weights;
- the calibration: the verdict exactly at the threshold, the pixel quantile and ``normalize``
  on known numbers.

A reference that shared code with the graph would agree with it whatever the maths; these
only share the networks' weights.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

skimage_metrics = pytest.importorskip("skimage.metrics")
ndimage = pytest.importorskip("scipy.ndimage")

from edgead.core.calibration import ERROR, NG, OK, Calibration, calibrate  # noqa: E402
from edgead.models import create  # noqa: E402
from edgead.models.heads import TopKMean  # noqa: E402
from edgead.models.scorers import SSIMMap  # noqa: E402

SIZE = 32
SIGMA, TRUNCATE = 1.5, 3.5  # skimage: win_size = 2 * int(3.5 * 1.5 + 0.5) + 1 = 11
PAD = 5


@pytest.fixture(autouse=True)
def _quiet_random_vgg():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM.*")
        yield


# ------------------------------------------------------------------ SSIM
def _photo_pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The astronaut photograph (bundled with scikit-image) at ``size``, and a degraded copy:
    blurred, with a bright scratch and noise, as a reconstruction might be."""
    from skimage import data, transform

    a = transform.resize(data.astronaut(), (size, size), anti_aliasing=True).astype(np.float64)
    b = ndimage.gaussian_filter(a, sigma=(0.8, 0.8, 0))
    b[size // 3, 4:size - 4] = 1.0
    b = np.clip(b + np.random.default_rng(1).normal(0, 0.03, b.shape), 0, 1)
    return a, b


def _random_pair(size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.random((size, size, 3))
    return a, np.clip(0.6 * a + 0.4 * rng.random(a.shape), 0, 1)


def _ours(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """edgead's 1 - SSIM map (H, W) for HWC images, run in float64 (its window stays the FP32
    one, hence the 5e-5 tolerance): the maths is compared, not FP32's cancellation in
    var = E[x²] - μ² (~2e-4 in flat regions). Each planted error in the formula moves it > 1e-2."""
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].double()  # noqa: E731
    with torch.no_grad():
        return SSIMMap(a.shape[2]).double()(t(a), t(b))[0, 0].numpy()


def _skimage_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, full = skimage_metrics.structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                                    sigma=SIGMA, use_sample_covariance=False, full=True)
    return full.mean(axis=2)


def _scipy_ssim(a: np.ndarray, b: np.ndarray, mode: str = "mirror") -> np.ndarray:
    """Wang et al. 2004, Eq. 13, per channel then averaged; ``mirror`` is torch's "reflect" pad."""
    blur = lambda x: ndimage.gaussian_filter(x, SIGMA, truncate=TRUNCATE, mode=mode)  # noqa: E731
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    out = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch], b[..., ch]
        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
        out.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return np.mean(out, axis=0)


@pytest.mark.parametrize("pair", ["photo", "random", "random_far"])
def test_ssim_map_matches_scikit_image(pair):
    a, b = {"photo": _photo_pair, "random": _random_pair,
            "random_far": lambda: (np.random.default_rng(3).random((40, 40, 3)),
                                   np.random.default_rng(4).random((40, 40, 3)))}[pair]()
    ours = 1.0 - _ours(a, b)
    ref = _skimage_ssim(a, b)
    inner = (slice(PAD, -PAD), slice(PAD, -PAD))  # skimage pads half-sample symmetric, edgead mirrors
    np.testing.assert_allclose(ours[inner], ref[inner], atol=5e-5)
    assert ref[inner].std() > 0.01, "a flat SSIM map would not test the formula"
    # skimage's own mean SSIM is over the same interior
    mssim = skimage_metrics.structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True,
                                                  sigma=SIGMA, use_sample_covariance=False)
    assert abs(ours[inner].mean() - mssim) < 5e-5


def test_ssim_map_matches_scipy_everywhere_with_reflect_padding():
    a, b = _photo_pair(48)
    np.testing.assert_allclose(1.0 - _ours(a, b), _scipy_ssim(a, b), atol=5e-5)
    a, b = _random_pair(40, seed=5)
    np.testing.assert_allclose(1.0 - _ours(a, b), _scipy_ssim(a, b), atol=5e-5)


def test_ssim_window_is_the_normalised_gaussian():
    # The window the module applies (its separable 1x11 then 11x1 passes), read off as its
    # response to an impulse in each of the five stacked channels.
    ssim = SSIMMap(1)
    impulse = torch.zeros(1, 5, 23, 23)
    impulse[:, :, 11, 11] = 1.0
    with torch.no_grad():
        response = ssim._blur(impulse)[0].double().numpy()
    ref = np.zeros((23, 23))
    ref[11, 11] = 1.0
    ref = ndimage.gaussian_filter(ref, SIGMA, truncate=TRUNCATE, mode="constant")
    for k in response:
        np.testing.assert_allclose(k, ref, atol=1e-7)
        assert abs(k.sum() - 1.0) < 1e-6
    ssim = SSIMMap(1)
    assert (ssim.c1, ssim.c2) == pytest.approx((1e-4, 9e-4))


def test_identical_images_have_zero_dissimilarity():
    a, _ = _photo_pair(32)
    assert np.abs(_ours(a, a)).max() < 1e-5


# ------------------------------------------------------------------ top-k
def _np_topk_mean(values: np.ndarray, fraction: float) -> float:
    flat = np.sort(values.ravel())[::-1]
    k = max(1, int(round(flat.size * fraction + 1e-9)))
    return float(flat[:k].mean())


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.05, 0.25, 1.0])
def test_top_k_mean_against_a_numpy_sort(fraction):
    rng = np.random.default_rng(7)
    maps = rng.gamma(2.0, 0.1, (3, 1, 20, 20)).astype(np.float32)
    maps[1, 0, 3, 4] = 9.0  # one hot pixel: the max and the top-k differ from the mean
    maps[2] = 0.25  # flat
    got = TopKMean(fraction)(torch.from_numpy(maps)).numpy()
    want = [_np_topk_mean(m, fraction) for m in maps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == (3,)


def test_top_k_mean_is_not_the_map_mean():
    amap = torch.zeros(1, 1, 10, 10)
    amap[0, 0, 0, :2] = 1.0  # 2 hot pixels of 100: the top 1% is the hottest one
    assert TopKMean(0.01)(amap).item() == 1.0
    assert TopKMean(0.02)(amap).item() == 1.0
    assert TopKMean(0.04)(amap).item() == pytest.approx(0.5)


# ------------------------------------------------------------------ detectors
def _x(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=g)
    return (F.interpolate(base, size=SIZE, mode="bilinear") * 0.8 + 0.1
            + 0.05 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def _l1_map(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (x - r).abs().mean(dim=1, keepdim=True)


def _signed(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x - 1.0


def _mean_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).mean(dim=1)


def _check(detector, x, want_score, want_map):
    with torch.no_grad():
        score, amap = detector(x)
    torch.testing.assert_close(score, want_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(amap, want_map, rtol=1e-5, atol=1e-6)
    assert want_score.std() > 0 or len(want_score) == 1


def test_ganomaly_score_is_the_latent_distance():
    d = create("ganomaly", image_size=SIZE, width=8, latent_dim=16).eval()
    x = _x()
    with torch.no_grad():
        z = d.encoder(x)
        recon = d.generator(z)
        z_hat = d.encoder2(recon)
    # Akcay et al. 2018, Eq. 8: A(x) = ||G_E(x) - E(G(x))||², as a mean over the latent
    _check(d, x, ((z - z_hat) ** 2).reshape(2, -1).mean(dim=1), _l1_map(x, recon))


def test_skip_ganomaly_score_mixes_image_and_features_0_9_and_0_1():
    d = create("skip_ganomaly", image_size=SIZE, width=8).eval()
    x = _x()
    with torch.no_grad():
        recon = d.generator(x)
        f, f_hat = d.discriminator(x), d.discriminator(recon)
    img = _mean_per_sample((_signed(x) - _signed(recon)) ** 2)
    lat = _mean_per_sample((f - f_hat) ** 2)
    assert (lat > 0).all() and (img > 0).all()
    _check(d, x, 0.9 * img + 0.1 * lat, _l1_map(x, recon))


@pytest.mark.parametrize("kappa", [1.0, 2.5])
def test_fanogan_score_is_image_plus_kappa_feature_error(kappa):
    d = create("fanogan", image_size=SIZE, width=8, latent_dim=16, kappa=kappa).eval()
    x = _x()
    with torch.no_grad():
        recon = d.generator(d.encoder(x))
        f, f_hat = d.critic(x), d.critic(recon)
    want = _mean_per_sample((_signed(x) - _signed(recon)) ** 2) + kappa * _mean_per_sample((f - f_hat) ** 2)
    _check(d, x, want, _l1_map(x, recon))


def test_alad_score_is_the_l1_distance_of_dxx_features():
    d = create("alad", image_size=SIZE, width=8, latent_dim=16).eval()
    x = _x()
    with torch.no_grad():
        recon = d.generator(d.encoder(x))
        f_xx, f_xrec = d.disc_xx(x, x), d.disc_xx(x, recon)
        torch.testing.assert_close(d.disc_xx(x), f_xx)  # f_xx(x) means f_xx(x, x)
    _check(d, x, _mean_per_sample((f_xx - f_xrec).abs()), _l1_map(x, recon))


@pytest.mark.parametrize("beta,samples", [(1.0, 0), (2.0, 0), (0.5, 3)])
def test_vae_score_is_reconstruction_plus_beta_kl(beta, samples):
    d = create("vae", image_size=SIZE, width=8, latent_dim=16, beta=beta, mc_samples=samples).eval()
    x = _x()
    with torch.no_grad():
        mu, logvar = d.encoder(x)
        if samples:
            eps = d.sampler.eps  # (L, 1, latent, 1, 1): fixed, seeded
            recons = [d.decoder(mu + torch.exp(0.5 * logvar) * eps[i]) for i in range(samples)]
        else:
            recons = [d.decoder(mu)]
    rec = torch.stack([((x - r) ** 2).reshape(2, -1).sum(dim=1) for r in recons]).mean(dim=0)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).reshape(2, -1).sum(dim=1)
    assert (kl > 0).all()
    want_map = torch.stack([_l1_map(x, r) for r in recons]).mean(dim=0)
    _check(d, x, rec + beta * kl, want_map)


def test_ssim_ae_score_is_the_top_k_mean_of_the_scipy_ssim_map():
    d = create("ssim_ae", image_size=SIZE, width=8, latent_dim=16, scorer="ssim").eval()
    x = _x()
    with torch.no_grad():
        recon = d.autoencoder(x)
        score, amap = d(x)
    xs, rs = (t.double().numpy().transpose(0, 2, 3, 1) for t in (x, recon))
    want_map = np.stack([1.0 - _scipy_ssim(a, b) for a, b in zip(xs, rs)])
    np.testing.assert_allclose(amap[:, 0].double().numpy(), want_map, atol=5e-4)  # FP32 graph
    k = d.config.top_k
    np.testing.assert_allclose(score.double().numpy(), [_np_topk_mean(m, k) for m in want_map], atol=5e-4)


def _hand_vgg(x: torch.Tensor, vgg) -> list[torch.Tensor]:
    """relu1_2, relu2_2, relu3_4 of the torchvision-layout VGG-19 (random weights: zero-padded 3x3
    convs, 2x2 max pools, ImageNet mean/std), from the conv weights alone."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    h = (x - mean) / std
    convs = vgg.features.convs
    taps = []
    for block, n in ((1, 2), (2, 2), (3, 4)):
        for i in range(1, n + 1):
            conv = convs[f"conv{block}_{i}"]
            h = torch.relu(F.conv2d(h, conv.weight, conv.bias, padding=1))
        taps.append(h)
        h = F.max_pool2d(h, 2)
    return taps


def _perceptual(fa: list[torch.Tensor], fb: list[torch.Tensor], size: int) -> torch.Tensor:
    total = 0
    for a, b in zip(fa, fb):
        ua = a / torch.sqrt((a ** 2).sum(dim=1, keepdim=True) + 1e-10)
        ub = b / torch.sqrt((b ** 2).sum(dim=1, keepdim=True) + 1e-10)
        d = ((ua - ub) ** 2).mean(dim=1, keepdim=True)
        total = total + F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
    return total


def test_utad_map_is_the_vgg_distance_on_hand_built_features():
    tiny = {"width": 8, "latent_dim": 16, "ie_hidden": 32, "mlp_dim": 32, "expert_down": 2, "expert_res": 1}
    d = create("utad", image_size=SIZE, scorer="vgg", **tiny).eval()
    vgg = d.head.map_fn.scorer
    assert vgg.weights_layout == "random"
    x = _x()
    with torch.no_grad():
        imp = d.ie_decoder(d.ie_encoder(x))
        recon = d.expert(x, imp)
        feats = {k: _hand_vgg(t, vgg) for k, t in (("x", x), ("imp", imp), ("rec", recon))}
    want = sum(_perceptual(feats[a], feats[b], SIZE) for a, b in (("x", "imp"), ("x", "rec"), ("imp", "rec")))
    score_want = torch.tensor([_np_topk_mean(m.numpy(), d.config.top_k) for m in want])
    with torch.no_grad():
        score, amap = d(x)
    torch.testing.assert_close(amap, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(score, score_want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ calibration
CAL = Calibration(image_threshold=3.0, score_min=2.0, score_max=6.0, pixel_threshold=0.5, map_min=0.1,
                  map_max=0.9, n_images=10, quantile=0.99, pixel_quantile=0.999)


def test_a_score_exactly_at_the_threshold_is_ok():
    t = CAL.image_threshold
    assert CAL.verdict(t) == OK
    assert CAL.verdict(np.nextafter(t, np.inf)) == NG
    assert CAL.verdict(np.nextafter(t, -np.inf)) == OK
    for bad in (np.nan, np.inf, -np.inf):
        assert CAL.verdict(bad) == ERROR


def test_normalize_with_known_numbers():
    # (raw - threshold) / (score_max - score_min) + 0.5, clipped to [0, 1]
    got = CAL.normalize(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 9.0]))
    np.testing.assert_allclose(got, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0])
    assert CAL.normalize(3.5) == pytest.approx(0.625)
    np.testing.assert_allclose(CAL.normalize_map(np.array([0.1, 0.3, 0.5, 0.9, 2.0])), [0.0, 0.25, 0.5, 1.0, 1.0])


def test_calibrate_quantiles_with_known_numbers():
    scores = np.arange(101, dtype=np.float64)  # quantile 0.99 of 0..100 is 99
    maps = (np.arange(10_000, dtype=np.float64) / 10_000).reshape(100, 10, 10)[:101]
    maps = np.concatenate([maps, maps[:1]])  # 101 maps for 101 scores: value 0..0.9999, 0..0.0099 twice
    cal = calibrate(scores, maps)
    assert (cal.quantile, cal.pixel_quantile) == (0.99, 0.999)
    assert cal.image_threshold == pytest.approx(99.0)
    assert (cal.score_min, cal.score_max, cal.n_images) == (0.0, 100.0, 101)
    flat = np.sort(maps.ravel())
    assert cal.pixel_threshold == pytest.approx(np.quantile(flat, 0.999))
    assert cal.pixel_threshold == pytest.approx(0.9988901, abs=1e-9)
    assert cal.map_max == pytest.approx(np.quantile(flat, 0.9999)) and cal.map_min == 0.0
    assert cal.problem() is None
    # the image threshold splits the validation scores as the quantile says: 1 in 101 above it
    assert sum(cal.verdict(s) == NG for s in scores) == 1


def test_calibrate_edges_with_known_numbers():
    cal = calibrate(np.array([1, 3]), np.zeros((2, 4, 4), np.int64))  # integers: computed in float64
    assert cal.image_threshold == pytest.approx(1 + 2 * 0.99) and cal.n_images == 2
    with pytest.raises(ValueError, match="at least 2"):
        calibrate(np.array([1.0]), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN/Inf"):
        calibrate(np.array([1.0, np.nan]), np.zeros((2, 4, 4)))
    tiny = Calibration(image_threshold=1e-9, score_min=0.0, score_max=2e-9, pixel_threshold=0.0, map_min=0.0,
                       map_max=1e-9, n_images=2, quantile=0.5, pixel_quantile=0.5)
    assert tiny.normalize(2e-9) == pytest.approx(1.0)  # a tiny range is a range, not 1
    assert tiny.normalize(1.5e-9) == pytest.approx(0.75)
    assert tiny.normalize_map(np.array([5e-10]))[0] == pytest.approx(0.5)
    assert isinstance(CAL.normalize(np.float32(3.1)), np.floating) and CAL.normalize(np.float32(3.1)).dtype == np.float64


def test_regions_with_known_numbers():
    from edgead.core.postprocess import regions

    amap = np.zeros((10, 10), np.float32)
    amap[1:3, 1:3] = [[0.6, 0.7], [0.8, 0.9]]  # area 4: exactly the minimum, kept
    amap[6:9, 5:8] = 0.55  # area 9
    amap[0, 9] = 0.99  # area 1: dropped
    found = regions(amap, 0.5, min_area=4)
    assert [(r.x, r.y, r.w, r.h, r.area) for r in found] == [(5, 6, 3, 3, 9), (1, 1, 2, 2, 4)]
    assert found[1].peak == pytest.approx(0.9) and found[1].mean == pytest.approx(0.75)
    assert found[0].peak == pytest.approx(0.55) and found[0].mean == pytest.approx(0.55)
    assert regions(amap, 0.9, min_area=1) == [r for r in regions(amap, 0.9, min_area=1) if r.peak > 0.9]
    assert [r.area for r in regions(amap, 0.55, min_area=1)] == [4, 1]  # strictly above the threshold


def test_top_k_fraction_must_be_a_fraction():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"top-k fraction must lie in \[0, 1\]"):
            TopKMean(bad)
    wide = torch.zeros(2, 1, 4, 100)
    wide[:, 0, 0, :4] = 1.0  # per sample, over every pixel: top 1% of 400 is 4 pixels
    np.testing.assert_allclose(TopKMean(0.01)(wide).numpy(), [1.0, 1.0])


def test_verdict_band_with_known_numbers():
    from edgead.certify.rules import band

    big = Calibration(image_threshold=1000.0, score_min=999.0, score_max=1001.0, pixel_threshold=0.5, map_min=0.0,
                      map_max=1.0, n_images=10, quantile=0.99, pixel_quantile=0.999)
    assert band(big, "fp32") == pytest.approx(2e-3)  # 0.1% of the range 2, above 1e-6 of 1000
    flat = dataclasses.replace(big, score_min=1000.0, score_max=1000.0)
    assert band(flat, "fp32") == pytest.approx(1e-3) and band(flat, "int8") == pytest.approx(0.1)
