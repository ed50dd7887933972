"""Normalising-flow building blocks shared by CFLOW-AD and PyramidFlow (written here, no FrEIA).

A flow maps features ``x`` to ``z`` invertibly and returns ``log|det dz/dx|`` with it, so the
exact log-likelihood of ``x`` is ``log N(z; 0, I) + log|det J|`` (Dinh et al., RealNVP 2017;
Kingma & Dhariwal, Glow 2018). Every block works on feature maps ``(N, C, H, W)`` with 1x1
convolutions, i.e. on each position's channel vector (a *fibre*) independently: a batch of
sampled fibres is simply ``(N, C, 1, 1)``, and the same weights score a whole map at inference.

Blocks
    :class:`ActNorm` (Glow): per-channel affine ``(x - b) * exp(-log_s)``, initialised from data so
        that the flow's input has zero mean and unit variance per channel (VGG features of the
        AdaIN weights reach the hundreds; a flow starting at that scale diverges).
    :class:`ConditionalAffineCoupling` (RealNVP/Glow with a condition, as in CFLOW's FrEIA
        ``AllInOneBlock``): ``x = [x1, x2]``; ``(a_s, a_t) = subnet([x1, c])``;
        ``y2 = x2 * exp(s) + t`` with the soft clamp ``s = clamp * tanh(a_s / clamp)``; then a
        learned global per-channel scale (softplus, starts at 1) and a fixed, seeded channel
        permutation so the next block transforms the other half. ``c`` may be absent.
    :class:`ConditionalFlow`: ``ActNorm`` followed by ``n`` coupling blocks.
    :class:`InvertibleConv1x1` (Glow, LU form), optionally volume-normalised (PyramidFlow).

FP32 islands (the FP16 export keeps every op under an ``fp32_`` scope in FP32)
    * ``fp32_affine`` in each coupling: the soft clamp, ``exp(s)``, ``x2 * exp(s) + t``, the global
      scale and the log-determinant sum. ``exp`` of an unclamped scale overflows FP16 above
      ~11, and a sum of 256-512 log-scales per position loses the small differences the
      likelihood is made of. The flow's running state ``x`` therefore stays FP32 throughout;
    * ``fp32_actnorm``: the data-dependent normalisation of the raw features (large values);
    * :class:`GaussianLogLikelihood` (held by the detectors as ``fp32_loglik``): ``-0.5 * sum z^2``
      over 256-512 channels overflows FP16 as soon as ``|z|`` is ~11 on an anomalous fibre.
    Only the coupling subnets (1x1 convs + ReLU: the bulk of the FLOPs) run at the engine's
    precision; their inputs are the normalised, bounded flow state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


def positional_encoding_2d(channels: int, height: int, width: int) -> Tensor:
    """(1, channels, H, W) sin/cos encoding of the position (Vaswani et al., as in CFLOW-AD):
    the first half of the channels encode the column, the second half the row."""
    if channels % 4:
        raise ValueError(f"positional encoding needs a multiple of 4 channels, got {channels}")
    half = channels // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32) * -(math.log(10000.0) / half))
    cols = torch.arange(width, dtype=torch.float32)[:, None] * freq[None]   # (W, half/2)
    rows = torch.arange(height, dtype=torch.float32)[:, None] * freq[None]  # (H, half/2)
    enc = torch.zeros(channels, height, width)
    enc[0:half:2] = torch.sin(cols).t()[:, None, :].expand(-1, height, -1)
    enc[1:half:2] = torch.cos(cols).t()[:, None, :].expand(-1, height, -1)
    enc[half::2] = torch.sin(rows).t()[:, :, None].expand(-1, -1, width)
    enc[half + 1::2] = torch.cos(rows).t()[:, :, None].expand(-1, -1, width)
    return enc[None]


class ActNorm(nn.Module):
    """Glow's activation normalisation: ``y = (x - bias) * exp(-log_scale)`` per channel.

    :meth:`initialize` sets ``bias``/``log_scale`` to the mean and log-std of sample features
    (once, before training). Log-det per position: ``-sum(log_scale)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @torch.no_grad()
    def initialize(self, x: Tensor, floor: float = 0.01) -> None:
        """Data-dependent init from features ``(N, C, H, W)``: zero mean, unit variance per channel.

        A channel that (almost) never fires on normal images (a dead ReLU) gets ``floor`` times the
        mean channel std instead of its own ~0 std, so it cannot blow up the scale of the flow."""
        x = x.detach().float().transpose(0, 1).flatten(1)
        std = x.std(dim=1)
        std = std.clamp_min(floor * float(std.mean()) + 1e-12)
        self.bias.copy_(x.mean(dim=1).view_as(self.bias))
        self.log_scale.copy_(torch.log(std).view_as(self.log_scale))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = (x - self.bias) * torch.exp(-self.log_scale)
        return y, -self.log_scale.sum() * torch.ones_like(y[:, :1])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(self.log_scale) + self.bias


class _AffineUpdate(nn.Module):
    """The FP32 arithmetic of one coupling: soft clamp, exp, affine update, global scale, log-det."""

    def __init__(self, clamp: float) -> None:
        super().__init__()
        self.clamp = clamp

    def forward(self, x1: Tensor, x2: Tensor, a: Tensor, global_scale: Tensor) -> tuple[Tensor, Tensor]:
        a_s, a_t = a.to(x2.dtype).chunk(2, dim=1)
        s = self.clamp * torch.tanh(a_s / self.clamp)
        y = torch.cat([x1, x2 * torch.exp(s) + a_t], dim=1)
        scale = F.softplus(global_scale)
        log_det = s.sum(dim=1, keepdim=True) + torch.log(scale).sum()
        return y * scale, log_det


class ConditionalAffineCoupling(nn.Module):
    """One flow step: affine coupling conditioned on ``[x1, c]``, global scale, fixed permutation.

    ``forward(x, c) -> (y, log_det)`` with ``log_det`` of shape ``(N, 1, H, W)``; ``c`` is the
    condition map (``cond_channels`` channels, broadcast over the batch) or None.
    """

    def __init__(self, channels: int, cond_channels: int = 0, hidden_ratio: float = 2.0, clamp: float = 1.9,
                 seed: int = 0, kernel_size: int = 1) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        self.split = channels // 2
        inner = self.split + cond_channels
        hidden = max(8, int(round(inner * hidden_ratio)))
        pad = kernel_size // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(inner, hidden, kernel_size, padding=pad), nn.ReLU(),
            nn.Conv2d(hidden, 2 * (channels - self.split), kernel_size, padding=pad))
        # Start close to the identity (FrEIA scales the subnet output by 0.1 for the same reason).
        nn.init.normal_(self.subnet[-1].weight, std=1e-3)
        nn.init.zeros_(self.subnet[-1].bias)
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), math.log(math.e - 1.0)))  # softplus -> 1
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm, persistent=True)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=True)
        self.fp32_affine = _AffineUpdate(clamp)
        self.cond_channels = cond_channels

    def _subnet(self, x1: Tensor, c: Tensor | None) -> Tensor:
        if c is not None:
            x1 = torch.cat([x1, c.expand(x1.shape[0], -1, -1, -1)], dim=1)
        return self.subnet(x1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        y, log_det = self.fp32_affine(x1, x2, self._subnet(x1, c), self.global_scale)
        return y[:, self.perm], log_det

    def inverse(self, y: Tensor, c: Tensor | None = None) -> Tensor:
        y = y[:, self.inv_perm] / F.softplus(self.global_scale)
        x1, y2 = y[:, :self.split], y[:, self.split:]
        a_s, a_t = self._subnet(x1, c).chunk(2, dim=1)
        s = self.fp32_affine.clamp * torch.tanh(a_s / self.fp32_affine.clamp)
        return torch.cat([x1, (y2 - a_t) * torch.exp(-s)], dim=1)


class ConditionalFlow(nn.Module):
    """``ActNorm`` then ``n_blocks`` conditional couplings: ``(x, c) -> (z, log_det)``."""

    def __init__(self, channels: int, cond_channels: int = 0, n_blocks: int = 8, hidden_ratio: float = 2.0,
                 clamp: float = 1.9, seed: int = 0, kernel_size: int = 1) -> None:
        super().__init__()
        self.fp32_actnorm = ActNorm(channels)
        self.blocks = nn.ModuleList(
            ConditionalAffineCoupling(channels, cond_channels, hidden_ratio, clamp, seed + i, kernel_size)
            for i in range(n_blocks))

    def forward(self, x: Tensor, c: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z, log_det = self.fp32_actnorm(x)
        for block in self.blocks:
            z, ld = block(z, c)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        for block in reversed(self.blocks):
            z = block.inverse(z, c)
        return self.fp32_actnorm.inverse(z)


class GaussianLogLikelihood(nn.Module):
    """``log N(z; 0, I) + log_det`` per position, divided by the channel count (CFLOW's
    per-dimension log-likelihood, comparable across taps of different widths): (N, 1, H, W).
    Held as ``fp32_loglik``."""

    def forward(self, z: Tensor, log_det: Tensor) -> Tensor:
        channels = z.shape[1]
        log_p = -0.5 * (z.pow(2).sum(dim=1, keepdim=True) + channels * LOG_2PI) + log_det
        return log_p / channels


class InvertibleConv1x1(nn.Module):
    """Glow's invertible 1x1 conv in LU form, ``W = P L (U + diag(sign * exp(log_s)))``.

    With ``volume_norm`` (PyramidFlow) the log-scales are centred, ``log_s - mean(log_s)``, so
    ``|det W| = 1``: the mixing preserves volume. The weight is a function of parameters only, so
    the exporter folds it into one Conv initializer.
    """

    def __init__(self, channels: int, volume_norm: bool = True, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(channels, channels, generator=gen))[0]
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("p", p)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("eye", torch.eye(channels))
        self.register_buffer("upper_mask", torch.triu(torch.ones(channels, channels), 1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(diag.abs().log())
        self.volume_norm = volume_norm

    def weight(self) -> Tensor:
        log_s = self.log_s - self.log_s.mean() if self.volume_norm else self.log_s
        lower = self.lower * self.upper_mask.t() + self.eye
        upper = self.upper * self.upper_mask + self.eye * (self.sign * torch.exp(log_s))
        return self.p @ lower @ upper

    def log_det(self) -> Tensor:
        """log|det W| per position (0 with volume normalisation)."""
        return (self.log_s - self.log_s.mean()).sum() if self.volume_norm else self.log_s.sum()

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight()[:, :, None, None].to(x.dtype))

    def inverse(self, y: Tensor) -> Tensor:
        inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, inv[:, :, None, None])
