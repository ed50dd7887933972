"""``--model NAME`` -> (detector class, training recipe)."""

from __future__ import annotations

import importlib
from typing import Any

from edgead.models.base import Detector, DetectorConfig, Recipe

# name -> module that defines it; imported on first use so `edgead --help` stays fast.
_MODULES = {
    "ganomaly": "edgead.models.ganomaly",
    "ssim_ae": "edgead.models.ssim_ae",
    "skip_ganomaly": "edgead.models.skip_ganomaly",
    "fanogan": "edgead.models.fanogan",
    "egbad": "edgead.models.egbad",
    "alad": "edgead.models.alad",
    "anogan": "edgead.models.anogan",
    "vae": "edgead.models.vae",
    "utad": "edgead.models.utad",
}
_REGISTRY: dict[str, tuple[type[Detector], type[Recipe]]] = {}


def register(detector: type[Detector], recipe: type[Recipe]) -> None:
    if not detector.name:
        raise ValueError(f"{detector.__name__} has no name")
    _REGISTRY[detector.name] = (detector, recipe)


def _load(name: str) -> None:
    if name not in _REGISTRY and name in _MODULES:
        importlib.import_module(_MODULES[name])


def available() -> list[str]:
    """Names whose module exists in this install, in registry order."""
    names = []
    for name in _MODULES:
        try:
            _load(name)
        except ModuleNotFoundError as exc:
            if exc.name != _MODULES[name]:
                raise
            continue
        names.append(name)
    return names


def get(name: str) -> tuple[type[Detector], type[Recipe]]:
    _load(name)
    if name not in _REGISTRY:
        raise KeyError(f"unknown detector {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def create(name: str, **config: Any) -> Detector:
    """Build detector ``name`` from config fields (unknown fields are an error)."""
    detector_cls, _ = get(name)
    cfg: DetectorConfig = detector_cls.Config.from_dict(config)
    return detector_cls(cfg)
