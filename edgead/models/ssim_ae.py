"""SSIM autoencoder (Bergmann et al., "Improving unsupervised defect segmentation by applying
structural similarity to autoencoders", VISAPP 2019, arXiv 1807.02011).

Network
    The paper's 128² encoder: conv 32 4x4/2 -> 32 4/2 -> 32 3/1 -> 64 4/2 -> 64 3/1 -> 128 4/2
    -> 64 3/1 -> 32 3/1 -> latent d with an 8x8 valid conv; the decoder mirrors it with transposed
    convs (``upsample="resize"``: nearest resize + conv instead, which ONNX Runtime runs in INT8);
    LeakyReLU(0.2). Other sizes add or drop leading stride-2 stages so the code is always
    computed from an 8x8 grid (scaled to the input size, as the issue asks).
Loss
    1 - SSIM with an 11x11 Gaussian window, the very module that scores at test time.
Map and score
    Map: 1 - SSIM(x, x̂) per pixel (``scorer="ssim"``; l1/vgg also work). Image score: mean of the
    top 1% of the map, so a small defect still moves it. The threshold comes from normal
    validation images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.blocks import grow_from_code, upsample_conv
from edgead.models.heads import RENAMED_SCORER_KEYS, ScoreHead, TopKMean
from edgead.models.losses import update
from edgead.models.registry import register
from edgead.models.scorers import SSIMMap, make_scorer


@dataclass
class SSIMAEConfig(DetectorConfig):
    width: int = 32
    latent_dim: int = 100
    scorer: str = "ssim"
    top_k: float = 0.01


def _paper_layers(image_size: int, width: int) -> list[tuple[int, int, int]]:
    """(out_channels, kernel, stride) of the encoder convs before the latent conv."""
    scale = width / 32
    paper = [(32, 4, 2), (32, 4, 2), (32, 3, 1), (64, 4, 2), (64, 3, 1), (128, 4, 2), (64, 3, 1), (32, 3, 1)]
    extra = int(math.log2(image_size)) - 7  # 128² has 4 stride-2 convs down to 8x8
    if extra > 0:
        paper = [(32, 4, 2)] * extra + paper
    elif extra < 0:
        drop = -extra
        if drop > 2:
            raise ValueError(f"SSIM-AE needs an image size >= 32, got {image_size}")
        paper = paper[drop:]
    return [(max(4, int(c * scale)), k, s) for c, k, s in paper]


class SSIMAutoencoder(nn.Module):
    def __init__(self, image_size: int, channels: int, latent_dim: int, width: int,
                 upsample: str = "transpose") -> None:
        super().__init__()
        layers = _paper_layers(image_size, width)
        enc: list[nn.Module] = []
        prev = channels
        for out, k, s in layers:
            enc += [nn.Conv2d(prev, out, k, s, (k - 1) // 2 if s == 1 else 1), nn.LeakyReLU(0.2, inplace=True)]
            prev = out
        enc += [nn.Conv2d(prev, latent_dim, 8, 1, 0)]  # 8x8 -> 1x1 code
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [grow_from_code(latent_dim, prev, 8, upsample, bias=True),
                                nn.LeakyReLU(0.2, inplace=True)]
        for i in range(len(layers) - 1, -1, -1):
            out_ch, k, s = layers[i]
            nxt = layers[i - 1][0] if i > 0 else channels
            # mirror: the conv that produced out_ch from nxt is undone by a transposed conv
            if s == 2:
                dec += [upsample_conv(out_ch, nxt, upsample, bias=True)]
            else:
                dec += [nn.Conv2d(out_ch, nxt, k, 1, (k - 1) // 2)]
            if i > 0:
                dec += [nn.LeakyReLU(0.2, inplace=True)]
        dec += [nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)

    def forward(self, image: Tensor) -> Tensor:
        return self.decoder(self.encoder(image))


class SSIMAE(Detector):
    name = "ssim_ae"
    Config = SSIMAEConfig
    renamed_state_keys = RENAMED_SCORER_KEYS

    def __init__(self, config: SSIMAEConfig) -> None:
        super().__init__(config)
        c = config
        self.autoencoder = SSIMAutoencoder(c.image_size, c.channels, c.latent_dim, c.width, c.upsample)
        # map: 1 - SSIM(x, x̂) (or the chosen distance); score: the top-k mean of the map
        self.head = ScoreHead(make_scorer(c.scorer, c.channels, c.vgg_weights, c.seed), TopKMean(c.top_k),
                              map_inputs=("image", "reconstruction"))

    def components(self) -> list[Component]:
        return [
            Component("autoencoder", self.autoencoder, ("image",), ("reconstruction",)),
            self.head.component(),
        ]


class SSIMAERecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.9, 0.999)

    def __init__(self, detector: SSIMAE, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.ssim = SSIMMap(detector.config.channels).to(detector.device)
        self.opt = self.adam(detector.autoencoder, betas=self.default_betas)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        recon = self.detector.run(images, until="reconstruction")["reconstruction"]
        loss = self.ssim(images, recon).mean()
        update(self.opt, loss)
        return {"1-ssim": loss.item()}


register(SSIMAE, SSIMAERecipe)
