"""DRAEM (Zavrtanik, Kristan & Skočaj, "DRAEM — A discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021, arXiv 2108.07610).

Networks (no pretrained backbone)
    Reconstructive sub-network: an encoder-decoder of double-conv stages without skips (base width
    128, four poolings), trained to give back the *normal* image from one with a synthetic anomaly.
    Discriminative sub-network: a U-Net with skips (base width 64, five poolings) on the channel
    concatenation [image, reconstruction], giving two-class logits (normal, anomalous) per pixel.
    Both from :class:`~edgead.models.blocks.ConvUNet`; weights N(0, 0.02) as the reference.
Training (:class:`DRAEMRecipe`)
    Each normal image gets, with probability 1/2, a synthetic anomaly (``edgead.data.anomaly_synth``:
    a rotated, thresholded Perlin mask filled with a foreign texture at opacity β ∈ [0.1, 1]).
    The DTD textures of the paper are not available: the textures come from the project's
    procedural renderers and from the training images (random scales, rotations and colours), or
    from ``--anomaly-source DIR``. Loss: L2(x̂, x) + (1 − SSIM(x̂, x)) on the reconstruction (the
    project's 11×11 Gaussian SSIM) + focal loss (γ = 2) of the segmentation against the mask.
    Adam 1e-4.
Map and score
    Map: the softmax probability of "anomalous", smoothed with a mean filter (the reference's
    21×21 ``avg_pool2d`` at 256², scaled to the input size: 11×11 at 128²). Score: the maximum of
    the smoothed map. Softmax, filter and maximum form the score head's FP32 island.
Departures
    Left out: the reference's step learning-rate schedule (×0.2 at 80 % and 90 % of 700 epochs):
    training here stops on a CPU-time budget, so there is no known last epoch to schedule against;
    the best epoch is chosen on the validation proxy like every detector's. The reference also
    rotates a share of the training images by up to ±90°; use ``--augment`` for flips and small
    rotations instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.data.anomaly_synth import AnomalySynthesizer
from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.blocks import ConvUNet, dcgan_init
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.losses import focal_loss, update
from edgead.models.registry import register
from edgead.models.scorers import SSIMMap

PAPER_KERNEL, PAPER_SIZE = 21, 256  # the reference's mean filter, at its image size


@dataclass
class DRAEMConfig(DetectorConfig):
    width: int = 128  # reconstructive sub-network's base width
    disc_width: int = 64  # discriminative sub-network's base width
    recon_depth: int = 4  # poolings of the reconstructive network
    disc_depth: int = 5  # poolings of the discriminative U-Net
    smooth_kernel: int = 0  # side of the mean filter; 0: the paper's 21 at 256², scaled to image_size


def mean_filter_size(config: DRAEMConfig) -> int:
    if config.smooth_kernel:
        return config.smooth_kernel
    return max(1, round(PAPER_KERNEL * config.image_size / PAPER_SIZE)) | 1  # odd: centred


class Discriminative(nn.Module):
    """(image, reconstruction) -> two-class segmentation logits (B, 2, H, W)."""

    def __init__(self, channels: int, width: int, depth: int) -> None:
        super().__init__()
        self.net = ConvUNet(2 * channels, 2, width, depth, skips=True)

    def forward(self, image: Tensor, reconstruction: Tensor) -> Tensor:
        return self.net(torch.cat([image, reconstruction], dim=1))


class SmoothedSegmentation(nn.Module):
    """Logits (B, 2, H, W) -> P(anomalous) mean-filtered with a ``kernel``² window (zero padding
    counted, as the reference's ``avg_pool2d``), (B, 1, H, W)."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, segmentation: Tensor) -> Tensor:
        p = torch.softmax(segmentation, dim=1)[:, 1:2]
        return F.avg_pool2d(p, self.kernel, stride=1, padding=self.kernel // 2)


class DRAEM(Detector):
    name = "draem"
    Config = DRAEMConfig

    def __init__(self, config: DRAEMConfig) -> None:
        super().__init__(config)
        c = config
        if c.image_size % 2 ** max(c.recon_depth, c.disc_depth):
            raise ValueError(f"DRAEM: image size {c.image_size} must divide by 2^{max(c.recon_depth, c.disc_depth)}")
        self.reconstructive = ConvUNet(c.channels, c.channels, c.width, c.recon_depth, skips=False)
        self.discriminative = Discriminative(c.channels, c.disc_width, c.disc_depth)
        self.reconstructive.apply(dcgan_init)
        self.discriminative.apply(dcgan_init)
        # map: mean-filtered P(anomalous); score: its maximum
        self.head = ScoreHead(SmoothedSegmentation(mean_filter_size(c)), TopKMean(0.0),
                              map_inputs=("segmentation",))

    def components(self) -> list[Component]:
        return [
            Component("reconstructive", self.reconstructive, ("image",), ("reconstruction",)),
            Component("discriminative", self.discriminative, ("image", "reconstruction"), ("segmentation",)),
            self.head.component(),
        ]


class DRAEMRecipe(Recipe):
    """L2 + SSIM on the reconstruction, focal on the segmentation, one Adam for both networks.

    ``TrainConfig.extra`` may set ``anomaly_source`` (a folder of texture images),
    ``anomaly_prob`` (0.5) and ``self_fraction`` (0.5: share of textures taken from the training
    images rather than the procedural or folder pool).
    """

    default_lr = 1e-4
    default_betas = (0.9, 0.999)

    def __init__(self, detector: DRAEM, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.opt = self.adam(detector.reconstructive, detector.discriminative)
        self.ssim = SSIMMap(detector.config.channels).to(detector.device)
        self.synth: AnomalySynthesizer | None = None

    def prepare(self, images: Tensor) -> None:
        extra = self.train.extra
        self.synth = AnomalySynthesizer(images.cpu().numpy(), seed=self.train.seed,
                                        source_dir=extra.get("anomaly_source"),
                                        anomaly_prob=float(extra.get("anomaly_prob", 0.5)),
                                        self_fraction=float(extra.get("self_fraction", 0.5)))

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        if self.synth is None:
            raise RuntimeError("DRAEMRecipe.prepare() builds the anomaly generator; call it first")
        aug, mask, _ = (torch.from_numpy(a).to(images.device) for a in self.synth.batch(images.cpu().numpy()))
        values = self.detector.run(aug, until="segmentation")
        recon, seg = values["reconstruction"], values["segmentation"]
        l2 = F.mse_loss(recon, images)
        ssim = self.ssim(recon, images).mean()
        focal = focal_loss(seg, mask)
        loss = l2 + ssim + focal
        update(self.opt, loss)
        return {"l2": l2.item(), "ssim": ssim.item(), "focal": focal.item(), "loss": loss.item()}


register(DRAEM, DRAEMRecipe)
