"""GANomaly (Akcay et al., ACCV 2018, arXiv 1805.06725).

Networks
    Generator: encoder G_E (image -> z), decoder G_D (z -> x̂), second encoder E (x̂ -> ẑ),
    all DCGAN blocks. Discriminator D: a DCGAN encoder with a sigmoid head, whose last features
    drive the adversarial loss.
Losses (weights 1 / 50 / 1 by default)
    adversarial: L2 between D's features of x and x̂ (feature matching);
    contextual: L1(x, x̂);  encoder: L2(z, ẑ).
    D: binary cross-entropy; re-initialised when its loss collapses below 1e-5.
Score
    mean((z - ẑ)²) over the latent, as in the reference code. The pixel map (which the
    reference and anomalib lack) is the reconstruction distance chosen by ``scorer``.
    Normalisation and threshold come from held-out normal images, never from the test set.
    Training runs the same components as inference; the losses compare images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, to_signed
from edgead.models.blocks import (DCGANDecoder, DCGANEncoder, FeatureDiscriminator, ImageDecoder,
                                  ImageEncoder, dcgan_init)
from edgead.models.heads import RENAMED_SCORER_KEYS, MeanSquaredDistance, ScoreHead
from edgead.models.losses import bce_discriminator_step, update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer


@dataclass
class GANomalyConfig(DetectorConfig):
    max_width: int = 512
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0


class GANomaly(Detector):
    name = "ganomaly"
    Config = GANomalyConfig
    renamed_state_keys = RENAMED_SCORER_KEYS

    def __init__(self, config: GANomalyConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = ImageEncoder(DCGANEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width))
        self.generator = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                                   upsample=c.upsample))
        self.encoder2 = ImageEncoder(DCGANEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width))
        # map: distance(x, x̂); score: mean((z - ẑ)²)
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed), MeanSquaredDistance(),
                              map_inputs=("image", "reconstruction"), score_inputs=("z", "z_hat"))
        self.discriminator = FeatureDiscriminator(c.image_size, c.channels, c.width, c.max_width)  # training only
        for net in (self.encoder, self.generator, self.encoder2, self.discriminator):
            net.apply(dcgan_init)

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), ("z",)),
            Component("generator", self.generator, ("z",), ("reconstruction",)),
            Component("encoder2", self.encoder2, ("reconstruction",), ("z_hat",)),
            self.head.component(),
        ]


class GANomalyRecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.5, 0.999)

    def __init__(self, detector: GANomaly, train: TrainConfig) -> None:
        super().__init__(detector, train)
        d = detector
        self.opt_g = self.adam(d.encoder, d.generator, d.encoder2)
        self.opt_d = self.adam(d.discriminator)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        t = d.run(images, until="z_hat")  # z = G_E(x), x̂ = G_D(z), ẑ = E(x̂): the inference graph
        x, x_hat = to_signed(images), to_signed(t["reconstruction"])

        # Generator: feature matching + contextual + encoder losses.
        _, feat_real = d.discriminator(x)
        _, feat_fake = d.discriminator(x_hat)
        adv = F.mse_loss(feat_fake, feat_real.detach())
        con = F.l1_loss(x_hat, x)
        enc = F.mse_loss(t["z_hat"], t["z"])
        loss_g = c.w_adv * adv + c.w_con * con + c.w_enc * enc
        update(self.opt_g, loss_g)

        # Discriminator: real vs reconstructed.
        loss_d = bce_discriminator_step(d.discriminator, self.opt_d, x, x_hat, reinit=dcgan_init)
        return {"g": loss_g.item(), "adv": adv.item(), "con": con.item(), "enc": enc.item(), "d": loss_d}


register(GANomaly, GANomalyRecipe)
