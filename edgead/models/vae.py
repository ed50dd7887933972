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
    Score: the same negative ELBO, reconstruction + β·KL. By default the graph decodes the mean μ,
    deterministically. With ``mc_samples`` = L > 0 the graph itself averages the reconstruction
    term and the map over L codes z = μ + σ·ε, with ε a fixed buffer drawn from the seed -- the
    Monte-Carlo estimate of E_q[-log p(x | z)], the same in PyTorch, calibration and every engine,
    because it is one graph; the KL is analytic either way.
    Map: the reconstruction distance chosen by ``scorer`` (between x and the decoded μ, or the
    mean over samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.heads import ScoreHead
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
    mc_samples: int = 0  # > 0: Monte-Carlo score over this many fixed, seeded samples, in the graph

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
    """Per-sample reconstruction + β·KL; images in [0, 1]. With ``samples`` = L > 0 the
    reconstructions come stacked sample-major (L·B images) and the term is their mean."""

    def __init__(self, recon_loss: str, beta: float, samples: int = 0) -> None:
        super().__init__()
        self.recon_loss, self.beta, self.samples = recon_loss, beta, max(1, samples)

    def reconstruction(self, image: Tensor, recon: Tensor) -> Tensor:
        image = image.repeat(recon.shape[0] // image.shape[0], 1, 1, 1)
        if self.recon_loss == "mse":
            err = (image - recon).pow(2)
        else:
            p = recon.clamp(1e-6, 1 - 1e-6)
            err = -(image * p.log() + (1 - image) * (1 - p).log())
        return err.flatten(1).sum(dim=1)

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(dim=1)

    def forward(self, image: Tensor, recon: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        rec = self.reconstruction(image, recon).view(-1, image.shape[0]).mean(dim=0)
        return rec + self.beta * self.kl(mu, logvar)


class LatentSamples(nn.Module):
    """(μ, log σ²) -> L codes μ + σ·ε, stacked sample-major along the batch (L·B, latent, 1, 1).

    ε is a fixed buffer drawn once from the config's seed, so the Monte-Carlo score is one
    deterministic graph: the same numbers in PyTorch, in calibration and in every engine.
    """

    def __init__(self, latent_dim: int, samples: int, seed: int) -> None:
        super().__init__()
        eps = torch.randn(samples, 1, latent_dim, 1, 1, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("eps", eps, persistent=False)

    def forward(self, mu: Tensor, logvar: Tensor) -> Tensor:
        z = mu.unsqueeze(0) + (0.5 * logvar).exp().unsqueeze(0) * self.eps
        return z.flatten(0, 1)


class SampleMean(nn.Module):
    """A reconstruction map averaged over the L stacked reconstructions of each image."""

    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.scorer = scorer
        self.mixed_precision = getattr(scorer, "mixed_precision", False)

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        n = recon.shape[0] // image.shape[0]
        if n == 1:
            return self.scorer(image, recon)
        maps = self.scorer(image.repeat(n, 1, 1, 1), recon)
        return maps.view(n, image.shape[0], *maps.shape[1:]).mean(dim=0)


class VAE(Detector):
    name = "vae"
    Config = VAEConfig

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = GaussianEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width)
        self.sampler = LatentSamples(c.latent_dim, c.mc_samples, c.seed) if c.mc_samples > 0 else None
        self.decoder = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                                 upsample=c.upsample))
        self.head = ScoreHead(SampleMean(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed)),
                              NegativeELBO(c.recon_loss, c.beta, c.mc_samples),
                              map_inputs=("image", "reconstruction"),
                              score_inputs=("image", "reconstruction", "mu", "logvar"))
        self.encoder.apply(dcgan_init)
        self.decoder.apply(dcgan_init)

    def components(self) -> list[Component]:
        code = "mu" if self.sampler is None else "z"  # deterministic (z = μ) unless Monte-Carlo
        comps = [Component("encoder", self.encoder, ("image",), ("mu", "logvar"))]
        if self.sampler is not None:
            comps.append(Component("sampler", self.sampler, ("mu", "logvar"), ("z",)))
        return comps + [Component("decoder", self.decoder, (code,), ("reconstruction",)), self.head.component()]


class VAERecipe(Recipe):
    default_lr = 1e-3
    default_betas = (0.9, 0.999)

    def __init__(self, detector: VAE, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.elbo = NegativeELBO(detector.config.recon_loss, detector.config.beta)
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
