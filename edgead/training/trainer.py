"""The training loop shared by every detector: seeded, resumable, selected on validation.

The loop knows nothing of a method's losses: it feeds batches of normal images to the detector's
:class:`~edgead.models.base.Recipe`. After training it scores the held-out normal validation
images and stores the score normalisation and thresholds with the run. No test image is read.

Model selection needs a signal without anomalies, so each epoch is scored by a *proxy AUROC*:
validation images against copies of themselves with a CutPaste patch (Li et al. 2021), and with
``TrainConfig.proxy = "cutpaste+lines"`` also with a thin line (:mod:`edgead.training.proxies`).
Neither is the test split's defect painter, so selection cannot tune towards the test set.
Settings that need no training (the distilled PatchCore's pixel-tap gain) are chosen on the same
proxy once the best epoch is restored (:meth:`~edgead.models.base.Recipe.finish`) and recorded in
the run's ``train.chosen_after_training``.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgead import __version__
from edgead.core.calibration import Calibration, calibrate
from edgead.core.postprocess import DEFAULT_SIGMA
from edgead.data.source import DataSource
from edgead.models import registry
from edgead.models.base import Detector, TrainConfig
from edgead.training.checkpoint import HISTORY, RESUME, load_resume, save_resume, save_run
from edgead.training.predict import predict, predict_smoothed
from edgead.training.proxies import cutpaste, mean_auroc, proxy_images  # noqa: F401 - cutpaste re-exported


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment(batch: torch.Tensor, generator: torch.Generator, max_degrees: float = 5.0) -> torch.Tensor:
    """Inspection-safe augmentation: random flips and small rotations (reflect-padded)."""
    n = batch.shape[0]
    flip_h = torch.rand(n, generator=generator) < 0.5
    flip_v = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip_h[:, None, None, None], batch.flip(3), batch)
    batch = torch.where(flip_v[:, None, None, None], batch.flip(2), batch)
    angles = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    cos, sin = angles.cos(), angles.sin()
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1),
                         torch.stack([sin, cos, torch.zeros(n)], 1)], 1).to(batch)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, padding_mode="reflection", align_corners=False)


def proxy_auroc(detector: Detector, val_images: np.ndarray, seed: int = 0, kind: str = "cutpaste") -> float:
    """The selection objective of an epoch (:mod:`edgead.training.proxies`)."""
    normal, _ = predict(detector, val_images)
    return mean_auroc(normal, [predict(detector, x)[0] for x in proxy_images(val_images, kind, seed)])


def _epochs_for(stage: str, train: TrainConfig) -> int:
    return int(train.extra.get(f"epochs_{stage}", train.epochs))


def _stage_deadlines(stages: tuple[str, ...], train: TrainConfig, started: float,
                     shares: tuple[float, ...] | None = None) -> list[float]:
    """CPU-time deadline of each stage: the budget split by the recipe's ``shares``, else in
    proportion to the stage's epochs."""
    if train.time_budget_s is None:
        return [math.inf] * len(stages)
    if shares is not None and len(shares) != len(stages):
        raise ValueError(f"{len(shares)} budget shares for {len(stages)} stages {stages}")
    epochs = list(shares) if shares is not None else [_epochs_for(s, train) for s in stages]
    total, acc, out = max(sum(epochs), 1e-12), 0.0, []
    for n in epochs:
        acc += n
        out.append(started + train.time_budget_s * acc / total)
    return out


def train_from_arrays(model: str, train_images: np.ndarray, val_images: np.ndarray, out: str | Path, *,
                      config: dict[str, Any] | None = None, train: TrainConfig | None = None,
                      meta: dict[str, Any] | None = None, resume: bool = False,
                      progress: bool = True) -> Path:
    """Train ``model`` on normal images (N, C, H, W) in [0, 1]; calibrate on ``val_images``; save a run."""
    train = train or TrainConfig()
    config = dict(config or {})
    config.setdefault("image_size", int(train_images.shape[-1]))
    config.setdefault("channels", int(train_images.shape[1]))
    config.setdefault("seed", train.seed)
    seed_everything(train.seed)
    device = select_device(train.device)
    detector_cls, recipe_cls = registry.get(model)
    detector = detector_cls(detector_cls.Config.from_dict(config)).to(device)
    recipe = recipe_cls(detector, train)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    history: list[dict[str, Any]] = []
    start_stage, start_epoch = 0, 0
    if resume and (out / RESUME).is_file():
        state = load_resume(out / RESUME)
        detector.load_state_dict(state["model"])
        for name, opt in recipe.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        start_stage, start_epoch = int(state["stage"]), int(state["epoch"]) + 1
        history = json.loads((out / HISTORY).read_text()) if (out / HISTORY).is_file() else []

    generator = torch.Generator().manual_seed(train.seed)
    data = torch.from_numpy(np.ascontiguousarray(train_images, dtype=np.float32))
    prepare_cpu = time.process_time()
    recipe.prepare(data.to(device))  # memory banks are built here, feature caches filled
    prepare_cpu = time.process_time() - prepare_cpu
    val_tensor = torch.from_numpy(np.ascontiguousarray(val_images, dtype=np.float32)).to(device)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    started, cpu_started = time.perf_counter(), time.process_time()
    deadlines = _stage_deadlines(recipe.stages, train, cpu_started, recipe.budget_shares())
    for stage_index, stage in enumerate(recipe.stages):
        if stage_index < start_stage:
            continue
        recipe.begin_stage(stage)
        epochs = _epochs_for(stage, train)
        final_stage = stage_index == len(recipe.stages) - 1
        first = start_epoch if stage_index == start_stage else 0
        for epoch in range(first, epochs):
            detector.train()
            order = torch.randperm(len(data), generator=generator)
            batches = [order[i:i + train.batch_size] for i in range(0, len(order), train.batch_size)]
            if len(batches) > 1 and len(batches[-1]) < 2:  # batch norm can't train on one image
                batches = batches[:-1]
            losses: dict[str, list[float]] = {}
            bar = tqdm(batches, desc=f"{model} {stage} {epoch + 1}/{epochs}", disable=not progress, leave=False)
            for idx in bar:
                batch = data[idx]
                recipe.batch_indices = None if train.augment else idx
                if train.augment:
                    batch = augment(batch, generator)
                for key, value in recipe.step(batch.to(device), stage).items():
                    losses.setdefault(key, []).append(value)
                bar.set_postfix({k: f"{v[-1]:.4g}" for k, v in losses.items()})
            record: dict[str, Any] = {"stage": stage, "epoch": epoch,
                                      **{k: float(np.mean(v)) for k, v in losses.items()}}
            if final_stage:
                recipe.validate(val_tensor)
                record["val_proxy_auroc"] = proxy_auroc(detector, val_images, seed=train.seed, kind=train.proxy)
                objective = record["val_proxy_auroc"]
                if np.isfinite(objective) and (best is None or objective > best[0]):
                    best = (objective, copy.deepcopy({k: v.detach().cpu() for k, v in detector.state_dict().items()}))
            history.append(record)
            if progress:
                tqdm.write(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()}))
            save_resume(out / RESUME, {"model": detector.state_dict(),
                                       "optimizers": {k: o.state_dict() for k, o in recipe.optimizers().items()},
                                       "stage": stage_index, "epoch": epoch})
            (out / HISTORY).write_text(json.dumps(history, indent=1) + "\n")
            if time.process_time() > deadlines[stage_index]:
                break  # out of budget: keep the best epoch so far

    (out / HISTORY).write_text(json.dumps(history, indent=1) + "\n")  # also when no epoch ran (memory banks)
    if best is not None:
        detector.load_state_dict(best[1])
    chosen = recipe.finish(val_tensor, lambda: proxy_auroc(detector, val_images, seed=train.seed, kind=train.proxy))
    calibration = calibrate_detector(detector, val_images)
    run_meta = {
        "train": {**vars(train), "device": str(device), "seconds": round(time.perf_counter() - started, 1),
                  "cpu_seconds": round(time.process_time() - cpu_started, 1),
                  "prepare_cpu_seconds": round(prepare_cpu, 1),
                  "best_val_proxy_auroc": None if best is None else best[0],
                  **({"chosen_after_training": chosen} if chosen else {})},
        "edgead_version": __version__, "torch_version": torch.__version__, "host": platform.node(),
        **(meta or {}),
    }
    return save_run(out, detector, run_meta, calibration)


def calibrate_detector(detector: Detector, val_images: np.ndarray, sigma: float = DEFAULT_SIGMA) -> Calibration:
    """Thresholds from the validation images' scores and maps, smoothed with ``sigma`` as the
    runtime will smooth them (the sigma is stored in the calibration)."""
    scores, maps = predict_smoothed(detector, val_images, sigma)
    return calibrate(scores, maps, sigma=sigma)


def train_run(model: str, source: DataSource, out: str | Path, *, image_size: int = 128,
              channels: int = 3, val_fraction: float = 0.15, skip_bad: bool = False,
              config: dict[str, Any] | None = None, train: TrainConfig | None = None,
              resume: bool = False, progress: bool = True) -> Path:
    """Train on the normal images of ``source`` (MVTec category or Folder layout), holding out a
    validation split; the source and the split are recorded in the run."""
    from edgead.data.datasets import load_arrays, split_train_val

    train = train or TrainConfig()
    fit, val = split_train_val(source.normal(), val_fraction=val_fraction, seed=train.seed)
    train_images, _, fit = load_arrays(fit, image_size, channels, skip_bad=skip_bad)
    val_images, _, val = load_arrays(val, image_size, channels, skip_bad=skip_bad)
    meta = {"data": {**source.to_dict(), "n_train": len(fit), "n_val": len(val), "val_fraction": val_fraction,
                     "val_files": [s.path.name for s in val]}}
    config = {**(config or {}), "image_size": image_size, "channels": channels}
    return train_from_arrays(model, train_images, val_images, out, config=config, train=train,
                             meta=meta, resume=resume, progress=progress)
