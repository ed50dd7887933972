"""UTAD's networks: IE-Net (inception-style encoder with a Gaussian latent, decoder, and the
mutual-information discriminator) and Expert-Net (detail extractor, content encoder, AdaIN decoder).

The method, its losses and its score are in :mod:`edgead.models.utad`; the choices the paper leaves
open are listed there.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.blocks import SignedRange

if TYPE_CHECKING:
    from edgead.models.utad import UTADConfig

# --------------------------------------------------------------------------- IE-Net


class InceptionBlock(nn.Module):
    """1x1, 3x3 and 3x3-3x3 branches concatenated, then batch norm and LeakyReLU(0.2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        quarter = max(1, cout // 4)
        self.b1 = nn.Conv2d(cin, quarter, 1, bias=False)
        self.b3 = nn.Conv2d(cin, cout - 2 * quarter, 3, padding=1, bias=False)
        self.b5 = nn.Sequential(nn.Conv2d(cin, quarter, 3, padding=1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                                nn.Conv2d(quarter, quarter, 3, padding=1, bias=False))
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(torch.cat([self.b1(x), self.b3(x), self.b5(x)], dim=1)))


def ie_geometry(image_size: int, width: int, max_width: int, depth: int) -> tuple[int, list[int], int]:
    """(depth, block widths, final grid side) of IE-Net for ``image_size``."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"UTAD needs a power-of-two image size >= 16, got {image_size}")
    limit = int(math.log2(image_size)) - 2  # keep at least a 4x4 grid
    depth = depth or min(4, limit)
    if not 1 <= depth <= limit:
        raise ValueError(f"ie_depth {depth} leaves less than 4x4 at {image_size}²; use 1..{limit}")
    widths = [min(width * 2 ** i, max_width) for i in range(depth)]
    return depth, widths, image_size >> depth


class IEEncoder(nn.Module):
    """Image in [0, 1] -> mu (forward); ``encode`` also gives the MI feature h and log-variance."""

    def __init__(self, c: UTADConfig) -> None:
        super().__init__()
        _, widths, grid = ie_geometry(c.image_size, c.width, c.max_width, c.ie_depth)
        self.fp32_normalize = SignedRange()
        layers: list[nn.Module] = []
        prev = c.channels
        for w in widths:
            layers += [InceptionBlock(prev, w), nn.MaxPool2d(2)]
            prev = w
        self.trunk = nn.Sequential(*layers)
        self.to_grid = nn.AvgPool2d(grid // 4) if grid > 4 else nn.Identity()
        self.feature_dim = prev * 16
        self.mlp = nn.Sequential(nn.Linear(self.feature_dim, c.ie_hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(c.ie_hidden, c.ie_hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(c.ie_hidden, 2 * c.latent_dim))
        self.latent_dim = c.latent_dim

    def encode(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.to_grid(self.trunk(self.fp32_normalize(image))).flatten(1)
        stats = self.mlp(h)
        return h, stats[:, :self.latent_dim], stats[:, self.latent_dim:]

    def forward(self, image: Tensor) -> Tensor:
        return self.encode(image)[1]


class IEDecoder(nn.Module):
    """Code (B, latent) -> impression (B, C, H, W) in [0, 1]."""

    def __init__(self, c: UTADConfig) -> None:
        super().__init__()
        depth, widths, grid = ie_geometry(c.image_size, c.width, c.max_width, c.ie_depth)
        top = widths[-1]
        layers: list[nn.Module] = [nn.Linear(c.latent_dim, top * 16), nn.Unflatten(1, (top, 4, 4)),
                                   nn.BatchNorm2d(top), nn.LeakyReLU(0.2, inplace=True)]
        for _ in range(int(math.log2(grid)) - 2):  # 4x4 -> the encoder's last grid
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(top, top, 3, padding=1, bias=False),
                       nn.BatchNorm2d(top), nn.LeakyReLU(0.2, inplace=True)]
        prev = top
        for i in range(depth - 1, -1, -1):
            out = widths[i - 1] if i > 0 else widths[0]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), InceptionBlock(prev, out)]
            prev = out
        layers += [nn.Conv2d(prev, c.channels, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class MIDiscriminator(nn.Module):
    """T(h, z): a 4-layer MLP scoring (feature, code) pairs; returns logits (B,)."""

    def __init__(self, feature_dim: int, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim + latent_dim, hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(hidden, 1))

    def forward(self, h: Tensor, z: Tensor) -> Tensor:
        return self.net(torch.cat([h, z], dim=1)).squeeze(1)


def jsd_mi_loss(discriminator: MIDiscriminator, h: Tensor, z: Tensor) -> Tensor:
    """Minus the JSD mutual-information bound (f-GAN / DIM): positives (h_i, z_i), negatives
    (h_{i-1}, z_i)."""
    positive = discriminator(h, z)
    negative = discriminator(h.roll(1, dims=0), z)
    return F.softplus(-positive).mean() + F.softplus(negative).mean()


# --------------------------------------------------------------------------- Expert-Net


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2 if stride == 1 else 1, padding_mode="reflect")


class AdaIN(nn.Module):
    """(1 + gamma)·IN(x) + beta, gamma and beta (B, C) given per image."""

    def forward(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        return F.instance_norm(x, eps=1e-5) * (1.0 + gamma[:, :, None, None]) + beta[:, :, None, None]


class ResBlock(nn.Module):
    """conv-norm-ReLU-conv-norm + identity; the norms are instance norm or AdaIN."""

    def __init__(self, dim: int, adaptive: bool) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(dim, dim, 3), _conv(dim, dim, 3)
        self.adaptive = adaptive
        self.norm = AdaIN() if adaptive else nn.InstanceNorm2d(dim)
        self.dim = dim

    def forward(self, x: Tensor, params: Tensor | None = None) -> Tensor:
        if self.adaptive:
            assert params is not None
            g1, b1, g2, b2 = params.split(self.dim, dim=1)
            y = F.relu(self.norm(self.conv1(x), g1, b1))
            return x + self.norm(self.conv2(y), g2, b2)
        return x + self.norm(self.conv2(F.relu(self.norm(self.conv1(x)))))


class ContentEncoder(nn.Module):
    def __init__(self, channels: int, width: int, max_width: int, down: int, res: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv(channels, width, 7), nn.InstanceNorm2d(width), nn.ReLU(inplace=True)]
        ch = width
        for _ in range(down):
            nxt = min(ch * 2, max_width)
            layers += [_conv(ch, nxt, 4, 2), nn.InstanceNorm2d(nxt), nn.ReLU(inplace=True)]
            ch = nxt
        self.down = nn.Sequential(*layers)
        self.res = nn.ModuleList(ResBlock(ch, adaptive=False) for _ in range(res))
        self.out_channels = ch

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        for block in self.res:
            x = block(x)
        return x


class ExpertDecoder(nn.Module):
    """Residual blocks (AdaIN or IN), then upsample + 5x5 conv + layer norm + ReLU, 7x7 conv, sigmoid."""

    def __init__(self, channels: int, width: int, max_width: int, down: int, res: int, adaptive: bool) -> None:
        super().__init__()
        widths = [width]
        for _ in range(down):
            widths.append(min(widths[-1] * 2, max_width))
        ch = widths[-1]
        self.res = nn.ModuleList(ResBlock(ch, adaptive) for _ in range(res))
        self.adaptive_params = 4 * ch * res if adaptive else 0  # gamma, beta of two AdaINs per block
        layers: list[nn.Module] = []
        for i in range(down, 0, -1):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(widths[i], widths[i - 1], 5),
                       nn.GroupNorm(1, widths[i - 1]), nn.ReLU(inplace=True)]
        layers += [_conv(widths[0], channels, 7), nn.Sigmoid()]
        self.up = nn.Sequential(*layers)

    def forward(self, content: Tensor, params: Tensor | None = None) -> Tensor:
        x = content
        for k, block in enumerate(self.res):
            p = None if params is None else params[:, k * 4 * block.dim:(k + 1) * 4 * block.dim]
            x = block(x, p)
        return self.up(x)


class DetailExtractor(nn.Module):
    """E_d: three convs (no normalisation), global average pooling, linear -> detail vector."""

    def __init__(self, channels: int, width: int, detail_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_conv(channels, width, 7), nn.ReLU(inplace=True),
                                 _conv(width, 2 * width, 4, 2), nn.ReLU(inplace=True),
                                 _conv(2 * width, 4 * width, 4, 2), nn.ReLU(inplace=True),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(4 * width, detail_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ExpertNet(nn.Module):
    """(image, impression) in [0, 1] -> reconstruction (and the naive impression when asked)."""

    def __init__(self, c: UTADConfig, naive_output: bool = False) -> None:
        super().__init__()
        args = (c.channels, c.width, c.max_width, c.expert_down, c.expert_res)
        self.fp32_normalize = SignedRange()
        self.detail = DetailExtractor(c.channels, c.width, c.detail_dim)
        self.enc_impression = ContentEncoder(*args)  # E_1
        self.dec_image = ExpertDecoder(*args, adaptive=True)  # G_1
        self.mlp = nn.Sequential(nn.Linear(c.detail_dim, c.mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(c.mlp_dim, c.mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(c.mlp_dim, self.dec_image.adaptive_params))
        self.enc_image = ContentEncoder(*args)  # E_2
        self.dec_impression = ExpertDecoder(*args, adaptive=False)  # G_2
        self.naive_output = naive_output

    def details(self, image: Tensor) -> Tensor:
        return self.detail(self.fp32_normalize(image))

    def reconstruct(self, impression: Tensor, details: Tensor) -> Tensor:
        return self.dec_image(self.enc_impression(self.fp32_normalize(impression)), self.mlp(details))

    def naive_impression(self, image: Tensor) -> Tensor:
        return self.dec_impression(self.enc_image(self.fp32_normalize(image)))

    def forward(self, image: Tensor, impression: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        recon = self.reconstruct(impression, self.details(image))
        if self.naive_output:
            return recon, self.naive_impression(image)
        return recon
