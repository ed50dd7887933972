"""Shared building blocks: DCGAN encoder/decoder pyramids, the pix2pix U-Net, the classic
double-conv U-Net (DRAEM), the dense patch network (Uninformed Students, the distilled PatchCore
encoder), the decoders' upsampling layers, weight init.

Every detector builds its networks from these, so a fix here reaches all of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn


def pyramid_depth(image_size: int) -> int:
    """Number of stride-2 stages from ``image_size`` down to 4x4 (DCGAN: isize must be 16·2^k)."""
    if image_size < 16 or image_size & (image_size - 1):
        raise ValueError(f"image size must be a power of two >= 16, got {image_size}")
    return int(math.log2(image_size)) - 2


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation (Radford et al.): conv N(0, 0.02), batch-norm N(1, 0.02) with zero bias.

    Apply with ``net.apply(dcgan_init)``: anomalib's GANomaly defines it but never applies it.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.InstanceNorm2d)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":  # no batch statistics: a WGAN-GP critic must not use batch norm
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


UPSAMPLING = ("transpose", "resize")


def _check_upsampling(kind: str) -> None:
    if kind not in UPSAMPLING:
        raise ValueError(f"upsample must be one of {UPSAMPLING}, got {kind!r}")


def upsample_conv(in_ch: int, out_ch: int, kind: str = "transpose", bias: bool = False) -> nn.Module:
    """x2 upsampling of a decoder: the papers' 4x4/2 transposed conv (``transpose``), or a nearest
    resize and a 3x3 conv (``resize``; Odena et al., "Deconvolution and Checkerboard Artifacts",
    Distill 2016). ONNX Runtime's CPU provider has no INT8 ConvTranspose: it runs one in float
    between Q/DQ pairs, while the resize + conv form quantises to a QLinearConv.
    """
    _check_upsampling(kind)
    if kind == "transpose":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=bias)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=bias))


def grow_from_code(in_ch: int, out_ch: int, size: int, kind: str = "transpose", bias: bool = False) -> nn.Module:
    """(B, in_ch, 1, 1) code -> (B, out_ch, size, size). ``transpose``: a size x size transposed conv;
    ``resize``: the same linear map as a 1x1 conv to out_ch·size² channels and a pixel shuffle,
    which INT8 backends run as a quantised conv (no ConvTranspose in the graph)."""
    _check_upsampling(kind)
    if kind == "transpose":
        return nn.ConvTranspose2d(in_ch, out_ch, size, 1, 0, bias=bias)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch * size * size, 1, bias=bias), nn.PixelShuffle(size))


class DCGANEncoder(nn.Module):
    """Image (B, C, S, S) -> latent (B, out_dim, 1, 1), with the 4x4 features before the last conv.

    Conv 4x4/2 + LeakyReLU(0.2), then [conv 4x4/2, norm, LeakyReLU] until 4x4, then a 4x4 valid conv.
    Channels double each stage from ``width``, capped at ``max_width``.
    """

    def __init__(self, image_size: int, channels: int, out_dim: int, width: int = 64,
                 max_width: int = 512, norm: str = "batch", extra_channels: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels + extra_channels, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = width
        for _ in range(pyramid_depth(image_size) - 1):
            nxt = min(ch * 2, max_width)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1, bias=False), _norm(norm, nxt),
                       nn.LeakyReLU(0.2, inplace=True)]
            ch = nxt
        self.features = nn.Sequential(*layers)
        self.feature_channels = ch
        self.head = nn.Conv2d(ch, out_dim, 4, 1, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DCGANDecoder(nn.Module):
    """Latent (B, in_dim, 1, 1) -> image (B, C, S, S) in [-1, 1]; the mirror of :class:`DCGANEncoder`.

    ``upsample``: the paper's transposed convs, or resize + conv (:func:`upsample_conv`).
    """

    def __init__(self, image_size: int, channels: int, in_dim: int, width: int = 64,
                 max_width: int = 512, norm: str = "batch", upsample: str = "transpose") -> None:
        super().__init__()
        depth = pyramid_depth(image_size)
        widths = [min(width * 2 ** i, max_width) for i in range(depth)]  # widths[i]: channels at stage i
        layers: list[nn.Module] = [
            grow_from_code(in_dim, widths[-1], 4, upsample), _norm(norm, widths[-1]), nn.ReLU(inplace=True),
        ]
        for i in range(depth - 1, 0, -1):
            layers += [upsample_conv(widths[i], widths[i - 1], upsample),
                       _norm(norm, widths[i - 1]), nn.ReLU(inplace=True)]
        layers += [upsample_conv(widths[0], channels, upsample), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z)


class FeatureDiscriminator(nn.Module):
    """DCGAN discriminator that also returns its last features (for feature matching and scores)."""

    def __init__(self, image_size: int, channels: int, width: int = 64, max_width: int = 512,
                 norm: str = "batch", sigmoid: bool = True) -> None:
        super().__init__()
        self.encoder = DCGANEncoder(image_size, channels, 1, width, max_width, norm)
        self.sigmoid = sigmoid

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.encoder.features(x)
        logit = self.encoder.head(features).flatten(1).squeeze(1)
        return (logit.sigmoid() if self.sigmoid else logit), features


class UNetGenerator(nn.Module):
    """pix2pix U-Net: log2(S) stride-2 downsamplings to 1x1, mirrored with skip connections.

    Used by Skip-GANomaly. ``bottleneck`` exposes the 1x1 code for latent losses.
    """

    def __init__(self, image_size: int, channels: int, width: int = 64, max_width: int = 512,
                 upsample: str = "transpose") -> None:
        super().__init__()
        depth = int(math.log2(image_size))
        if 2 ** depth != image_size:
            raise ValueError(f"U-Net needs a power-of-two image size, got {image_size}")
        widths = [min(width * 2 ** i, max_width) for i in range(depth)]
        self.down = nn.ModuleList()
        prev = channels
        for i, w in enumerate(widths):
            norm = nn.Identity() if i in (0, depth - 1) else nn.BatchNorm2d(w)
            act = nn.Identity() if i == 0 else nn.LeakyReLU(0.2, inplace=False)
            # pix2pix order: activation, conv, norm (the first block has no activation)
            self.down.append(nn.Sequential(act, nn.Conv2d(prev, w, 4, 2, 1, bias=False), norm))
            prev = w
        self.up = nn.ModuleList()
        for i in range(depth - 1, 0, -1):
            in_ch = widths[i] if i == depth - 1 else widths[i] * 2
            self.up.append(nn.Sequential(nn.ReLU(), upsample_conv(in_ch, widths[i - 1], upsample),
                                         nn.BatchNorm2d(widths[i - 1])))
        self.out = nn.Sequential(nn.ReLU(), upsample_conv(widths[0] * 2, channels, upsample, bias=True), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        import torch

        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        y = skips.pop()  # the 1x1 bottleneck
        for block in self.up:
            y = torch.cat([block(y), skips.pop()], dim=1)
        return self.out(y)


class SignedRange(nn.Module):
    """[0, 1] -> [-1, 1] (the tanh range). Held as ``fp32_normalize`` so FP16 engines keep it FP32."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2.0 - 1.0


class UnitRange(nn.Module):
    """[-1, 1] -> [0, 1]."""

    def forward(self, x: Tensor) -> Tensor:
        return (x + 1.0) * 0.5


class ImageEncoder(nn.Module):
    """Image in [0, 1] -> latent: the normalisation travels with the encoder into every engine."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.fp32_normalize = SignedRange()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return self.net(self.fp32_normalize(image))


class ImageDecoder(nn.Module):
    """Latent -> image in [0, 1] from a tanh decoder."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.to_unit = UnitRange()

    def forward(self, z: Tensor) -> Tensor:
        return self.to_unit(self.net(z))


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """[conv 3x3, batch norm, ReLU] twice: the stage of the classic (Ronneberger) U-Net."""
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                         nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class ConvUNet(nn.Module):
    """Encoder-decoder of :func:`double_conv` stages with max-pool down and bilinear up.

    ``depth`` poolings; stage ``i`` has ``width·min(2^i, max_mult)`` channels (DRAEM: b, 2b, 4b,
    8b, 8b...). With ``skips`` each decoder stage concatenates the encoder stage of its resolution
    (a U-Net); without, it is a plain autoencoder (DRAEM's reconstructive sub-network). The last
    conv is linear: callers choose their own output activation.
    """

    def __init__(self, in_ch: int, out_ch: int, width: int, depth: int, max_mult: int = 8,
                 skips: bool = True) -> None:
        super().__init__()
        widths = [width * min(2 ** i, max_mult) for i in range(depth + 1)]
        self.skips = skips
        self.down = nn.ModuleList([double_conv(in_ch, widths[0])]
                                  + [double_conv(widths[i - 1], widths[i]) for i in range(1, depth + 1)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in range(depth, 0, -1):
            self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                         nn.Conv2d(widths[i], widths[i - 1], 3, padding=1),
                                         nn.BatchNorm2d(widths[i - 1]), nn.ReLU(inplace=True)))
            self.merge.append(double_conv(widths[i - 1] * (2 if skips else 1), widths[i - 1]))
        self.out = nn.Conv2d(widths[0], out_ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        import torch

        feats = []
        for i, stage in enumerate(self.down):
            x = stage(x if i == 0 else self.pool(x))
            feats.append(x)
        feats.pop()  # the bottleneck is x itself
        for up, merge in zip(self.up, self.merge):
            x = up(x)
            x = merge(torch.cat([x, feats.pop()], dim=1) if self.skips else x)
        return self.out(x)


# --------------------------------------------------------------------------- dense patch networks

SLOPE = 5e-3  # Uninformed Students' leaky ReLU slope


def patch_layers(patch_size: int, tail: int = 3) -> list[tuple[int, int]]:
    """(kernel, stride) of the 3x3 convs whose receptive field is ``patch_size`` = 2^(n+3) + 1 with
    ``tail`` = 3 stride-1 convs at the end; each further tail conv widens the field by 2·stride."""
    n = int(round(math.log2((patch_size - 1) / 4))) - 1
    if n < 0 or 2 ** (n + 3) + 1 != patch_size:
        raise ValueError(f"patch size must be 2^k + 1 with k >= 3, got {patch_size}")
    return [(3, 1)] + [(3, 2)] * n + [(3, 1)] * tail


def receptive_field(layers: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(receptive field, output stride) of a stack of (kernel, stride) convs."""
    field, jump = 1, 1
    for kernel, stride in layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field, jump


class PatchNet(nn.Module):
    """Image (B, 3, H, W) -> descriptors (B, d, H/s, W/s), one per p x p patch."""

    def __init__(self, patch_size: int, out_dim: int, width: int, max_width: int, channels: int = 3,
                 tail: int = 3) -> None:
        super().__init__()
        layers = patch_layers(patch_size, tail)
        self.receptive_field, self.stride = receptive_field(layers)
        mods: list[nn.Module] = []
        prev, level = channels, 0
        for kernel, stride in layers:
            level += stride == 2
            cout = min(width * 2 ** level, max_width)
            mods += [nn.Conv2d(prev, cout, kernel, stride, kernel // 2), nn.LeakyReLU(SLOPE)]
            prev = cout
        mods.append(nn.Conv2d(prev, out_dim, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
