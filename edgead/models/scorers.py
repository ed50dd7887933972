"""Reconstruction scorers: (image, reconstruction) in [0, 1] -> anomaly map (B, 1, H, W).

Shared by every reconstruction detector (``--scorer l1|ssim|vgg``): each is the map function of its
detector's :class:`~edgead.models.heads.ScoreHead`, which holds it in an FP32 island (``fp32_map``).
The VGG map is the exception (``mixed_precision``): its convolutions may run FP16 and its own
``fp32_*`` parts keep the input handling and the distance FP32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCORERS = ("l1", "ssim", "vgg")


class L1Map(nn.Module):
    """Mean absolute residual over channels."""

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        return (image - recon).abs().mean(dim=1, keepdim=True)


def gaussian_1d(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """The 2-D window: the outer product of :func:`gaussian_1d` with itself."""
    g = gaussian_1d(size, sigma)
    return torch.outer(g, g)


class SSIMMap(nn.Module):
    """Per-pixel structural dissimilarity 1 - SSIM (Wang et al. 2004), averaged over channels.

    One Gaussian 11x11 window (sigma 1.5) for training and testing alike: the public SSIM-AE port
    trains with a Gaussian window and tests with a uniform one, so its scores drift.
    Reflect padding keeps the map the input's size without a dark border.

    The Gaussian is separable, so the five blurs (a, b, a², b², ab) run as one stacked depthwise
    1x11 pass and one 11x1 pass: the same window, 2x11 instead of 121 taps per pixel (the 2-D
    blurs were 77% of the SSIM-AE's ONNX Runtime time at 256²).
    """

    def __init__(self, channels: int, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> None:
        super().__init__()
        g = gaussian_1d(window, sigma)
        n = 5 * channels  # the five blurred quantities, stacked on the channel axis
        self.register_buffer("kernel_w", g.view(1, 1, 1, window).expand(n, 1, 1, window).contiguous(),
                             persistent=False)
        self.register_buffer("kernel_h", g.view(1, 1, window, 1).expand(n, 1, window, 1).contiguous(),
                             persistent=False)
        self.channels = channels
        self.pad = window // 2
        self.c1 = (0.01 * data_range) ** 2
        self.c2 = (0.03 * data_range) ** 2

    def _blur(self, x: Tensor) -> Tensor:
        x = F.pad(x, [self.pad] * 4, mode="reflect")
        x = F.conv2d(x, self.kernel_w, groups=x.shape[1])
        return F.conv2d(x, self.kernel_h, groups=x.shape[1])

    def ssim(self, a: Tensor, b: Tensor) -> Tensor:
        blurred = self._blur(torch.cat([a, b, a * a, b * b, a * b], dim=1))
        mu_a, mu_b, aa, bb, ab = blurred.chunk(5, dim=1)
        var_a = aa - mu_a * mu_a
        var_b = bb - mu_b * mu_b
        cov = ab - mu_a * mu_b
        num = (2 * mu_a * mu_b + self.c1) * (2 * cov + self.c2)
        den = (mu_a * mu_a + mu_b * mu_b + self.c1) * (var_a + var_b + self.c2)
        return num / den

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        return (1.0 - self.ssim(image, recon)).mean(dim=1, keepdim=True)


def is_map_scorer(module: nn.Module) -> bool:
    """True for the modules :func:`make_scorer` builds: they carry no trained weights."""
    from edgead.models import vgg

    return isinstance(module, (L1Map, SSIMMap, vgg.VGGPerceptualMap))


def make_scorer(name: str, channels: int, vgg_weights: str | None = None, seed: int = 0) -> nn.Module:
    """Build the map function ``name`` for images with ``channels`` channels.

    L1 and SSIM are all reduction: the score head keeps the whole distance FP32. The VGG scorer
    keeps its convolutions exportable in FP16 and names only its own reductions ``fp32_*``.
    """
    if name == "l1":
        return L1Map()
    if name == "ssim":
        return SSIMMap(channels)
    if name == "vgg":
        from edgead.models.vgg import VGGPerceptualMap

        return VGGPerceptualMap(channels, weights=vgg_weights, seed=seed)
    raise ValueError(f"unknown scorer {name!r}; choose one of {SCORERS}")
