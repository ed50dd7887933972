"""The detector API: named components plus one inference graph.

A detector is an ``nn.Module`` whose ``forward`` *is* the inference graph:
``image batch (B, C, H, W) float32 in [0, 1] -> (score (B,), anomaly_map (B, 1, H, W))``.
The same module is evaluated in PyTorch, exported to ONNX and built into every engine,
so the score is written once.

Training lives apart from the graph (anomalib's torch_model / lightning_model split): each
detector file also defines a :class:`Recipe` holding the losses and optimisers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from edgead.core.contract import ANOMALY_MAP, IMAGE, SCORE
from edgead.core.wiring import run_wiring


@dataclass
class DetectorConfig:
    """Typed configuration shared by every detector; detectors subclass it to add their own fields."""

    image_size: int = 128
    channels: int = 3
    latent_dim: int = 100
    width: int = 64  # ngf/ndf: channels of the first conv block
    scorer: str = "l1"  # map function of reconstruction detectors: l1 | ssim | vgg
    upsample: str = "transpose"  # decoders' x2 layers: transpose (the papers) | resize (nearest + conv; blocks.py)
    vgg_weights: str | None = None  # VGG-19 state dict file for the vgg scorer
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DetectorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class Component:
    """One exportable piece of a detector: a module wired by tensor names.

    ``inputs`` name tensors produced by earlier components (or ``"image"``); ``outputs`` name what
    this module returns, in order. The wiring is data, so the fused graph, the component engines
    and a device-side chain all follow the same one.
    """

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def run_components(components: list[Component], image: Tensor, until: str | None = None) -> dict[str, Tensor]:
    """Run ``components`` in order on ``image`` (up to the one writing ``until``); returns every
    named tensor. The PyTorch face of :func:`edgead.core.wiring.run_wiring`."""
    return run_wiring(components, {IMAGE: image}, lambda comp, args: comp.module(*args), until=until)


@dataclass
class TrainConfig:
    """Optimisation settings: shared by every recipe; per-method defaults live in the recipe."""

    epochs: int = 15
    batch_size: int = 16
    lr: float | None = None  # None: the method's reference learning rate
    augment: bool = False  # flips and small rotations
    device: str = "auto"
    seed: int = 0
    # Stop early once training has used this much CPU time (process time, all threads): a budget
    # that means the same on a busy machine as on an idle one.
    time_budget_s: float | None = None
    # The epoch kept is the best on this validation proxy (edgead.training.proxies.PROXIES).
    proxy: str = "cutpaste"
    extra: dict[str, Any] = field(default_factory=dict)


class Detector(nn.Module):
    """Base class. Subclasses set ``name``/``Config``, build their networks and implement
    :meth:`forward` (the inference graph) and :meth:`components`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    exportable: ClassVar[bool] = True  # False: the score is not one forward graph (AnoGAN)
    # State-dict prefixes renamed since runs were first saved, {old: new}: loading a run applies
    # them (:meth:`upgrade_state_dict`), so an older model.safetensors keeps loading.
    renamed_state_keys: ClassVar[dict[str, str]] = {}
    # Config fields whose default changed, {field: the value runs saved before that field existed
    # were trained with}: loading a run whose config lacks the field uses this value, not the new
    # default, so an older run keeps the graph and the score its calibration was fitted to.
    legacy_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (1, c.channels, c.image_size, c.image_size)

    def components(self) -> list[Component]:
        """The exportable components, in data-flow order, ending with the ``score`` and
        ``anomaly_map`` outputs."""
        raise NotImplementedError

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The inference graph: the components, run in order. Detectors don't override this, so
        the fused graph and the chained components cannot disagree."""
        values = run_components(self.components(), image)
        return values[SCORE], values[ANOMALY_MAP]

    def run(self, image: Tensor, until: str | None = None) -> dict[str, Tensor]:
        """Every named tensor of the graph on ``image``, up to ``until`` (training steps use it
        instead of re-chaining the networks by hand)."""
        return run_components(self.components(), image, until=until)

    def manifest_extras(self) -> dict[str, Any]:
        """Detector-specific facts for the bundle manifest (JSON values: a memory bank's rows and
        MB, where the backbone's weights came from...); none by default."""
        return {}

    @classmethod
    def upgrade_state_dict(cls, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` with every key under an old prefix of :attr:`renamed_state_keys` renamed."""
        def rename(key: str) -> str:
            for old, new in cls.renamed_state_keys.items():
                if key.startswith(old):
                    return new + key[len(old):]
            return key

        return {rename(k): v for k, v in state.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters()), torch.empty(0)).device

    @torch.no_grad()
    def component_shapes(self) -> dict[str, tuple[int, ...]]:
        """Static shape (batch 1) of every named tensor, found by one dry run."""
        was_training = self.training
        self.eval()
        try:
            values = run_components(self.components(), torch.zeros(self.input_shape, device=self.device))
        finally:
            self.train(was_training)
        return {name: tuple(t.shape) for name, t in values.items()}


class Recipe:
    """Training logic of one detector: optimisers and one step. Multi-stage methods list stages."""

    stages: ClassVar[tuple[str, ...]] = ("main",)
    default_lr: ClassVar[float] = 2e-4
    default_betas: ClassVar[tuple[float, float]] = (0.5, 0.999)

    def __init__(self, detector: Detector, train: TrainConfig) -> None:
        self.detector = detector
        self.train = train
        self.lr = train.lr if train.lr is not None else self.default_lr
        # Rows of the training set in the batch that step() receives (set by the trainer), so a
        # recipe can look up what prepare() cached per image. None when augmentation is on:
        # augmented images no longer match anything cached.
        self.batch_indices: Tensor | None = None

    def prepare(self, images: Tensor) -> None:
        """Called once before training with every training image (N, C, H, W) on the training
        device. A recipe whose networks read a frozen backbone caches its features here (when
        ``train.augment`` is off), so an epoch does not recompute it; memory-bank methods build
        their bank here."""

    def validate(self, images: Tensor) -> None:
        """Called with the normal validation images (N, C, H, W) before each epoch of the final stage
        is scored, so before model selection and calibration: statistics that a method standardises
        its map with (Uninformed Students) come from the validation split, never the test split."""

    def finish(self, images: Tensor, objective: Callable[[], float]) -> dict[str, Any]:
        """Called once after training, with the best epoch restored and before calibration: settings
        that need no training, chosen on the validation proxy (``objective()`` scores the detector as
        it stands; ``images`` are the validation images). Returns what was chosen, for the run's record."""
        return {}

    def budget_shares(self) -> tuple[float, ...] | None:
        """The fraction of a CPU-time budget each stage gets; None: in proportion to the stages' epochs."""
        return None

    def adam(self, *modules: nn.Module, lr: float | None = None,
             betas: tuple[float, float] | None = None) -> torch.optim.Adam:
        params = [p for m in modules for p in m.parameters()]
        return torch.optim.Adam(params, lr=lr or self.lr, betas=betas or self.default_betas)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser the recipe holds (saved for ``--resume``)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def begin_stage(self, stage: str) -> None:
        """Called before the first step of each stage (freeze, build optimisers...)."""

    def step(self, images: Tensor, stage: str) -> dict[str, float]:
        """One optimisation step on a batch of normal images in [0, 1]; returns losses to log."""
        raise NotImplementedError


def to_signed(image: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the range of tanh generators. Part of every graph, kept in FP32 at export."""
    return image * 2.0 - 1.0



def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in FP32, or as it is if wider: an FP32 island upcasts FP16, and leaves the float64
    yardstick of the golden outputs (a detector run in float64) in float64."""
    return x if x.dtype == torch.float64 else x.float()
