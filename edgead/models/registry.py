"""``--model NAME`` -> (detector class, training recipe)."""

from __future__ import annotations

import importlib
from typing import Any

from edgead.models.base import Detector, DetectorConfig, Recipe

# name -> (module that defines it, one line for `edgead train --help`); imported on first use so
# `edgead --help` stays fast. A name whose module is absent from this install is not offered.
DETECTORS: dict[str, tuple[str, str]] = {
    "patchcore": ("edgead.models.patchcore", "PatchCore: memory bank of VGG-19 patch features, kNN distance"),
    "patchcore_distilled": ("edgead.models.distilled_patchcore",
                            "PatchCore on a small patch network distilled from the VGG-19's relu3_4 (CPU line rate)"),
    "pni": ("edgead.models.pni", "PNI: PatchCore + position and neighbourhood likelihoods"),
    "cflow": ("edgead.models.cflow", "CFLOW-AD: conditional normalising flows on VGG-19 features"),
    "simplenet": ("edgead.models.simplenet", "SimpleNet: feature adaptor + discriminator vs noised features"),
    "rd": ("edgead.models.reverse_distillation", "Reverse Distillation (and RD++): VGG-19 teacher, OCBE, student decoder"),
    "rdpp": ("edgead.models.reverse_distillation", "RD++: Reverse Distillation + multi-projection, OT compactness, simulated anomalies"),
    "students": ("edgead.models.students", "Uninformed Students: distilled patch teacher + student ensemble"),
    "draem": ("edgead.models.draem", "DRAEM: reconstructive + discriminative nets on synthetic anomalies"),
    "pyramidflow": ("edgead.models.pyramidflow", "PyramidFlow: fully normalising flow on a latent pyramid"),
    "ssim_ae": ("edgead.models.ssim_ae", "SSIM autoencoder: 1 - SSIM residual map"),
    "ganomaly": ("edgead.models.ganomaly", "GANomaly: encoder-decoder-encoder, latent distance"),
    "skip_ganomaly": ("edgead.models.skip_ganomaly", "Skip-GANomaly: U-Net generator, image + feature residual"),
    "fanogan": ("edgead.models.fanogan", "f-AnoGAN: WGAN-GP + izif encoder"),
    "egbad": ("edgead.models.egbad", "EGBAD/BiGAN (Wasserstein variant: loss=wgan)"),
    "alad": ("edgead.models.alad", "ALAD: cycle-consistent BiGAN with spectral norm"),
    "anogan": ("edgead.models.anogan", "AnoGAN: DCGAN + per-image latent search (torch only, not exportable)"),
    "vae": ("edgead.models.vae", "VAE: reconstruction + KL"),
    "utad": ("edgead.models.utad", "UTAD: two-stage impression + expert nets, VGG-19 perceptual map"),
}
_MODULES = {name: module for name, (module, _) in DETECTORS.items()}
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


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every detector available in this install."""
    return [(name, DETECTORS[name][1]) for name in available()]


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
