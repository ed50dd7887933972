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


def gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


class SSIMMap(nn.Module):
    """Per-pixel structural dissimilarity 1 - SSIM (Wang et al. 2004), averaged over channels.

    One Gaussian 11x11 window (sigma 1.5) for training and testing alike: the public SSIM-AE port
    trains with a Gaussian window and tests with a uniform one, so its scores drift.
    Reflect padding keeps the map the input's size without a dark border.
    """

    def __init__(self, channels: int, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> None:
        super().__init__()
        kernel = gaussian_window(window, sigma).expand(channels, 1, window, window).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)
        self.channels = channels
        self.pad = window // 2
        self.c1 = (0.01 * data_range) ** 2
        self.c2 = (0.03 * data_range) ** 2

    def _blur(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, [self.pad] * 4, mode="reflect"), self.kernel, groups=self.channels)

    def ssim(self, a: Tensor, b: Tensor) -> Tensor:
        mu_a, mu_b = self._blur(a), self._blur(b)
        var_a = self._blur(a * a) - mu_a * mu_a
        var_b = self._blur(b * b) - mu_b * mu_b
        cov = self._blur(a * b) - mu_a * mu_b
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
