"""Locally aware patch features (Roth et al., "Towards Total Recall in Industrial Anomaly
Detection", CVPR 2022, Sec. 3.1), shared by PatchCore, PNI and SimpleNet.

Each tap of the frozen backbone is averaged over a ``neighbourhood`` x ``neighbourhood`` window
(stride 1, so the grid keeps its size; the border averages only the cells inside the image, so a
patch at the edge is not pulled towards zero), the coarser taps are bilinearly upsampled to the
finest tap's grid, and the taps are concatenated over channels:
``(B, C_1, h, w), (B, C_2, h/2, w/2) -> (B, C_1 + C_2, h, w)``. One vector per cell of the finest
grid is one "patch". The paper then pools each tap's channels to a common size; with the VGG-19
taps used here (256 + 512 channels) the concatenation is already below the paper's 1024, so no
channel pooling is applied. Each tap is multiplied by a weight (``tap_weight``, 1 until fitted):
:func:`equalise_taps` sets it, from the normal training patches, to one over the tap's mean patch
norm, so that every tap adds as much to a distance as the others. Without it the deeper tap (relu4_4
has norms 2-4x relu3_4's on wood, washer and pcb) decides most nearest neighbours; with it the proxy
image AUROC on thin lines rose 0.902 -> 0.922 (``benchmarks/patchcore_study.py``, validation only).

:func:`extract_patches` runs a detector's encoder and this module over many images in batches
(with a progress bar): the memory-bank methods build their bank from it and SimpleNet / PNI cache
it once so that an epoch does not recompute the VGG-19.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgead.models.base import at_least_fp32
from tqdm.auto import tqdm

__all__ = ["LocallyAwarePatches", "equalise_taps", "extract_patches", "patches_to_rows", "rows_to_patches"]


class LocallyAwarePatches(nn.Module):
    """Tap features -> (B, D, h, w) patch features on the finest tap's grid (see module docstring)."""

    def __init__(self, channels: Sequence[int], neighbourhood: int = 3) -> None:
        super().__init__()
        if neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"the patch neighbourhood must be odd and >= 1, got {neighbourhood}")
        self.channels = tuple(int(c) for c in channels)
        self.neighbourhood = neighbourhood
        self.pool = nn.AvgPool2d(neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=False)
        self.register_buffer("tap_weight", torch.ones(len(self.channels)))

    @property
    def dim(self) -> int:
        return sum(self.channels)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # A run saved before the tap weights existed kept its taps unweighted: weights of 1.
        state_dict.setdefault(prefix + "tap_weight", torch.ones_like(self.tap_weight))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, *taps: Tensor) -> Tensor:
        if len(taps) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} taps, got {len(taps)}")
        size = taps[0].shape[-2:]
        parts = []
        for i, tap in enumerate(taps):
            x = self.pool(tap) if self.neighbourhood > 1 else tap
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            parts.append(x * self.tap_weight[i].to(x.dtype))
        return torch.cat(parts, dim=1)


@torch.no_grad()
def equalise_taps(embed: LocallyAwarePatches, patches: Tensor, gains: Sequence[float] = ()) -> Tensor:
    """Fit ``embed.tap_weight`` so each tap's mean patch norm over ``patches`` is 1 (or its entry of
    ``gains``, one per tap); return ``patches`` so weighted.

    ``patches`` (N, D, h, w) are the training images' features under the current weights; the new
    weights are relative to them, so fitting twice on the same features changes nothing.
    """
    if gains and (len(gains) != len(embed.channels) or min(gains) <= 0):
        raise ValueError(f"tap gains must be {len(embed.channels)} positive numbers, one per tap, got {list(gains)}")
    if patches.shape[1] != embed.dim:
        raise ValueError(f"expected {embed.dim} patch channels, got {patches.shape[1]}")
    chunks = patches.split(list(embed.channels), dim=1)
    norms = torch.stack([chunk.pow(2).sum(1).sqrt().mean() for chunk in chunks])
    if not bool(torch.isfinite(norms).all()) or bool((norms <= 0).any()):
        raise ValueError(f"tap norms must be finite and positive to equalise them, got {norms.tolist()}")
    factor = torch.tensor(list(gains) or [1.0] * len(norms)).to(embed.tap_weight) / norms.to(embed.tap_weight)
    embed.tap_weight.mul_(factor)
    scale = torch.repeat_interleave(factor.to(patches), torch.tensor(embed.channels, device=patches.device))
    return patches * scale.view(1, -1, 1, 1)


def patches_to_rows(patches: Tensor) -> Tensor:
    """(B, D, h, w) -> (B * h * w, D): one row per patch, image-major then row-major."""
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])


def rows_to_patches(rows: Tensor, batch: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patches_to_rows`."""
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def extract_patches(encoder: nn.Module, embed: Callable[..., Tensor], images: Tensor, batch_size: int = 16,
                    desc: str = "patch features", progress: bool | None = None) -> Tensor:
    """(N, C, H, W) images -> (N, D, h, w) patch features, in batches, on ``images``' device.

    The frozen encoder is run without gradients; the result stays FP32. ``progress=None`` shows the
    bar on a terminal only (tqdm's rule), so logs of batch jobs stay clean.
    """
    out: list[Tensor] = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, disable=None if progress is None else not progress, leave=False):
        taps = encoder(images[start:start + batch_size])
        out.append(at_least_fp32(embed(*taps)))
    return torch.cat(out, dim=0)


def principal_components(rows: Tensor, dim: int, seed: int, max_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """(mean (D,), basis (D, dim)) of the leading principal components of ``rows`` (N, D), fitted on
    a seeded subsample of at most ``max_rows``: ``(x - mean) @ basis`` projects onto them."""
    sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:max_rows]]
    mean = sample.mean(0)
    return mean, torch.linalg.svd(sample - mean, full_matrices=False)[2][:dim].T
