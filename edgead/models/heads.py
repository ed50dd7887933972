"""The one score head: the last component of every detector, written once.

Each detector states two functions and the tensors they read:

* its **map function** ``map_fn(*map_inputs) -> (B, 1, H, W)``, the anomaly map at the input's
  resolution (a reconstruction residual, a nearest-neighbour distance, a negative likelihood...);
* its **score function** ``score_fn(*score_inputs) -> (B,)``, the image score; its inputs may
  name ``anomaly_map`` to read the map just computed (top-k mean, maximum...).

:class:`ScoreHead` runs them and returns ``(score, anomaly_map)``. Both live in FP32 islands
(attributes ``fp32_map`` and ``fp32_score``: the FP16 export keeps every op under an ``fp32_``
scope in FP32, and INT8 leaves them in float), because distances, sums of squares, top-k and
log-likelihoods are where reduced precision overflows or reorders. One exception: a map function
that carries its own islands and convolutions worth running in FP16 (the VGG perceptual map,
``mixed_precision = True``) is held as ``map`` and keeps its own ``fp32_*`` parts.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from edgead.core.contract import ANOMALY_MAP, OUTPUT_NAMES
from edgead.models.base import Component

HEAD = "head"  # the component name of every detector's score head


class ScoreHead(nn.Module):
    """(tensors named ``inputs``) -> (score, anomaly_map), in FP32.

    ``inputs`` is the union of ``map_inputs`` and ``score_inputs`` (without ``anomaly_map``), in
    first-seen order: the order the component's ONNX graph takes them.
    """

    def __init__(self, map_fn: nn.Module, score_fn: nn.Module, map_inputs: Sequence[str],
                 score_inputs: Sequence[str] = (ANOMALY_MAP,)) -> None:
        super().__init__()
        if getattr(map_fn, "mixed_precision", False):
            self.map = map_fn
        else:
            self.fp32_map = map_fn
        self.fp32_score = score_fn
        self.map_inputs = tuple(map_inputs)
        self.score_inputs = tuple(score_inputs)
        if ANOMALY_MAP in self.map_inputs:
            raise ValueError("the map function cannot read the map it computes")
        self.inputs = tuple(dict.fromkeys(n for n in (*self.map_inputs, *self.score_inputs) if n != ANOMALY_MAP))

    @property
    def map_fn(self) -> nn.Module:
        return self.map if hasattr(self, "map") else self.fp32_map

    def forward(self, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        values = dict(zip(self.inputs, tensors))
        anomaly_map = self.map_fn(*(values[n] for n in self.map_inputs))
        values[ANOMALY_MAP] = anomaly_map
        score = self.fp32_score(*(values[n] for n in self.score_inputs))
        return score, anomaly_map

    def component(self, name: str = HEAD) -> Component:
        return Component(name, self, self.inputs, OUTPUT_NAMES)


# State-dict prefix of the map function in a run saved before the one score head, when the map
# held weights (the VGG scorer): ``head.scorer.*`` is now ``head.map.*``. See
# :attr:`edgead.models.base.Detector.renamed_state_keys`.
RENAMED_SCORER_KEYS = {"head.scorer.": "head.map."}


# -- score functions shared by several detectors ---------------------------------------------------

class TopKMean(nn.Module):
    """Image score from a map: the mean of its top ``fraction`` of pixels (at least one).

    More stable than the max (one hot pixel) and more sensitive than the mean (small defects).
    ``fraction=0`` is the maximum.
    """

    def __init__(self, fraction: float = 0.01) -> None:
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"top-k fraction must lie in [0, 1], got {fraction}")
        self.fraction = fraction

    def forward(self, anomaly_map: Tensor) -> Tensor:
        flat = anomaly_map.flatten(1)
        k = max(1, int(flat.shape[1] * self.fraction + 0.5))  # static shapes: k is a constant in every export
        return flat.topk(k, dim=1).values.mean(dim=1)


class MeanAbsoluteDistance(nn.Module):
    """mean |a - b| per sample over every other axis (ALAD's and EGBAD's feature-space L1: a mean
    rather than a sum, so it does not depend on the feature size)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).abs().flatten(1).mean(dim=1)


class WeightedImageFeatureDistance(nn.Module):
    """w_img·mean((x - x̂)²) + w_feat·mean((f - f̂)²) per sample, the images compared in [-1, 1]
    (Skip-GANomaly's and f-AnoGAN's score)."""

    def __init__(self, w_img: float, w_feat: float) -> None:
        super().__init__()
        self.w_img, self.w_feat = w_img, w_feat

    def forward(self, image: Tensor, recon: Tensor, feat: Tensor, feat_hat: Tensor) -> Tensor:
        img = (2.0 * (image - recon)).pow(2).flatten(1).mean(dim=1)  # x·2-1 minus x̂·2-1
        lat = (feat - feat_hat).pow(2).flatten(1).mean(dim=1)
        return self.w_img * img + self.w_feat * lat


class MeanSquaredDistance(nn.Module):
    """mean((a - b)²) per sample over every other axis (GANomaly's latent score)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a - b).pow(2).flatten(1).mean(dim=1)
