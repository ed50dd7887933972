"""PyramidFlow (Lei, Hu, Wang & Liu, "PyramidFlow: High-Resolution Defect Contrastive Localization
using Pyramid Normalizing Flow", CVPR 2023, arXiv 2303.02595): the fully normalising-flow variant,
trained from scratch, no pretrained backbone.

Networks
    Input: a frozen *semi-invertible* 1x1 conv, 3 -> ``flow_channels`` (orthogonal init; the
    paper's ``resnetX = 0`` encoder), then a Laplacian pyramid of ``levels`` levels (5x5 binomial
    blur; max-pool downsampling, nearest upsampling, as the paper). Every level keeps the channels.
    Flow: ``stacks`` stacks of scale-wise pyramid couplings (the paper's Fig. 3c/d). Within a
    stack every level is transformed once, conditioned on its neighbours: level ``l+1`` from
    levels ``l`` and ``l+2`` resized to it ("both"), the coarsest from the one above ("down":
    affine parameters computed at the finer level, then resized), the finest from the one below
    ("up"). Each coupling: conv kxk -> LeakyReLU -> conv kxk (no bias, last one zero-initialised)
    gives ``(s, t)``; ``s`` is soft-clamped (``clamp * 0.636 * atan(s / clamp)``, clamp 2) and
    volume-normalised; ``x <- x * exp(s) + t``; then an invertible 1x1 conv (Glow's LU form) with
    its log-scales volume-normalised (mean subtracted, so det = +-1).
    Volume normalisation (the paper's VN): the clamped log-scales minus their mean over batch and
    channels (CVN, default) or batch and space (SVN), a running mean at inference. It keeps the
    flow volume-preserving, so the latents cannot all shrink to zero to make the loss vanish.
Loss (latent-template contrastive paradigm)
    Pairs of normal images: the per-level squared latent differences ``|z_a - z_b|^2`` are composed
    back through the Laplacian pyramid into one pixel map, averaged over channels; the loss is
    the mean magnitude of its 2-D Fourier transform (the paper's Fourier loss). Adam 2e-4,
    betas (0.5, 0.9), eps 1e-4, weight decay 1e-5, gradient-norm clip 1. The paper trains on
    batches of 2 (one pair); here a batch is cut into adjacent pairs, the same loss B/2 times.
Map and score
    Latent template: the mean latent pyramid of the *training* images, refreshed at the end of
    each epoch (the selection of the best epoch restores weights and template together). Map:
    the pyramid difference ``compose(|z - template|)`` averaged over channels at the input's
    resolution. Score: mean of the top 1% of the map (the paper takes the maximum).
    The reference code chooses its checkpoint on *test* pixel AUROC; here the trainer chooses it
    on the validation proxy, and nothing reads the test split.
FP32 islands
    ``fp32_affine`` (soft clamp, volume normalisation, exp, affine update) in every coupling and
    the head (template difference, pyramid composition, channel mean, top-k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig, at_least_fp32
from edgead.models.flows import InvertibleConv1x1
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.registry import register

TEMPLATE_BATCH = 16  # images per pass when the template is recomputed


@dataclass
class PyramidFlowConfig(DetectorConfig):
    flow_channels: int = 16  # the paper's numChannel
    levels: int = 4  # pyramid levels (the paper's default; 8 for a few MVTec classes)
    stacks: int = 4  # the paper's numStack
    kernel_size: int = 7
    clamp: float = 2.0
    volume_norm: str = "channel"  # "channel" (CVN, dims batch+channel) | "spatial" (SVN, batch+space)
    top_k: float = 0.01


class LaplacianPyramid(nn.Module):
    """Laplacian pyramid with a 5x5 binomial blur, max-pool down and nearest up (the paper's).

    ``build`` and ``compose`` are exact inverses of each other: the last level is the coarsest
    Gaussian level, the others are band-pass residuals."""

    def __init__(self, levels: int, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        kernel = ((k[:, None] * k[None]) / 256.0).expand(channels, 1, 5, 5).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)  # depthwise, a constant in the graph
        self.levels = levels
        self.channels = channels

    def _blur(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (2, 2, 2, 2)), self.kernel.to(x.dtype), groups=self.channels)

    def down(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self._blur(x), 2, 2)

    def up(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self._blur(F.interpolate(x, size=size, mode="nearest"))

    def build(self, x: Tensor) -> list[Tensor]:
        gauss = [x]
        for _ in range(self.levels - 1):
            gauss.append(self.down(gauss[-1]))
        lap = [g - self.up(gauss[i + 1], tuple(g.shape[-2:])) for i, g in enumerate(gauss[:-1])]
        return lap + [gauss[-1]]

    def compose(self, pyramid: list[Tensor]) -> Tensor:
        out = pyramid[-1]
        for level in reversed(pyramid[:-1]):
            out = self.up(out, tuple(level.shape[-2:])) + level
        return out


class VolumeNorm(nn.Module):
    """Subtract the mean log-scale over ``dims`` (batch statistics while training, a running mean
    at inference): the paper's volume normalisation."""

    def __init__(self, dims: tuple[int, ...], shape: tuple[int, ...], momentum: float = 0.1) -> None:
        super().__init__()
        self.dims = dims
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(shape))

    def forward(self, s: Tensor) -> Tensor:
        if self.training:
            mean = s.mean(dim=self.dims, keepdim=True)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            return s - mean
        return s - self.running_mean


class _PyramidAffine(nn.Module):
    """FP32 island of a coupling: soft clamp, volume normalisation, exp, affine update."""

    def __init__(self, clamp: float, norm: VolumeNorm, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.clamp = clamp
        self.norm = norm
        self.size = size  # resize the parameters to the target level ("down": computed finer)

    def params(self, a: Tensor) -> tuple[Tensor, Tensor]:
        a_s, t = a.chunk(2, dim=1)
        s = self.norm(self.clamp * 0.636 * torch.atan(a_s / self.clamp))
        if self.size is not None:
            s, t = F.interpolate(s, size=self.size, mode="nearest"), F.interpolate(t, size=self.size, mode="nearest")
        return s, t

    def forward(self, x: Tensor, a: Tensor) -> Tensor:
        s, t = self.params(a.to(x.dtype))
        return x * torch.exp(s) + t


class PyramidCoupling(nn.Module):
    """Transforms pyramid level ``target`` from the levels ``sources`` (Fig. 3c/d of the paper)."""

    def __init__(self, target: int, sources: tuple[int, ...], sizes: list[tuple[int, int]], channels: int,
                 config: PyramidFlowConfig, seed: int) -> None:
        super().__init__()
        c = config
        self.target, self.sources = target, sources
        # "down" computes the parameters at its (finer) source level and resizes them after.
        self.at = sources[0] if sources == (target - 1,) else target
        inner, hidden = channels * len(sources), 2 * channels
        pad = c.kernel_size // 2
        self.subnet = nn.Sequential(
            nn.Conv2d(inner, hidden, c.kernel_size, padding=pad, bias=False), nn.LeakyReLU(),
            nn.Conv2d(hidden, 2 * channels, c.kernel_size, padding=pad, bias=False))
        nn.init.zeros_(self.subnet[-1].weight)  # starts as the identity
        h, w = sizes[self.at]
        dims, shape = ((0, 1), (1, 1, h, w)) if c.volume_norm == "channel" else ((0, 2, 3), (1, channels, 1, 1))
        if c.volume_norm not in ("channel", "spatial"):
            raise ValueError(f"volume_norm must be 'channel' or 'spatial', got {c.volume_norm!r}")
        resize = sizes[target] if self.at != target else None
        self.fp32_affine = _PyramidAffine(c.clamp, VolumeNorm(dims, shape), resize)
        self.mix = InvertibleConv1x1(channels, seed=seed)

    def _condition(self, pyramid: list[Tensor]) -> Tensor:
        size = tuple(pyramid[self.at].shape[-2:])
        parts = [p if tuple(p.shape[-2:]) == size else F.interpolate(p, size=size, mode="nearest")
                 for p in (pyramid[i] for i in self.sources)]
        return self.subnet(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    def forward(self, pyramid: list[Tensor]) -> list[Tensor]:
        out = list(pyramid)
        out[self.target] = self.mix(self.fp32_affine(pyramid[self.target], self._condition(pyramid)))
        return out

    def inverse(self, pyramid: list[Tensor]) -> list[Tensor]:
        out = list(pyramid)
        y = self.mix.inverse(pyramid[self.target])
        s, t = self.fp32_affine.params(self._condition(pyramid))  # sources are unchanged by this block
        out[self.target] = (y - t) * torch.exp(-s)
        return out


def coupling_schedule(levels: int) -> list[tuple[int, tuple[int, ...]]]:
    """(target, sources) of one stack, in the paper's order: every level transformed once."""
    blocks: list[tuple[int, tuple[int, ...]]] = []
    for start in (0, 1):
        if start == 1:
            blocks.append((0, (1,)))  # "up"
        for i in range(start, levels, 2):
            if i + 2 < levels:
                blocks.append((i + 1, (i, i + 2)))  # "both"
            elif i + 1 < levels:
                blocks.append((i + 1, (i,)))  # "down"
    return blocks


class PyramidFlowNet(nn.Module):
    """image [0, 1] -> latent pyramid (finest first): frozen 1x1 lift, Laplacian pyramid, couplings."""

    def __init__(self, config: PyramidFlowConfig) -> None:
        super().__init__()
        c = config
        if c.levels < 2 or c.image_size % 2 ** (c.levels - 1):
            raise ValueError(f"PyramidFlow needs >= 2 levels and an image size divisible by 2^(levels-1); "
                             f"got {c.levels} levels at {c.image_size}")
        gen = torch.Generator().manual_seed(c.seed)
        lift = torch.linalg.qr(torch.randn(c.flow_channels, c.channels, generator=gen))[0]
        self.register_buffer("lift", lift[:, :, None, None].contiguous())  # frozen, semi-invertible
        self.pyramid = LaplacianPyramid(c.levels, c.flow_channels)
        sizes = [(c.image_size // 2 ** i, c.image_size // 2 ** i) for i in range(c.levels)]
        self.couplings = nn.ModuleList(
            PyramidCoupling(t, s, sizes, c.flow_channels, c, seed=c.seed + 7 * n)
            for n, (t, s) in enumerate(coupling_schedule(c.levels) * c.stacks))

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        pyramid = self.pyramid.build(F.conv2d(image, self.lift))
        for block in self.couplings:
            pyramid = block(pyramid)
        return tuple(pyramid)

    def inverse(self, latents: tuple[Tensor, ...]) -> Tensor:
        """Latent pyramid -> image (the lift's least-squares inverse: exact on its range)."""
        pyramid = list(latents)
        for block in reversed(self.couplings):
            pyramid = block.inverse(pyramid)
        feat = self.pyramid.compose(pyramid)
        return torch.einsum("bkhw,kc->bchw", feat, self.lift[:, :, 0, 0])  # orthonormal columns


class TemplateDifference(nn.Module):
    """Latent pyramid -> map: ``compose(|z - template|)`` averaged over channels (the pyramid
    difference of the latent templates). The templates are buffers, set from training images."""

    def __init__(self, config: PyramidFlowConfig) -> None:
        super().__init__()
        c = config
        self.pyramid = LaplacianPyramid(c.levels, c.flow_channels)
        for i in range(c.levels):
            side = c.image_size // 2 ** i
            self.register_buffer(f"template_{i}", torch.zeros(1, c.flow_channels, side, side))

    def templates(self) -> list[Tensor]:
        return [getattr(self, f"template_{i}") for i in range(self.pyramid.levels)]

    def forward(self, *latents: Tensor) -> Tensor:
        diff = [(at_least_fp32(z) - t).abs() for z, t in zip(latents, self.templates())]
        return self.pyramid.compose(diff).mean(dim=1, keepdim=True)


class PyramidFlow(Detector):
    name = "pyramidflow"
    Config = PyramidFlowConfig

    def __init__(self, config: PyramidFlowConfig) -> None:
        super().__init__(config)
        c = config
        self.flow = PyramidFlowNet(c)
        self.latent_names = tuple(f"latent_{i}" for i in range(c.levels))
        self.head = ScoreHead(TemplateDifference(c), TopKMean(c.top_k), map_inputs=self.latent_names)

    def components(self) -> list[Component]:
        return [Component("flow", self.flow, ("image",), self.latent_names), self.head.component()]


class PyramidFlowRecipe(Recipe):
    default_lr = 2e-4
    default_betas = (0.5, 0.9)

    def __init__(self, detector: PyramidFlow, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.opt = torch.optim.Adam(detector.flow.parameters(), lr=self.lr, betas=self.default_betas,
                                    eps=1e-4, weight_decay=1e-5)
        self.images: Tensor | None = None
        self.steps_per_epoch = 1
        self.steps = 0

    def prepare(self, images: Tensor) -> None:
        """Keep the training images for the template; count the trainer's batches per epoch
        (the last one is dropped when it holds a single image) to refresh it at each epoch's end."""
        self.images = images
        n, bs = len(images), self.train.batch_size
        batches = math.ceil(n / bs)
        self.steps_per_epoch = batches - 1 if batches > 1 and n - (batches - 1) * bs < 2 else batches
        self.refresh_template()

    @torch.no_grad()
    def refresh_template(self) -> None:
        d = self.detector
        assert self.images is not None
        was_training = d.training
        d.eval()
        sums: list[Tensor] | None = None
        for i in range(0, len(self.images), TEMPLATE_BATCH):
            z = d.flow(self.images[i:i + TEMPLATE_BATCH])
            part = [level.sum(dim=0, keepdim=True) for level in z]
            sums = part if sums is None else [a + b for a, b in zip(sums, part)]
        assert sums is not None
        for t, s in zip(d.head.fp32_map.templates(), sums):
            t.copy_(s / len(self.images))
        d.train(was_training)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        d = self.detector
        n = images.shape[0] - images.shape[0] % 2
        if n < 2:
            raise ValueError("PyramidFlow trains on pairs of images: use a batch size of at least 2")
        latents = d.flow(images[:n])
        diffs = [(z[0::2] - z[1::2]).pow(2) for z in latents]  # adjacent pairs
        diff_pixel = d.flow.pyramid.compose(diffs).mean(dim=1)
        loss = torch.fft.fft2(diff_pixel).abs().mean()  # the paper's Fourier loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(d.flow.parameters(), max_norm=1.0)
        self.opt.step()
        self.steps += 1
        if self.steps % self.steps_per_epoch == 0:
            self.refresh_template()
        return {"fourier": loss.item()}


register(PyramidFlow, PyramidFlowRecipe)
