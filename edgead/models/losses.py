"""Losses shared by several detectors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def gradient_penalty(critic: Callable[..., Tensor], real: tuple[Tensor, ...], fake: tuple[Tensor, ...]) -> Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): (‖∇ critic(x̃)‖₂ - 1)² at random interpolates x̃.

    ``real`` and ``fake`` are tuples so joint critics D(x, z) interpolate every input together.
    ``critic`` returns the scalar critic value per sample.
    """
    alpha = torch.rand(real[0].shape[0], device=real[0].device)
    mixed = tuple((alpha.view(-1, *[1] * (r.dim() - 1)) * r + (1 - alpha.view(-1, *[1] * (r.dim() - 1))) * f)
                  .detach().requires_grad_(True) for r, f in zip(real, fake))
    out = critic(*mixed)
    grads = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    norm = torch.cat([g.flatten(1) for g in grads], dim=1).norm(2, dim=1)
    return ((norm - 1) ** 2).mean()
