"""Shared BiGAN / ALI pieces for EGBAD and ALAD: joint discriminators and an exportable spectral norm.

``JointDiscriminator``     D(x, z): a DCGAN encoder for the image and 1x1 convolutions for the latent,
                           concatenated, then a joint 1x1 layer whose activations are the features
                           f_D(x, z) (EGBAD's and ALAD's ``intermediate_layer``) and a 1x1 logit head.
``PairDiscriminator``      D(x, x'): one DCGAN encoder over the channel-wise concatenation (ALAD's D_xx).
``LatentPairDiscriminator``D(z, z'): a small MLP of 1x1 convolutions (ALAD's D_zz).
``JointFeatures`` /        inference wrappers: [0, 1] images in, features out. Each *owns* its
``PairFeatures``           discriminator (training calls ``.net`` on [-1, 1] images), so a detector
                           holds every module under one attribute and the safetensors state dict has
                           no aliased tensors; two components may point at the same wrapper.
``apply_spectral_norm``    Miyato et al. 2018 on every conv/linear weight of a network.

Spectral norm: ``torch.nn.utils.parametrizations.spectral_norm`` computes σ with ``torch.vdot``,
which the TorchScript ONNX exporter (opset 17) cannot export, and the older hook-based
``torch.nn.utils.spectral_norm`` starts from random singular vectors (the first forward in eval
mode divides by a random σ). :class:`SpectralNorm` is the same parametrization (one power iteration
per training forward, 15 at registration) with σ = u·(W v) written as plain MatMuls: in eval mode it
is a function of constants, which the exporter and onnx-simplifier fold into ordinary weights, so
engines see plain convolutions. Its state-dict keys are ``<layer>.parametrizations.weight.original``
and ``...weight.0._u`` / ``._v``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from edgead.models.blocks import DCGANEncoder, SignedRange


class SpectralNorm(nn.Module):
    """Parametrization W -> W / σ(W), σ estimated by power iteration on W reshaped to (out, -1)."""

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        super().__init__()
        mat = weight.detach().flatten(1)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.register_buffer("_u", F.normalize(mat.new_empty(mat.shape[0]).normal_(), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(mat.new_empty(mat.shape[1]).normal_(), dim=0, eps=eps))
        self._power_method(mat, 15)  # start from converged vectors, as torch's parametrization does

    @torch.no_grad()
    def _power_method(self, mat: Tensor, iterations: int) -> None:
        for _ in range(iterations):  # in place: the buffers keep their identity (state dict, .to())
            self._u.copy_(F.normalize(mat @ self._v, dim=0, eps=self.eps))
            self._v.copy_(F.normalize(mat.t() @ self._u, dim=0, eps=self.eps))

    def forward(self, weight: Tensor) -> Tensor:
        mat = weight.flatten(1)
        if self.training:
            self._power_method(mat.detach(), self.n_power_iterations)
            u, v = self._u.clone(), self._v.clone()  # the graph must not see the next in-place update
        else:
            u, v = self._u, self._v
        sigma = u @ (mat @ v)  # MatMul, not vdot: exportable
        return weight / sigma


def apply_spectral_norm(net: nn.Module) -> nn.Module:
    """Register :class:`SpectralNorm` on the weight of every Conv2d / Linear of ``net`` (after init)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", SpectralNorm(layer.weight))
    return net


def has_spectral_norm(net: nn.Module) -> bool:
    return any(isinstance(m, SpectralNorm) for m in net.modules())


def _act(dropout: float) -> list[nn.Module]:
    return [nn.LeakyReLU(0.2, inplace=True)] + ([nn.Dropout(dropout)] if dropout > 0 else [])


class JointDiscriminator(nn.Module):
    """D(x, z) for images x in [-1, 1] (B, C, S, S) and latents z (B, latent_dim, 1, 1).

    x path: DCGAN encoder (``norm`` between its convs; never batch norm under a gradient penalty)
    projecting the 4x4 features to ``hidden`` channels; z path: 1x1 conv to ``hidden``; joint:
    1x1 conv to ``2·hidden`` (the features) and a 1x1 logit. LeakyReLU 0.2 and optional dropout
    after every hidden layer, as the EGBAD and ALAD reference discriminators.
    Returns ``(logit (B,), features (B, 2·hidden, 1, 1))``.
    """

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int = 64, max_width: int = 512,
                 norm: str = "batch", hidden: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.x_net = DCGANEncoder(image_size, channels, hidden, width, max_width, norm)
        self.x_act = nn.Sequential(*_act(dropout))
        self.z_net = nn.Sequential(nn.Conv2d(latent_dim, hidden, 1), *_act(dropout))
        self.joint = nn.Sequential(nn.Conv2d(2 * hidden, 2 * hidden, 1), *_act(dropout))
        self.head = nn.Conv2d(2 * hidden, 1, 1)

    def features(self, x: Tensor, z: Tensor) -> Tensor:
        return self.joint(torch.cat([self.x_act(self.x_net(x)), self.z_net(z)], dim=1))

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(x, z)
        return self.head(feats).flatten(), feats


class PairDiscriminator(nn.Module):
    """D(x, x') over the channel concatenation of two [-1, 1] images (ALAD's D_xx).

    Returns ``(logit (B,), features (B, F, 4, 4))``: the DCGAN encoder's last feature map.
    """

    def __init__(self, image_size: int, channels: int, width: int = 64, max_width: int = 512,
                 norm: str = "none") -> None:
        super().__init__()
        self.encoder = DCGANEncoder(image_size, channels, 1, width, max_width, norm, extra_channels=channels)

    def features(self, x: Tensor, x2: Tensor) -> Tensor:
        return self.encoder.features(torch.cat([x, x2], dim=1))

    def forward(self, x: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.features(x, x2)
        return self.encoder.head(feats).flatten(), feats


class LatentPairDiscriminator(nn.Module):
    """D(z, z') for latents (B, L, 1, 1): 1x1 convs 2L -> 64 -> 32 -> 1 (ALAD's D_zz)."""

    def __init__(self, latent_dim: int, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2 * latent_dim, hidden, 1), *_act(dropout),
                                  nn.Conv2d(hidden, hidden // 2, 1), *_act(dropout))
        self.head = nn.Conv2d(hidden // 2, 1, 1)

    def forward(self, z: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.body(torch.cat([z, z2], dim=1))
        return self.head(feats).flatten(), feats


class JointFeatures(nn.Module):
    """(image in [0, 1], z) -> f_D(x, z) of the :class:`JointDiscriminator` it owns."""

    def __init__(self, net: JointDiscriminator) -> None:
        super().__init__()
        self.fp32_normalize = SignedRange()
        self.net = net

    def forward(self, image: Tensor, z: Tensor) -> Tensor:
        return self.net.features(self.fp32_normalize(image), z)


class PairFeatures(nn.Module):
    """(image, other) in [0, 1] -> f_xx(x, x') of the :class:`PairDiscriminator` it owns.

    ``other`` defaults to ``image``: the component computing f_xx(x, x) then has the single input
    ``image`` (an ONNX graph cannot declare the same input name twice).
    """

    def __init__(self, net: PairDiscriminator) -> None:
        super().__init__()
        self.fp32_normalize = SignedRange()
        self.net = net

    def forward(self, image: Tensor, other: Tensor | None = None) -> Tensor:
        x = self.fp32_normalize(image)
        return self.net.features(x, x if other is None else self.fp32_normalize(other))


def bce_logits(logits: Tensor, target: float) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def sample_latent(n: int, latent_dim: int, like: Tensor) -> Tensor:
    """z ~ N(0, I), shaped (n, latent_dim, 1, 1) like the encoder's output."""
    return torch.randn(n, latent_dim, 1, 1, device=like.device, dtype=like.dtype)
