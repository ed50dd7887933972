"""Detectors (need torch). The runtime never imports this package."""

from edgead.models.base import Component, Detector, DetectorConfig, Recipe, TrainConfig
from edgead.models.registry import available, create, get

__all__ = ["Component", "Detector", "DetectorConfig", "Recipe", "TrainConfig", "available", "create", "get"]
