"""Skip-GANomaly (Akcay et al., IJCNN 2019, arXiv 1901.08954).

Networks
    Generator G: the pix2pix U-Net (log2(S) stride-2 downsamplings to 1x1, batch norm, skip
    connections), image -> reconstruction x̂. While training, Gaussian noise N(0, σ²) is added to
    its input (σ = 1 in the [-1, 1] range: the reference's ``torch.randn``), so the skips cannot
    learn the identity. Discriminator D: a DCGAN encoder with a sigmoid head; its last features
    f(·) (before the final conv) feed the latent loss and the score.
Losses (weights 1 / 50 / 1, as the reference code; the paper reports w_con ≈ 40)
    adversarial: BCE(D(x̂), real);  contextual: L1(x, x̂);  latent: L2(f(x), f(x̂)).
    D: binary cross-entropy, real vs reconstructed; re-initialised when its loss collapses
    below 1e-5. (The reference also adds the latent loss to D's objective; we don't.)
    Adam 2e-4, β1 0.5.
Score
    λ·mean((x - x̂)²) + (1 - λ)·mean((f(x) - f(x̂))²), λ = 0.9, both in the [-1, 1] range,
    as the reference's test loop. D's feature extractor is therefore an inference component.
    Map: the reconstruction distance chosen by ``scorer``. Normalisation and threshold come from
    held-out normal images, never from the test set (the reference min-max-normalises the test set).
    Training runs the generator component on the noisy image (σ in [-1, 1] is σ/2 in [0, 1]); the
    losses and D compare images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, to_signed
from edgead.models.blocks import (FeatureDiscriminator, ImageDecoder, ImageEncoder, SignedRange,
                                  UNetGenerator, dcgan_init)
from edgead.models.heads import RENAMED_SCORER_KEYS, ScoreHead, WeightedImageFeatureDistance
from edgead.models.losses import bce_discriminator_step, update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer


@dataclass
class SkipGANomalyConfig(DetectorConfig):
    max_width: int = 512
    w_adv: float = 1.0
    w_con: float = 50.0  # reference code; the paper's ablation settles near 40
    w_lat: float = 1.0
    noise_std: float = 1.0  # training-time input noise, in the [-1, 1] range
    score_lambda: float = 0.9  # weight of the image term in the score


class DiscriminatorFeatures(nn.Module):
    """Image in [0, 1] -> the last feature map of a :class:`FeatureDiscriminator` (or critic).

    Owns the whole discriminator (``net``, which training calls directly); inference uses only its
    feature layers, so the head never reaches an exported graph. Owning it, rather than sharing it
    with a second attribute, keeps the state dict free of aliased tensors (safetensors refuses them).
    """

    def __init__(self, net: FeatureDiscriminator) -> None:
        super().__init__()
        self.fp32_normalize = SignedRange()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return self.net.encoder.features(self.fp32_normalize(image))


class SkipGANomaly(Detector):
    name = "skip_ganomaly"
    Config = SkipGANomalyConfig
    renamed_state_keys = RENAMED_SCORER_KEYS

    def __init__(self, config: SkipGANomalyConfig) -> None:
        super().__init__(config)
        c = config
        # [0, 1] -> [-1, 1] -> U-Net (tanh) -> [0, 1]
        self.generator = ImageEncoder(ImageDecoder(UNetGenerator(c.image_size, c.channels, c.width, c.max_width,
                                                                 c.upsample)))
        self.discriminator = DiscriminatorFeatures(FeatureDiscriminator(c.image_size, c.channels, c.width,
                                                                        c.max_width))
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)
        # map: distance(x, x̂); score: λ·mean((x - x̂)²) + (1 - λ)·mean((f(x) - f(x̂))²)
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed),
                              WeightedImageFeatureDistance(c.score_lambda, 1.0 - c.score_lambda),
                              map_inputs=("image", "reconstruction"),
                              score_inputs=("image", "reconstruction", "features_real", "features_fake"))

    def components(self) -> list[Component]:
        return [
            Component("generator", self.generator, ("image",), ("reconstruction",)),
            Component("features_real", self.discriminator, ("image",), ("features_real",)),
            Component("features_fake", self.discriminator, ("reconstruction",), ("features_fake",)),
            self.head.component(),
        ]


class SkipGANomalyRecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.5, 0.999)

    def __init__(self, detector: SkipGANomaly, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.opt_g = self.adam(detector.generator)
        self.opt_d = self.adam(detector.discriminator)
        self.disc = detector.discriminator.net  # (probability, features) of a [-1, 1] image

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        noisy = images + 0.5 * c.noise_std * torch.randn_like(images)  # σ in [-1, 1] is σ/2 in [0, 1]
        x, x_hat = to_signed(images), to_signed(d.generator(noisy))

        # Generator: adversarial + contextual + latent losses.
        p_fake, feat_fake = self.disc(x_hat)
        _, feat_real = self.disc(x)
        adv = F.binary_cross_entropy(p_fake, torch.ones_like(p_fake))
        con = F.l1_loss(x_hat, x)
        lat = F.mse_loss(feat_fake, feat_real.detach())
        loss_g = c.w_adv * adv + c.w_con * con + c.w_lat * lat
        update(self.opt_g, loss_g)

        # Discriminator: real vs reconstructed.
        loss_d = bce_discriminator_step(self.disc, self.opt_d, x, x_hat, reinit=dcgan_init)
        return {"g": loss_g.item(), "adv": adv.item(), "con": con.item(), "lat": lat.item(), "d": loss_d}


register(SkipGANomaly, SkipGANomalyRecipe)
