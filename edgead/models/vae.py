"""Variational autoencoder (Kingma & Welling, ICLR 2014, arXiv 1312.6114), as an anomaly detector
(e.g. Lu & Xu, "Anomaly detection for skin disease images using variational autoencoder", 2018).

Networks
    Encoder: a DCGAN encoder whose 1x1 output holds μ and log σ² of q(z | x) (z: 100);
    decoder: the mirrored DCGAN decoder, z -> image (tanh, mapped to [0, 1]). DCGAN init.
Loss
    The negative ELBO per image: reconstruction + β·KL(q(z | x) ‖ N(0, I)), β = 1, with
    z = μ + σ·ε (reparameterisation). Reconstruction is the sum of squared errors over pixels in
    [0, 1] (``recon_loss="mse"``: a Gaussian decoder of fixed variance, up to constants) or the
    summed binary cross-entropy (``"bce"``: a Bernoulli decoder). Adam 1e-3 (common VAE practice).
Score and map
    Score: the same negative ELBO, reconstruction + β·KL. The fused graph (what exports) decodes the
    mean μ, deterministically. With ``mc_samples`` = L > 0, :meth:`VAE.score` (torch only) instead
    averages the reconstruction term and the map over L sampled z (seeded, so repeatable) -- the
    Monte-Carlo estimate of E_q[-log p(x | z)]; the KL is analytic either way.
    Map: the reconstruction distance chosen by ``scorer`` (between x and the decoded μ, or the
    mean over samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.blocks import DCGANDecoder, DCGANEncoder, ImageDecoder, ImageEncoder, dcgan_init
from edgead.models.losses import update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer

RECON_LOSSES = ("mse", "bce")


@dataclass
class VAEConfig(DetectorConfig):
    max_width: int = 512
    beta: float = 1.0
    recon_loss: str = "mse"
    mc_samples: int = 0  # > 0: Monte-Carlo scoring in score() (torch only)

    def __post_init__(self) -> None:
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")


class GaussianEncoder(nn.Module):
    """Image in [0, 1] -> (μ, log σ²), each (B, latent, 1, 1)."""

    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int, max_width: int) -> None:
        super().__init__()
        self.net = ImageEncoder(DCGANEncoder(image_size, channels, 2 * latent_dim, width, max_width))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(image).chunk(2, dim=1)
        return mu, logvar


class NegativeELBO(nn.Module):
    """Per-sample reconstruction + β·KL; images in [0, 1]."""

    def __init__(self, recon_loss: str, beta: float) -> None:
        super().__init__()
        self.recon_loss, self.beta = recon_loss, beta

    def reconstruction(self, image: Tensor, recon: Tensor) -> Tensor:
        if self.recon_loss == "mse":
            err = (image - recon).pow(2)
        else:
            p = recon.clamp(1e-6, 1 - 1e-6)
            err = -(image * p.log() + (1 - image) * (1 - p).log())
        return err.flatten(1).sum(dim=1)

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(dim=1)

    def forward(self, image: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        return self.reconstruction(image, recon) + self.beta * self.kl(mu, logvar)


class ELBOScoreHead(nn.Module):
    """(image, reconstruction, μ, log σ²) -> (score, map)."""

    def __init__(self, scorer: nn.Module, recon_loss: str, beta: float) -> None:
        super().__init__()
        self.scorer = scorer
        self.fp32_score = NegativeELBO(recon_loss, beta)

    def forward(self, image: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
        return self.fp32_score(image, recon, mu, logvar), self.scorer(image, recon)


class VAE(Detector):
    name = "vae"
    Config = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = GaussianEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width)
        self.decoder = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width))
        self.head = ELBOScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed), c.recon_loss, c.beta)
        self.encoder.apply(dcgan_init)
        self.decoder.apply(dcgan_init)

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), ("mu", "logvar")),
            Component("decoder", self.decoder, ("mu",), ("reconstruction",)),  # deterministic: z = μ
            Component("scorer", self.head, ("image", "reconstruction", "mu", "logvar"), ("score", "anomaly_map")),
        ]

    def score(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The fused graph when ``mc_samples`` is 0; else the Monte-Carlo average over sampled z."""
        samples = self.config.mc_samples
        if samples <= 0:
            return super().score(image)
        gen = torch.Generator(device=image.device).manual_seed(self.config.seed)
        with torch.no_grad():
            mu, logvar = self.encoder(image)
            std = (0.5 * logvar).exp()
            score, amap = torch.zeros(len(image), device=image.device), torch.zeros_like(image[:, :1])
            for _ in range(samples):
                z = mu + std * torch.randn(mu.shape, generator=gen, device=mu.device)
                s, m = self.head(image, self.decoder(z), mu, logvar)
                score, amap = score + s / samples, amap + m / samples
        return score, amap


class VAERecipe(Recipe):
    default_lr = 1e-3
    default_betas = (0.9, 0.999)

    def __init__(self, detector: VAE, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.elbo = detector.head.fp32_score
        self.opt = self.adam(detector.encoder, detector.decoder)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d = self.detector
        mu, logvar = d.encoder(images)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        recon = d.decoder(z)
        rec = self.elbo.reconstruction(images, recon).mean()
        kl = self.elbo.kl(mu, logvar).mean()
        loss = rec + self.elbo.beta * kl
        update(self.opt, loss)
        return {"loss": loss.item(), "recon": rec.item(), "kl": kl.item()}


register(VAE, VAERecipe)
