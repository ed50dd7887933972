"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019).

Networks
    Generator G: a DCGAN decoder, z (128) -> image. Critic C: a DCGAN encoder *without batch
    norm* (layer norm; WGAN-GP penalises per-sample gradients, which batch statistics couple),
    with a linear head; f(·) = its features before the last layer. Encoder E: a DCGAN encoder
    with a tanh on z.
Training (two stages, ``Recipe.stages = ("gan", "encoder")``)
    gan: WGAN-GP (Gulrajani et al. 2017): critic loss C(G(z)) - C(x) + 10·GP, five critic steps
    (one per batch) for every generator step (loss -C(G(z))); z ~ N(0, I); Adam 1e-4, β (0, 0.9).
    encoder: G and C are frozen (no gradients, G's batch norm in inference mode) and E is trained
    with the same Adam settings by one of the paper's three objectives (``encoder_mode``):
      izif (default): MSE(x, G(E(x))) + κ·MSE(f(x), f(G(E(x)))), κ = 1;
      izi: MSE(x, G(E(x)));   ziz: MSE(z, E(G(z))) on sampled z.
Score
    MSE_img + κ·MSE_feat, the izif terms, images compared in [-1, 1] (whatever the training
    mode, as in the paper). Map: the reconstruction distance chosen by ``scorer``.
    The encoder stage runs the inference components (E, G, then the critic features of x and of
    G(E(x))); the critic and the gradient penalty see images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, to_signed
from edgead.models.blocks import (DCGANDecoder, DCGANEncoder, FeatureDiscriminator, ImageDecoder,
                                  ImageEncoder, dcgan_init)
from edgead.models.heads import RENAMED_SCORER_KEYS, ScoreHead, WeightedImageFeatureDistance
from edgead.models.losses import gradient_penalty, update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer
from edgead.models.skip_ganomaly import DiscriminatorFeatures

ENCODER_MODES = ("izif", "izi", "ziz")


@dataclass
class FAnoGANConfig(DetectorConfig):
    image_size: int = 64  # the paper's 64x64 patches
    latent_dim: int = 128
    max_width: int = 512
    critic_norm: str = "layer"  # never "batch" under a gradient penalty
    n_critic: int = 5
    gp_weight: float = 10.0
    kappa: float = 1.0
    encoder_mode: str = "izif"

    def __post_init__(self) -> None:
        if self.encoder_mode not in ENCODER_MODES:
            raise ValueError(f"encoder_mode must be one of {ENCODER_MODES}, got {self.encoder_mode!r}")
        if self.critic_norm == "batch":
            raise ValueError("a WGAN-GP critic must not use batch norm; use critic_norm='layer' or 'instance'")


class FAnoGAN(Detector):
    name = "fanogan"
    Config = FAnoGANConfig
    renamed_state_keys = RENAMED_SCORER_KEYS

    def __init__(self, config: FAnoGANConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = ImageEncoder(nn.Sequential(
            DCGANEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width), nn.Tanh()))
        self.generator = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                                   upsample=c.upsample))
        self.critic = DiscriminatorFeatures(FeatureDiscriminator(c.image_size, c.channels, c.width, c.max_width,
                                                                 norm=c.critic_norm, sigmoid=False))
        # map: distance(x, x̂); score: mean((x - x̂)²) + κ·mean((f(x) - f(x̂))²)
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed),
                              WeightedImageFeatureDistance(1.0, c.kappa), map_inputs=("image", "reconstruction"),
                              score_inputs=("image", "reconstruction", "features_real", "features_fake"))
        for net in (self.encoder, self.generator, self.critic):
            net.apply(dcgan_init)

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), ("z",)),
            Component("generator", self.generator, ("z",), ("reconstruction",)),
            Component("features_real", self.critic, ("image",), ("features_real",)),
            Component("features_fake", self.critic, ("reconstruction",), ("features_fake",)),
            self.head.component(),
        ]


class FAnoGANRecipe(Recipe):
    stages = ("gan", "encoder")
    default_lr = 1e-4
    default_betas = (0.0, 0.9)

    def __init__(self, detector: FAnoGAN, train: TrainConfig) -> None:
        super().__init__(detector, train)
        d = detector
        self.C = d.critic.net  # (critic value, features) of a [-1, 1] image: training only
        self.opt_g = self.adam(d.generator)
        self.opt_c = self.adam(d.critic)
        self.opt_e = self.adam(d.encoder)
        self.critic_steps = 0

    def begin_stage(self, stage: str) -> None:
        frozen = stage == "encoder"
        for net in (self.detector.generator, self.detector.critic):
            net.requires_grad_(not frozen)

    def _sample_z(self, n: int, like: Tensor) -> Tensor:
        return torch.randn(n, self.detector.config.latent_dim, 1, 1, device=like.device, dtype=like.dtype)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        return self._gan_step(images) if stage == "gan" else self._encoder_step(images)

    def _generate(self, z: Tensor) -> Tensor:
        """G(z) in [-1, 1], the critic's range."""
        return to_signed(self.detector.generator(z))

    def _gan_step(self, images: Tensor) -> dict[str, float]:
        c = self.detector.config
        critic = lambda t: self.C(t)[0]  # noqa: E731 - the scalar critic value per sample
        x = to_signed(images)
        with torch.no_grad():
            fake = self._generate(self._sample_z(len(x), x))
        gp = gradient_penalty(critic, (x,), (fake,))
        wasserstein = critic(x).mean() - critic(fake).mean()
        loss_c = -wasserstein + c.gp_weight * gp
        update(self.opt_c, loss_c)
        logs = {"critic": loss_c.item(), "w_dist": wasserstein.item(), "gp": gp.item()}
        self.critic_steps += 1
        if self.critic_steps % c.n_critic == 0:
            loss_g = -critic(self._generate(self._sample_z(len(x), x))).mean()
            update(self.opt_g, loss_g)
            logs["g"] = loss_g.item()
        return logs

    def _encoder_step(self, images: Tensor) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        d.generator.eval()  # frozen: batch-norm statistics must not move either
        d.critic.eval()
        if c.encoder_mode == "ziz":
            z = self._sample_z(len(images), images)
            with torch.no_grad():
                generated = d.generator(z)
            loss = F.mse_loss(d.encoder(generated), z)
            logs = {"ziz": loss.item()}
        else:
            izif = c.encoder_mode == "izif"
            t = d.run(images, until="features_fake" if izif else "reconstruction")  # E, G (and f of x, x̂)
            img = F.mse_loss(to_signed(t["reconstruction"]), to_signed(images))
            loss, logs = img, {"img": img.item()}
            if izif:  # f(x) has no gradient: C is frozen and x is data
                feat = F.mse_loss(t["features_fake"], t["features_real"])
                loss = img + c.kappa * feat
                logs["feat"] = feat.item()
        update(self.opt_e, loss)
        return {"e": loss.item(), **logs}


register(FAnoGAN, FAnoGANRecipe)
