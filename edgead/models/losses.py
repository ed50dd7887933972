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


def update(optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimiser step on ``loss``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bce_discriminator_step(disc: Callable[[Tensor], tuple[Tensor, Tensor]], optimizer: torch.optim.Optimizer,
                           real: Tensor, fake: Tensor, reinit: Callable[[torch.nn.Module], None] | None = None) -> float:
    """Update a sigmoid discriminator on real vs fake (detached) images; returns its loss.

    When the loss collapses below 1e-5 the discriminator has won outright and stops teaching the
    generator, so it is re-initialised with ``reinit`` (GANomaly's reference does this).
    """
    import torch.nn.functional as F

    p_real, _ = disc(real)
    p_fake, _ = disc(fake.detach())
    loss = 0.5 * (F.binary_cross_entropy(p_real, torch.ones_like(p_real))
                  + F.binary_cross_entropy(p_fake, torch.zeros_like(p_fake)))
    update(optimizer, loss)
    if reinit is not None and loss.item() < 1e-5:
        disc.apply(reinit)  # type: ignore[attr-defined]
    return loss.item()


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Softmax focal loss (Lin et al. 2017), mean over pixels: −(1 − p_t)^γ · log p_t.

    ``logits`` (B, K, H, W); ``target`` (B, 1, H, W) class indices as floats (DRAEM: the 0/1 mask).
    Down-weights the easy, mostly-normal pixels so the few anomalous ones are learnt.
    """
    log_p = torch.log_softmax(logits, dim=1).gather(1, target.long())
    return (-(1.0 - log_p.exp()).pow(gamma) * log_p).mean()
