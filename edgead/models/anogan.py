"""AnoGAN (Schlegl et al., IPMI 2017, arXiv 1703.05921).

Networks
    A DCGAN: generator G, z (100) -> image; discriminator D with a sigmoid head, whose last
    features f(·) (before the final conv) drive the discrimination loss of the latent search.
Training
    The plain GAN game on normal images: D by binary cross-entropy (real vs G(z), z ~ N(0, I)),
    G by the non-saturating loss BCE(D(G(z)), real). Adam 2e-4, β1 0.5.
Score: an iterative latent search
    For each test image x, z is optimised alone (G and D fixed, Adam, ``search_steps`` = 500,
    ``search_lr`` 0.01, from a seeded z ~ N(0, I)) to minimise
        (1 - λ)·Σ|x - G(z)| + λ·Σ|f(x) - f(G(z))|,  λ = 0.1
    (residual and discrimination loss, images in [-1, 1]; the ALAD repository swaps which term λ
    weights). The score is the same two terms at the searched z*; the map is the reconstruction
    distance between x and G(z*) chosen by ``scorer``. Both are one :class:`ScoreHead` (map and
    score function), whose score function is also the loss the search minimises.
Export
    The score is an optimisation, not one forward graph, so the detector is not exportable:
    ``components()`` and ``forward`` raise with that reason and :meth:`AnoGAN.search_score` (torch
    only) runs the search: AnoGAN evaluates, but never bundles. :meth:`AnoGAN.exportable_components` lists what does export on its own:
    the generator, z -> image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, to_signed
from edgead.models.blocks import DCGANDecoder, FeatureDiscriminator, ImageDecoder, dcgan_init
from edgead.models.heads import ScoreHead
from edgead.models.losses import bce_discriminator_step, update
from edgead.models.registry import register
from edgead.models.scorers import make_scorer
from edgead.models.skip_ganomaly import DiscriminatorFeatures


@dataclass
class AnoGANConfig(DetectorConfig):
    image_size: int = 64  # the paper's 64x64 patches
    max_width: int = 512
    search_steps: int = 500
    search_lr: float = 0.01  # Adam on z; the paper leaves it open
    lam: float = 0.1  # weight of the discrimination (feature) term


class SearchLoss(nn.Module):
    """(1 - λ)·Σ|x - G(z)| + λ·Σ|f(x) - f(G(z))| per sample, images compared in [-1, 1]."""

    def __init__(self, lam: float) -> None:
        super().__init__()
        self.lam = lam

    def forward(self, image: Tensor, generated: Tensor, feat: Tensor, feat_hat: Tensor) -> Tensor:
        residual = (to_signed(image) - to_signed(generated)).abs().flatten(1).sum(dim=1)
        discrimination = (feat - feat_hat).abs().flatten(1).sum(dim=1)
        return (1.0 - self.lam) * residual + self.lam * discrimination


class AnoGAN(Detector):
    name = "anogan"
    Config = AnoGANConfig
    exportable = False
    renamed_state_keys = {"scorer.": "head.map."}  # runs saved before the one score head

    def __init__(self, config: AnoGANConfig) -> None:
        super().__init__(config)
        c = config
        self.generator = ImageDecoder(DCGANDecoder(c.image_size, c.channels, c.latent_dim, c.width, c.max_width,
                                                   upsample=c.upsample))
        self.discriminator = DiscriminatorFeatures(FeatureDiscriminator(c.image_size, c.channels, c.width,
                                                                        c.max_width))
        # map: distance(x, G(z*)); score: the search loss at z* (torch only: never a component)
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed), SearchLoss(c.lam),
                              map_inputs=("image", "reconstruction"),
                              score_inputs=("image", "reconstruction", "features_real", "features_fake"))
        self.generator.apply(dcgan_init)
        self.discriminator.apply(dcgan_init)

    @property
    def export_note(self) -> str:
        return (f"AnoGAN's score is an iterative latent search ({self.config.search_steps} optimisation steps), "
                "not one forward graph: it runs only on the torch backend; its generator exports on its own "
                "(AnoGAN.exportable_components())")

    def components(self) -> list[Component]:
        raise RuntimeError(self.export_note)  # forward runs components(), so it raises the same

    def exportable_components(self) -> list[Component]:
        """What exports on its own: the generator, z (B, latent, 1, 1) -> image in [0, 1]."""
        return [Component("generator", self.generator, ("z",), ("generated",))]

    @torch.no_grad()
    def component_shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shapes (batch 1) of the exportable components' tensors: ``z`` and ``generated``."""
        was_training = self.training
        self.eval()
        try:
            z = torch.zeros(1, self.config.latent_dim, 1, 1, device=self.device)
            shapes = {"z": tuple(z.shape), "generated": tuple(self.generator(z).shape)}
        finally:
            self.train(was_training)
        return shapes

    def search_loss(self, image: Tensor, feat_x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample (1 - λ)·residual + λ·discrimination loss (the head's score function), and G(z)
        in [0, 1]; ``feat_x`` = f(image)."""
        generated = self.generator(z)
        return self.head.fp32_score(image, generated, feat_x, self.discriminator(generated)), generated

    def search(self, image: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """Optimise z for ``image`` (G and D fixed, in inference mode); returns (z*, mean loss before each step)."""
        c = self.config
        steps = c.search_steps if steps is None else steps
        self.eval()
        with torch.no_grad():
            feat_x = self.discriminator(image)
        gen = torch.Generator(device=image.device).manual_seed(c.seed)
        z = torch.randn(len(image), c.latent_dim, 1, 1, generator=gen, device=image.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=c.search_lr)
        history = []
        with torch.enable_grad():
            for _ in range(steps):
                loss, _ = self.search_loss(image, feat_x, z)
                (grad,) = torch.autograd.grad(loss.sum(), [z])  # only z: the networks' .grad stay untouched
                z.grad = grad
                opt.step()
                history.append(loss.detach().mean())
        return z.detach(), torch.stack(history) if history else torch.empty(0)

    def search_score(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The latent search, then the two terms and the map at z* (torch backend only)."""
        was_training = self.training
        try:
            z, _ = self.search(image)
            with torch.no_grad():
                generated = self.generator(z)
                return self.head(image, generated, self.discriminator(image), self.discriminator(generated))
        finally:
            self.train(was_training)


class AnoGANRecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.5, 0.999)

    def __init__(self, detector: AnoGAN, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.D = detector.discriminator.net  # (probability, features) of a [-1, 1] image: training only
        self.opt_g = self.adam(detector.generator)
        self.opt_d = self.adam(detector.discriminator)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        x = to_signed(images)
        z = torch.randn(len(x), self.detector.config.latent_dim, 1, 1, device=x.device)
        fake = to_signed(self.detector.generator(z))

        loss_d = bce_discriminator_step(self.D, self.opt_d, x, fake)

        p_gen, _ = self.D(fake)
        loss_g = F.binary_cross_entropy(p_gen, torch.ones_like(p_gen))
        update(self.opt_g, loss_g)
        return {"d": loss_d, "g": loss_g.item()}


register(AnoGAN, AnoGANRecipe)
