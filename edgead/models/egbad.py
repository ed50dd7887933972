"""EGBAD: Efficient GAN-Based Anomaly Detection (Zenati et al. 2018, arXiv 1802.06222), a BiGAN;
with the Wasserstein BiGAN of GANspection (seed 002, Bennar/GANspection) as ``loss="wgan"``.

Networks
    Encoder E: image -> z (DCGAN encoder, linear output, no tanh), generator G: z -> image (DCGAN
    decoder, tanh), joint discriminator D(x, z) (:class:`~edgead.models.bigan_blocks.JointDiscriminator`):
    DCGAN encoder for x + 1x1 convs for z, concatenated; its joint hidden layer is f_D.
    z ~ N(0, I), latent_dim 100.
Training, ``loss="bce"`` (standard BiGAN, the reference)
    D: BCE(D(x, E(x)), real) + BCE(D(G(z), z), fake). G and E fool it with swapped labels:
    BCE(D(G(z), z), real) + BCE(D(x, E(x)), fake). One D step then one G/E step per batch.
    Adam 1e-5, β1 0.5 (the reference's rate: slow; ``TrainConfig.lr`` overrides it). The reference
    trains with batch 100 and dropout 0.5 in D; here ``dropout`` defaults to 0.2 (ALAD's value) and
    the batch is ``TrainConfig.batch_size``.
Training, ``loss="wgan"`` (GANspection)
    WGAN-GP on the joint critic: loss_C = C(G(z), z) - C(x, E(x)) + 10·GP, the penalty taken at
    interpolates of the *pairs* (x, E(x)) and (G(z), z); one critic step per batch and a G/E step
    every ``n_critic`` (5) batches with loss C(x, E(x)) - C(G(z), z) + feature_weight·L_feat.
    The critic has no batch norm (``disc_norm`` defaults to "layer" and "batch" is refused) and no
    dropout. Adam 1e-4, β (0.1, 0.9); the reference uses batch 16.
    L_feat: GANspection's README adds "an l2 loss between the feature representation of real and
    generated samples when updating the generator and encoder" — its stored code lacks it. Real
    pairs (x, E(x)) and generated pairs (G(z), z) are unpaired samples, so we match the *batch means*
    of the critic features, ‖mean f(x, E(x)) − mean f(G(z), z)‖² / F (Salimans et al. 2016 feature
    matching, which the README cites), gradients reaching both E and G. ``feature_weight`` defaults
    to 1 for "wgan" and 0 for "bce" (it may be set for either).
Score
    (1 − w)·mean|x − G(E(x))| + w·mean|f_D(x, E(x)) − f_D(G(E(x)), E(x))| with w = 0.1 (the
    reference's ``weight``, its "fm" feature score). Means over pixels/features rather than the
    paper's sums, so the two terms' balance does not depend on image or feature size; images are
    compared in [-1, 1], the networks' range. Optionally + latent_weight·‖E(x)‖₂: GANspection's α
    term (default 0). GANspection reports hazelnut image AUROC 0.89 for the latent norm alone and
    0.83 for its combined score (α‖E(x)‖₂ + β‖x − G(E(x))‖₁ + γ‖f − f̂‖₂); the feature term stays L1.
    Map: the reconstruction distance chosen by ``scorer``.
    Note: EGBAD's MNIST/KDD results are AUPRC, not AUROC.
Training calls the encoder and generator components; D and the gradient penalty see images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, to_signed
from edgead.models.bigan_blocks import JointDiscriminator, JointFeatures, bce_logits, sample_latent
from edgead.models.blocks import DCGANDecoder, DCGANEncoder, ImageDecoder, ImageEncoder, dcgan_init
from edgead.models.heads import RENAMED_SCORER_KEYS, MeanAbsoluteDistance, ScoreHead
from edgead.models.losses import gradient_penalty, update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer

LOSSES = ("bce", "wgan")


@dataclass
class EGBADConfig(DetectorConfig):
    max_width: int = 512
    loss: str = "bce"  # bce: BiGAN (EGBAD); wgan: Wasserstein BiGAN with gradient penalty (GANspection)
    disc_norm: str | None = None  # x path of D; None: "batch" for bce, "layer" for wgan
    disc_hidden: int | None = None  # D's z-path width (joint features: 2x); None: 8·width (512 at width 64)
    dropout: float = 0.2  # D's dropout (bce only; a WGAN-GP critic gets none)
    n_critic: int = 5  # wgan: critic steps per G/E step
    gp_weight: float = 10.0  # wgan
    feature_weight: float | None = None  # L2 on mean D features (real vs generated) for G/E; None: 1 wgan, 0 bce
    score_weight: float = 0.1  # w: weight of the feature term in the score
    latent_weight: float = 0.0  # GANspection's α‖E(x)‖₂ score term

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.disc_norm is None:
            self.disc_norm = "layer" if self.loss == "wgan" else "batch"
        if self.loss == "wgan" and self.disc_norm == "batch":
            raise ValueError("a WGAN-GP critic must not use batch norm; use disc_norm='layer', 'instance' or 'none'")
        if self.disc_hidden is None:
            self.disc_hidden = 8 * self.width
        if self.feature_weight is None:
            self.feature_weight = 1.0 if self.loss == "wgan" else 0.0


class LatentNorm(nn.Module):
    def forward(self, z: Tensor) -> Tensor:
        return z.flatten(1).pow(2).sum(dim=1).sqrt()


class EGBADScore(nn.Module):
    """(1 − w)·mean|x − x̂| (in [-1, 1]) + w·mean|f − f̂| [+ α‖z‖₂] per sample."""

    def __init__(self, w: float, alpha: float) -> None:
        super().__init__()
        self.w, self.alpha = w, alpha
        self.features = MeanAbsoluteDistance()
        self.latent = LatentNorm()

    def forward(self, image: Tensor, recon: Tensor, feat: Tensor, feat_hat: Tensor,
                z: Tensor | None = None) -> Tensor:
        img = (2.0 * (image - recon)).abs().flatten(1).mean(dim=1)
        score = (1.0 - self.w) * img + self.w * self.features(feat, feat_hat)
        if z is not None:
            score = score + self.alpha * self.latent(z)
        return score


class EGBAD(Detector):
    name = "egbad"
    Config = EGBADConfig
    renamed_state_keys = RENAMED_SCORER_KEYS

    def __init__(self, config: EGBADConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = ImageEncoder(DCGANEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width))
        self.generator = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                                   upsample=c.upsample))
        self.discriminator = JointFeatures(JointDiscriminator(
            c.image_size, c.channels, c.latent_dim, c.width, c.max_width, norm=c.disc_norm,
            hidden=c.disc_hidden, dropout=0.0 if c.loss == "wgan" else c.dropout))
        # map: distance(x, x̂); score: (1 − w)·mean|x − x̂| + w·mean|f_D(x, z) − f_D(x̂, z)| [+ α‖z‖₂].
        # z feeds the score only when its term is on: an unread input would vanish from the graph.
        latent = ("z",) if c.latent_weight else ()
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed),
                              EGBADScore(c.score_weight, c.latent_weight), map_inputs=("image", "reconstruction"),
                              score_inputs=("image", "reconstruction", "features_real", "features_fake", *latent))
        for net in (self.encoder, self.generator, self.discriminator):
            net.apply(dcgan_init)

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), ("z",)),
            Component("generator", self.generator, ("z",), ("reconstruction",)),
            Component("features_real", self.discriminator, ("image", "z"), ("features_real",)),
            Component("features_fake", self.discriminator, ("reconstruction", "z"), ("features_fake",)),
            self.head.component(),
        ]


class EGBADRecipe(Recipe):
    default_lr = 1e-5  # bce (the reference); wgan: 1e-4
    default_betas = (0.5, 0.999)  # bce; wgan: (0.1, 0.9)

    def __init__(self, detector: EGBAD, train: TrainConfig) -> None:
        super().__init__(detector, train)
        c = detector.config
        self.wgan = c.loss == "wgan"
        if train.lr is None:
            self.lr = 1e-4 if self.wgan else self.default_lr
        betas = (0.1, 0.9) if self.wgan else self.default_betas
        self.D = detector.discriminator.net  # (logit, features) of a [-1, 1] image and a code: training
        self.opt_ge = self.adam(detector.encoder, detector.generator, betas=betas)
        self.opt_d = self.adam(detector.discriminator, betas=betas)
        self.critic_steps = 0

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        return self._wgan_step(images) if self.wgan else self._bce_step(images)

    def _generate(self, z: Tensor) -> Tensor:
        """G(z) in [-1, 1], D's range."""
        return to_signed(self.detector.generator(z))

    def _feature_loss(self, feat_real: Tensor, feat_fake: Tensor) -> Tensor:
        return F.mse_loss(feat_real.mean(dim=0), feat_fake.mean(dim=0))

    def _bce_step(self, images: Tensor) -> dict[str, float]:
        c = self.detector.config
        x = to_signed(images)
        z = sample_latent(len(x), c.latent_dim, x)
        # Discriminator: (x, E(x)) real, (G(z), z) fake.
        with torch.no_grad():
            z_enc, x_gen = self.detector.encoder(images), self._generate(z)
        loss_d = bce_logits(self.D(x, z_enc)[0], 1.0) + bce_logits(self.D(x_gen, z)[0], 0.0)
        update(self.opt_d, loss_d)
        # Generator and encoder: swapped labels.
        logit_enc, feat_real = self.D(x, self.detector.encoder(images))
        logit_gen, feat_fake = self.D(self._generate(z), z)
        adv = bce_logits(logit_gen, 1.0) + bce_logits(logit_enc, 0.0)
        loss = adv
        logs = {"d": loss_d.item(), "adv": adv.item()}
        if c.feature_weight:
            feat = self._feature_loss(feat_real, feat_fake)
            loss = loss + c.feature_weight * feat
            logs["feat"] = feat.item()
        update(self.opt_ge, loss)
        return {"ge": loss.item(), **logs}

    def _wgan_step(self, images: Tensor) -> dict[str, float]:
        c = self.detector.config
        critic = lambda img, lat: self.D(img, lat)[0]  # noqa: E731 - the scalar critic value per sample
        x = to_signed(images)
        z = sample_latent(len(x), c.latent_dim, x)
        with torch.no_grad():
            z_enc, x_gen = self.detector.encoder(images), self._generate(z)
        gp = gradient_penalty(critic, (x, z_enc), (x_gen, z))
        wasserstein = critic(x, z_enc).mean() - critic(x_gen, z).mean()
        loss_c = -wasserstein + c.gp_weight * gp
        update(self.opt_d, loss_c)
        logs = {"critic": loss_c.item(), "w_dist": wasserstein.item(), "gp": gp.item()}
        self.critic_steps += 1
        if self.critic_steps % c.n_critic == 0:
            z = sample_latent(len(x), c.latent_dim, x)
            score_real, feat_real = self.D(x, self.detector.encoder(images))
            score_fake, feat_fake = self.D(self._generate(z), z)
            adv = score_real.mean() - score_fake.mean()
            feat = self._feature_loss(feat_real, feat_fake)
            loss = adv + c.feature_weight * feat
            update(self.opt_ge, loss)
            logs.update(ge=loss.item(), adv=adv.item(), feat=feat.item())
        return logs


register(EGBAD, EGBADRecipe)
