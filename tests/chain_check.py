"""Shared assertion: a detector's forward graph is its components run one by one."""

from __future__ import annotations

import torch


def assert_forward_is_chain(detector: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``detector(x)`` and its components by hand, module by module, as a device-side engine
    chain would; assert both agree and the outputs have the API's shapes. Returns (score, map)."""
    with torch.no_grad():
        score, amap = detector(x)
        manual = {"image": x}
        for comp in detector.components():
            out = comp.module(*(manual[n] for n in comp.inputs))
            manual.update(zip(comp.outputs, out if isinstance(out, tuple) else (out,)))
    torch.testing.assert_close(manual["score"], score)
    torch.testing.assert_close(manual["anomaly_map"], amap)
    n, _, h, w = x.shape
    assert score.shape == (n,) and amap.shape == (n, 1, h, w)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    return score, amap
