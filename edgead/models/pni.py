"""PNI (Bae, Lee & Kim, "PNI: Industrial Anomaly Detection using Position and Neighborhood
Information", ICCV 2023, arXiv 2211.12634), on the frozen ImageNet VGG-19.

PNI is PatchCore (:mod:`patchcore`: the same encoder, locally aware patch features and greedy
coreset ``C_emb``) with the normal-feature distribution conditioned on where a patch is and what
surrounds it, p(φ | Ω), Ω = (position, neighbourhood):

Distribution coreset
    ``C_dist``: a smaller coreset of ``dist_classes`` rows. Greedy k-center selection is
    incremental, so the first ``dist_classes`` rows of ``C_emb``'s selection order *are* the
    k-center coreset of that size; each training patch gets the index of its nearest ``C_dist``
    row as its class, and so does each ``C_emb`` row (k(e)).
Neighbourhood information, p(c | N_p)
    An MLP (three 1x1 convs, ReLU) predicts the class of the centre patch from its 3 x 3
    neighbourhood without the centre, trained with cross-entropy on the normal training patches.
Position information, p(c | x, y)
    The histogram of the classes seen at each grid position over the training images (smoothed
    over a ``position_window`` of positions, since a few hundred images leave most bins empty).
Score
    p(c | Ω) = (p(c | N_p) + p(c | x, y)) / 2. With Gaussian p(φ | c), -log p(φ | Ω) is dominated by
    the nearest *likely* normal feature; as in the paper, the patch score is the distance to the
    nearest bank row whose class is likely, min over e ∈ C_emb with p(k(e) | Ω) > τ of ‖φ - e‖
    (τ = ``tau_scale`` / |C_dist|; PatchCore's plain nearest distance where no class passes τ).
    Map: that score, upsampled; image score: its maximum. Search and gating are one FP32 island.

Left out, and why (see the README section):
    * WideResNet-101 and the ensemble of backbones: only the ImageNet VGG-19 exists offline.
    * The pixel-wise refinement network, trained on synthetic defects (DRAEM-style cut-outs with
      an outside texture source): a second trained network and anomaly source beyond this issue.
    * The paper feeds the MLP the concatenated neighbourhood features; here the MLP reads their
      mean (8x fewer inputs), to train within a CPU budget of minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import Component, Recipe, TrainConfig, at_least_fp32
from edgead.models.heads import ScoreHead
from edgead.models.losses import update
from edgead.models.memory_bank import (BankSizeError, NearestNeighbourSearch, coreset_size, greedy_coreset,
                                       nearest_distances)
from edgead.models.patch_features import patches_to_rows
from edgead.models.patchcore import (PATCH_DISTANCE, PATCHES, PatchCore, PatchCoreConfig, UpsampledMap,
                                     bank_summary, training_patches)
from edgead.models.registry import register

NEIGHBOUR_PROB = "neighbour_prob"
LARGE = 1e30  # added to the squared distance of unlikely bank rows (finite: no inf in any engine)


@dataclass
class PNIConfig(PatchCoreConfig):
    dist_classes: int = 512  # |C_dist|
    hidden: int = 512  # MLP width
    tau_scale: float = 1.0  # τ = tau_scale / |C_dist|
    position_window: int = 3  # positions pooled into one histogram
    patches_per_step: int = 4096  # training patches per MLP step (a random subset of the batch's)
    grid: int = 0  # patch grid side, set when the bank is built


def ring_counts(height: int, width: int) -> Tensor:
    """(1, 1, h, w): how many of the 8 neighbours of each cell lie inside the grid."""
    ones = torch.ones(1, 1, height, width)
    return F.avg_pool2d(ones, 3, 1, 1, count_include_pad=True) * 9.0 - 1.0


class NeighbourhoodMLP(nn.Module):
    """patches (B, D, h, w) -> p(c | N_p) (B, K, h, w): the mean of the 8 neighbours through an MLP."""

    def __init__(self, dim: int, hidden: int, classes: int, grid: int) -> None:
        super().__init__()
        self.register_buffer("counts", ring_counts(max(grid, 1), max(grid, 1)))
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, hidden, 1),
                                 nn.ReLU(inplace=True), nn.Conv2d(hidden, classes, 1))

    def neighbourhood(self, patches: Tensor) -> Tensor:
        ring = F.avg_pool2d(patches, 3, 1, 1, count_include_pad=True) * 9.0 - patches
        return ring / self.counts

    def logits(self, neighbourhood: Tensor) -> Tensor:
        return self.mlp(neighbourhood)

    def forward(self, patches: Tensor) -> Tensor:
        return torch.softmax(self.logits(self.neighbourhood(patches)), dim=1)


class GatedBankSearch(nn.Module):
    """(patches, p(c | N_p)) -> distance to the nearest likely bank row (B, 1, h, w)."""

    def __init__(self, dim: int, rows: int, classes: int, grid: int, tau: float) -> None:
        super().__init__()
        self.search = NearestNeighbourSearch(torch.zeros(max(rows, 1), dim))
        self.register_buffer("row_class", torch.zeros(max(rows, 1), dtype=torch.long))  # k(e)
        self.register_buffer("position_prob", torch.full((max(grid, 1) ** 2, classes), 1.0 / classes))
        self.tau = tau

    def forward(self, patches: Tensor, neighbour_prob: Tensor) -> Tensor:
        b, d, h, w = patches.shape
        queries = at_least_fp32(patches).flatten(2).transpose(1, 2)  # (B, Q, D)
        d2 = self.search.squared(queries)  # (B, Q, M)
        prob = 0.5 * (at_least_fp32(neighbour_prob).flatten(2).transpose(1, 2) + self.position_prob)  # (B, Q, K)
        likely = prob.index_select(2, self.row_class) > self.tau  # (B, Q, M)
        gated = (d2 + (~likely).to(d2.dtype) * LARGE).min(dim=-1).values
        plain = d2.min(dim=-1).values
        best = torch.where(gated < LARGE, gated, plain)
        return best.sqrt().view(b, 1, h, w)


class PNIMemory(nn.Module):
    def __init__(self, dim: int, rows: int, classes: int, grid: int, tau: float) -> None:
        super().__init__()
        self.fp32_knn = GatedBankSearch(dim, rows, classes, grid, tau)

    def forward(self, patches: Tensor, neighbour_prob: Tensor) -> Tensor:
        return self.fp32_knn(patches, neighbour_prob)


class MaxPatchScore(nn.Module):
    """Image score: the largest patch score."""

    def forward(self, patch_distance: Tensor) -> Tensor:
        return patch_distance.flatten(1).max(dim=1).values


class PNI(PatchCore):
    name = "pni"
    Config = PNIConfig

    def __init__(self, config: PNIConfig) -> None:
        if config.image_score != "reweighted":
            raise ValueError(f"pni scores an image by its largest patch score; image_score={config.image_score!r} "
                             "is PatchCore's option: leave it unset")
        super().__init__(config)
        c = config
        del self.memory  # PatchCore's plain memory: replaced by the gated one
        self.neighbourhood = NeighbourhoodMLP(self.embed.dim, c.hidden, c.dist_classes, c.grid)
        self.memory = PNIMemory(self.embed.dim, c.bank_rows, c.dist_classes, c.grid, c.tau_scale / c.dist_classes)
        self.head = ScoreHead(UpsampledMap(c.image_size), MaxPatchScore(), map_inputs=(PATCH_DISTANCE,),
                              score_inputs=(PATCH_DISTANCE,))

    def components(self) -> list[Component]:
        return [
            Component("encoder", self.encoder, ("image",), self.tap_tensors),
            Component("embed", self.embed, self.tap_tensors, (PATCHES,)),
            Component("neighbourhood", self.neighbourhood, (PATCHES,), (NEIGHBOUR_PROB,)),
            Component("memory", self.memory, (PATCHES, NEIGHBOUR_PROB), (PATCH_DISTANCE,)),
            self.head.component(),
        ]

    def set_bank(self, bank: Tensor, info: dict[str, Any] | None = None) -> None:
        info = info or {}
        knn = self.memory.fp32_knn
        knn.search.set_bank(bank)
        knn.row_class = info["row_class"].to(knn.search.bank.device)
        knn.position_prob = info["position_prob"].to(knn.search.bank.device)
        self.neighbourhood.counts = ring_counts(info["grid"], info["grid"]).to(knn.search.bank.device)
        self.config.bank_rows, self.config.grid = int(bank.shape[0]), int(info["grid"])

    def manifest_extras(self) -> dict[str, Any]:
        c = self.config
        return {"memory_bank": {**bank_summary(c, self.embed.dim), "dist_classes": c.dist_classes,
                                "tau": c.tau_scale / c.dist_classes},
                "backbone": self.encoder.weights_info}


def position_histogram(labels: Tensor, classes: int, grid: int, window: int) -> Tensor:
    """(N, h, w) class labels -> (h * w, K) p(c | position), pooled over ``window`` x ``window`` positions."""
    onehot = F.one_hot(labels.long(), classes).float().sum(0)  # (h, w, K)
    hist = onehot.permute(2, 0, 1).unsqueeze(0)
    if window > 1:
        hist = F.avg_pool2d(hist, window, 1, window // 2, count_include_pad=False)
    hist = hist[0].permute(1, 2, 0).reshape(grid * grid, classes)
    return hist / hist.sum(1, keepdim=True).clamp_min(1e-12)


class PNIRecipe(Recipe):
    """prepare(): bank, C_dist, classes and the position histogram; steps: the neighbourhood MLP."""

    default_lr = 1e-3
    default_betas = (0.9, 0.999)

    def __init__(self, detector: PNI, train: TrainConfig) -> None:
        super().__init__(detector, train)
        self.opt = self.adam(detector.neighbourhood.mlp, betas=self.default_betas)
        self.generator = torch.Generator().manual_seed(train.seed)

    def prepare(self, images: Tensor) -> None:
        det: PNI = self.detector  # type: ignore[assignment]
        c = det.config
        patches = training_patches(det, images)
        n, _, h, w = patches.shape
        if h != w:
            raise ValueError(f"pni: the patch grid must be square, got {h}x{w}")
        rows = patches_to_rows(patches)
        try:
            m = coreset_size(len(rows), rows.shape[1], c.coreset_ratio, c.max_bank_mb, minimum=c.dist_classes)
        except BankSizeError as exc:
            raise BankSizeError(f"pni: {n} normal training images: {exc} (|C_dist| = {c.dist_classes}; "
                                "lower --set dist_classes=...)") from None
        sel = greedy_coreset(rows, m, c.project_dim, c.seed, c.max_candidates)
        bank = rows[sel.candidates[sel.indices].to(rows.device)].clone()
        dist_rows = bank[:c.dist_classes]  # the first K greedy picks: the K-center coreset
        _, labels = nearest_distances(rows, dist_rows)
        _, row_class = nearest_distances(bank, dist_rows)
        hist = position_histogram(labels.view(n, h, w).cpu(), c.dist_classes, h, c.position_window)
        det.set_bank(bank, {"row_class": row_class[:, 0], "position_prob": hist, "grid": h})
        self.patches, self.labels = patches, labels.view(n, h, w)

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        det: PNI = self.detector  # type: ignore[assignment]
        if self.batch_indices is not None:  # cached features of these training images
            idx = self.batch_indices.to(self.patches.device)
            patches, labels = self.patches[idx], self.labels[idx]
        else:  # augmented images: recompute their features; class = that of the nearest bank row
            with torch.no_grad():
                patches = det.embed(*det.encoder(images))
                d2 = det.memory.fp32_knn.search.squared(patches_to_rows(patches)[:, None])[:, 0]
                dist_class = det.memory.fp32_knn.row_class
                labels = dist_class[d2.argmin(-1)].view(patches.shape[0], *patches.shape[-2:])
        ring = det.neighbourhood.neighbourhood(patches)
        x, y = patches_to_rows(ring), labels.flatten()
        if len(x) > det.config.patches_per_step:
            pick = torch.randperm(len(x), generator=self.generator)[:det.config.patches_per_step].to(x.device)
            x, y = x[pick], y[pick]
        logits = det.neighbourhood.logits(x[:, :, None, None])[:, :, 0, 0]
        loss = F.cross_entropy(logits, y)
        update(self.opt, loss)
        return {"ce": loss.item()}


register(PNI, PNIRecipe)
