"""Issue 15, CPU stations: the separable SSIM window, the CPU INT8 fallback, the OpenVINO engine,
``--precision auto``, the roofline peak and the pipeline's thread choice."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bundles import tiny_bundle  # noqa: E402

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("cpu_bundle"), "washer")


# ---------------------------------------------------------------- separable SSIM
def _ssim_2d(a, b, window: int = 11, sigma: float = 1.5):
    """The textbook 2-D form: five 11x11 depthwise Gaussian blurs."""
    import torch.nn.functional as F

    from edgead.models.scorers import gaussian_window

    c = a.shape[1]
    k = gaussian_window(window, sigma).expand(c, 1, window, window).double()
    blur = lambda x: F.conv2d(F.pad(x, [window // 2] * 4, mode="reflect"), k, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


@pytest.mark.parametrize("channels", [1, 3])
def test_separable_ssim_equals_2d_window(channels: int) -> None:
    from edgead.models.scorers import SSIMMap, gaussian_window

    g = torch.Generator().manual_seed(channels)
    a = torch.rand(2, channels, 40, 36, generator=g)
    b = (a + 0.2 * torch.rand(2, channels, 40, 36, generator=g)).clamp(0, 1)
    ssim = SSIMMap(channels)
    sep = ssim.ssim(a, b)
    ref = _ssim_2d(a.double(), b.double())
    assert sep.shape == a.shape
    # FP32 rounding of the SSIM ratio: a few ulps of values that reach ~1
    assert float((sep.double() - ref).abs().max()) < 2e-5
    assert not torch.equal(sep, torch.ones_like(sep))  # the pair differs: the test can fail
    # the 1-D taps are the 2-D window's marginals
    assert torch.allclose(torch.outer(ssim.kernel_w[0, 0, 0], ssim.kernel_h[0, 0, :, 0]),
                          gaussian_window(), atol=1e-8)
