"""The memory bank of PatchCore and PNI: greedy coreset selection and the nearest-neighbour search.

Coreset (Roth et al. 2022, Sec. 3.2, Algorithm 1; Sener & Savarese 2018)
    Greedy k-center: start from one seeded random patch, then repeatedly add the patch farthest
    from the coreset chosen so far. The distances are taken on a Johnson-Lindenstrauss random
    projection of the features (Gaussian, ``project_dim`` columns, seeded), as in the paper, which
    keeps the selection cheap: one matrix-vector product over the candidates per added row. The
    result is deterministic for a seed. ``max_candidates`` subsamples the candidates (seeded)
    when the training set is very large, which bounds memory (the hot spot of the whole-bank
    selection).

Nearest-neighbour search in the graph
    :class:`NearestNeighbourSearch` is plain tensor algebra that ONNX Runtime and TensorRT both
    run: ``d² = ‖q‖² - 2 q·bᵀ + ‖b‖²`` through one MatMul against the bank (an initializer), then
    TopK (k = 1 is the nearest row). The detectors hold it under an ``fp32_`` scope: the squared
    norms of VGG features overflow FP16 and the subtraction cancels, so the distance arithmetic
    stays FP32 in every engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = ["CoresetResult", "greedy_coreset", "coreset_size", "bank_megabytes", "NearestNeighbourSearch",
           "bank_neighbours", "nearest_distances", "BankSizeError"]

BYTES_FP32 = 4


class BankSizeError(ValueError):
    """The training set cannot give the coreset a detector asks for; the message says what to change."""


@dataclass
class CoresetResult:
    indices: Tensor  # (n,) rows of the candidates, in selection order
    candidates: Tensor  # (N,) the rows of the input the selection ran on (all, or a seeded subsample)
    radius: float  # covering radius in the projected space: max distance of a candidate to the coreset


def bank_megabytes(rows: int, dim: int) -> float:
    """Size of an FP32 bank in MB (2**20 bytes)."""
    return rows * dim * BYTES_FP32 / 2 ** 20


def coreset_size(n_patches: int, dim: int, ratio: float, max_mb: float, minimum: int = 1) -> int:
    """Rows of the coreset: ``ratio`` of the patches, at least ``minimum``, at most what ``max_mb`` holds.

    Raises :class:`BankSizeError` when there are fewer patches than ``minimum`` rows or the cap
    cannot hold ``minimum`` rows.
    """
    if not 0.0 < ratio <= 1.0:
        raise BankSizeError(f"coreset_ratio must lie in (0, 1], got {ratio}")
    cap = int(max_mb * 2 ** 20 // (dim * BYTES_FP32))
    if cap < minimum:
        raise BankSizeError(f"max_bank_mb={max_mb} holds {cap} rows of {dim} FP32 values, fewer than the "
                            f"{minimum} needed; raise --set max_bank_mb=...")
    if n_patches < minimum:
        raise BankSizeError(f"the training images give {n_patches} patches, fewer than the {minimum} rows the "
                            "memory bank needs; add normal images (or use a larger image size)")
    return max(minimum, min(cap, math.ceil(ratio * n_patches)))


def _projection(dim: int, project_dim: int | None, generator: torch.Generator) -> Tensor | None:
    if project_dim is None or project_dim <= 0 or project_dim >= dim:
        return None
    return torch.randn(dim, project_dim, generator=generator) / math.sqrt(project_dim)


@torch.no_grad()
def greedy_coreset(features: Tensor, n: int, project_dim: int | None = 128, seed: int = 0,
                   max_candidates: int | None = None, chunk: int = 65536,
                   progress: bool | None = None) -> CoresetResult:
    """Greedy k-center selection of ``n`` rows of ``features`` (N, D); see the module docstring."""
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got {tuple(features.shape)}")
    total = features.shape[0]
    if not 1 <= n <= total:
        raise BankSizeError(f"cannot select a coreset of {n} rows from {total} patches")
    gen = torch.Generator().manual_seed(int(seed))
    candidates = torch.arange(total)
    if max_candidates is not None and total > max_candidates:
        candidates = torch.randperm(total, generator=gen)[:max_candidates].sort().values
        n = min(n, len(candidates))
    proj = _projection(features.shape[1], project_dim, gen)
    parts = []
    for start in range(0, len(candidates), chunk):  # projected in chunks: no full-size temporary
        rows = features[candidates[start:start + chunk].to(features.device)].float()
        parts.append(rows if proj is None else rows @ proj.to(rows.device))
    z = torch.cat(parts)
    sq = z.pow(2).sum(1)
    min_d = torch.full((len(z),), math.inf, device=z.device)
    chosen = torch.empty(n, dtype=torch.long)
    current = int(torch.randint(len(z), (1,), generator=gen))
    for i in tqdm(range(n), desc="coreset", disable=None if progress is None else not progress,
                  leave=False):
        chosen[i] = current
        d = (sq - 2.0 * torch.mv(z, z[current]) + sq[current]).clamp_min_(0.0)
        torch.minimum(min_d, d, out=min_d)
        current = int(torch.argmax(min_d))
    return CoresetResult(chosen, candidates, float(min_d.max().sqrt()))


@torch.no_grad()
def nearest_distances(queries: Tensor, bank: Tensor, k: int = 1, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """(distances, indices) of the ``k`` nearest ``bank`` rows to each query row, Euclidean, in chunks."""
    search = NearestNeighbourSearch(bank)
    values, indices = [], []
    for start in range(0, len(queries), chunk):
        d2, idx = search.squared(queries[start:start + chunk]).topk(k, dim=-1, largest=False)
        values.append(d2.sqrt())
        indices.append(idx)
    return torch.cat(values), torch.cat(indices)


def bank_neighbours(bank: Tensor, k: int, chunk: int = 4096) -> Tensor:
    """(M, k) indices of each bank row's ``k`` nearest rows in the bank, itself first (PatchCore's
    N_b(m*), computed once when the bank is built so the graph only gathers)."""
    k = min(k, len(bank))
    _, idx = nearest_distances(bank, bank, k, chunk)
    return idx


class NearestNeighbourSearch(nn.Module):
    """Squared L2 distances of query rows to a fixed bank, as one MatMul (see the module docstring)."""

    def __init__(self, bank: Tensor) -> None:
        super().__init__()
        if bank.dim() != 2:
            raise ValueError(f"the bank must be (rows, dim), got {tuple(bank.shape)}")
        self.register_buffer("bank", bank.float().contiguous())
        self.register_buffer("bank_sq", self.bank.pow(2).sum(1))

    @property
    def rows(self) -> int:
        return int(self.bank.shape[0])

    def set_bank(self, bank: Tensor) -> None:
        self.bank = bank.float().contiguous().to(self.bank.device)
        self.bank_sq = self.bank.pow(2).sum(1)

    def squared(self, queries: Tensor) -> Tensor:
        """(..., D) -> (..., M): ‖q‖² - 2 q·bᵀ + ‖b‖², clamped at 0 (the cancellation can go below)."""
        q = queries.to(self.bank.dtype)  # FP32 (FP64 for the golden reference run)
        q_sq = q.pow(2).sum(-1, keepdim=True)
        return (q_sq - 2.0 * torch.matmul(q, self.bank.t()) + self.bank_sq).clamp_min(0.0)

    def forward(self, queries: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """(..., D) -> (squared distances (..., k), bank indices (..., k)), nearest first."""
        return self.squared(queries).topk(k, dim=-1, largest=False)
