"""ALAD: Adversarially Learned Anomaly Detection (Zenati et al., ICDM 2018, arXiv 1812.02288).

Networks
    Encoder E: image -> z (DCGAN encoder, linear output), generator G: z -> image (DCGAN decoder,
    tanh), z ~ N(0, I). Three discriminators (:mod:`edgead.models.bigan_blocks`):
      D_xz(x, z): the BiGAN joint discriminator (batch norm in its x path, dropout 0.2);
      D_xx(x, x'): a DCGAN encoder over the channel concatenation (no normalisation, as the
        reference); f_xx = its last 4x4 feature map;
      D_zz(z, z'): 1x1-conv MLP 2L -> 64 -> 32 -> 1 (dropout 0.2).
    ``spectral_norm`` (default True, the paper's setting for images) puts spectral normalisation
    (Miyato et al. 2018) on every conv of the three discriminators; see
    :class:`~edgead.models.bigan_blocks.SpectralNorm` for why ours exports to ONNX (in eval mode
    it folds into plain weights; no hook or removal is needed before export).
Training (Adam 2e-4, β1 0.5; the paper uses batch 32)
    D: BCE on D_xz [(x, E(x)) real, (G(z), z) fake] + D_xx [(x, x) real, (x, G(E(x))) fake]
       + D_zz [(z, z) real, (z, E(G(z))) fake].
    G and E (one optimiser over both, equivalent to the reference's two since their parameters are
    disjoint): BCE(D_xz(G(z), z), real) + BCE(D_xz(x, E(x)), fake) plus the cycle-consistency terms
    BCE(D_xx(x, G(E(x))), real) and BCE(D_zz(z, E(G(z))), real) (the last one off with
    ``allow_zz=False``, the reference's flag). The reference's terms BCE(D_xx(x, x), fake) and
    BCE(D_zz(z, z), fake) in the G/E costs have no gradient for G or E and are left out.
    The reference evaluates an exponential moving average of the weights (0.999); we don't.
Score
    mean|f_xx(x, x) − f_xx(x, G(E(x)))| (the paper's feature-space L1 "fm" score; a mean rather
    than a sum, so it does not depend on the feature size). Map: the reconstruction distance
    chosen by ``scorer``.
Training calls the encoder and generator components; the discriminators see images in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, to_signed
from edgead.models.bigan_blocks import (JointDiscriminator, LatentPairDiscriminator, PairDiscriminator,
                                        PairFeatures, apply_spectral_norm, bce_logits, sample_latent)
from edgead.models.blocks import DCGANDecoder, DCGANEncoder, ImageDecoder, ImageEncoder, dcgan_init
from edgead.models.heads import RENAMED_SCORER_KEYS, MeanAbsoluteDistance, ScoreHead
from edgead.models.losses import update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer


@dataclass
class ALADConfig(DetectorConfig):
    max_width: int = 512
    spectral_norm: bool = True  # on every discriminator conv, as the paper's image experiments
    dropout: float = 0.2  # in D_xz and D_zz, as the reference
    disc_hidden: int | None = None  # D_xz's z-path width (joint features: 2x); None: 8·width
    allow_zz: bool = True  # the D_zz cycle-consistency term

    def __post_init__(self) -> None:
        if self.disc_hidden is None:
            self.disc_hidden = 8 * self.width


class ALAD(Detector):
    name = "alad"
    Config = ALADConfig
    renamed_state_keys = RENAMED_SCORER_KEYS

    def __init__(self, config: ALADConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = ImageEncoder(DCGANEncoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width))
        self.generator = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                                   upsample=c.upsample))
        self.disc_xx = PairFeatures(PairDiscriminator(c.image_size, c.channels, c.width, c.max_width, norm="none"))
        # map: distance(x, x̂); score: mean|f_xx(x, x) − f_xx(x, x̂)|
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed), MeanAbsoluteDistance(),
                              map_inputs=("image", "reconstruction"), score_inputs=("features_real", "features_fake"))
        # training only
        self.disc_xz = JointDiscriminator(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                          norm="batch", hidden=c.disc_hidden, dropout=c.dropout)
        self.disc_zz = LatentPairDiscriminator(c.latent_dim, dropout=c.dropout)
        for net in (self.encoder, self.generator, self.disc_xx, self.disc_xz, self.disc_zz):
            net.apply(dcgan_init)
        if c.spectral_norm:
            for net in (self.disc_xx, self.disc_xz, self.disc_zz):
                apply_spectral_norm(net)

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), ("z",)),
            Component("generator", self.generator, ("z",), ("reconstruction",)),
            # one D_xx module, two entries: f_xx(x, x) (its second input defaults to the first) and f_xx(x, x̂)
            Component("features_real", self.disc_xx, ("image",), ("features_real",)),
            Component("features_fake", self.disc_xx, ("image", "reconstruction"), ("features_fake",)),
            self.head.component(),
        ]


class ALADRecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.5, 0.999)

    def __init__(self, detector: ALAD, train: TrainConfig) -> None:
        super().__init__(detector, train)
        d = detector
        self.Dxz, self.Dxx, self.Dzz = d.disc_xz, d.disc_xx.net, d.disc_zz  # on [-1, 1] images
        self.opt_ge = self.adam(d.encoder, d.generator)
        self.opt_d = self.adam(d.disc_xz, d.disc_xx, d.disc_zz)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        x = to_signed(images)
        z = sample_latent(len(x), c.latent_dim, x)
        E, G = d.encoder, d.generator  # [0, 1] images in and out

        # Discriminators.
        with torch.no_grad():
            z_enc, generated = E(images), G(z)
            x_gen, x_rec, z_rec = to_signed(generated), to_signed(G(z_enc)), E(generated)
        d_xz = bce_logits(self.Dxz(x, z_enc)[0], 1.0) + bce_logits(self.Dxz(x_gen, z)[0], 0.0)
        d_xx = bce_logits(self.Dxx(x, x)[0], 1.0) + bce_logits(self.Dxx(x, x_rec)[0], 0.0)
        loss_d = d_xz + d_xx
        logs = {"d_xz": d_xz.item(), "d_xx": d_xx.item()}
        if c.allow_zz:
            d_zz = bce_logits(self.Dzz(z, z)[0], 1.0) + bce_logits(self.Dzz(z, z_rec)[0], 0.0)
            loss_d = loss_d + d_zz
            logs["d_zz"] = d_zz.item()
        update(self.opt_d, loss_d)

        # Generator and encoder: fool D_xz, and make the cycles x -> z -> x and z -> x -> z pass as real.
        z_enc, generated = E(images), G(z)
        adv = bce_logits(self.Dxz(to_signed(generated), z)[0], 1.0) + bce_logits(self.Dxz(x, z_enc)[0], 0.0)
        cycle_x = bce_logits(self.Dxx(x, to_signed(G(z_enc)))[0], 1.0)
        loss = adv + cycle_x
        logs.update(adv=adv.item(), cycle_x=cycle_x.item())
        if c.allow_zz:
            cycle_z = bce_logits(self.Dzz(z, E(generated))[0], 1.0)
            loss = loss + cycle_z
            logs["cycle_z"] = cycle_z.item()
        update(self.opt_ge, loss)
        return {"d": loss_d.item(), "ge": loss.item(), **logs}


register(ALAD, ALADRecipe)
