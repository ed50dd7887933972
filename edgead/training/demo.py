"""Train the demo's detector: a small data set rendered on the fly, a short CPU-time budget.

The training step of ``edgead-run --demo`` (the whole build is :mod:`edgead.demo_build`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

N_TRAIN, N_VAL = 160, 40


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))  # honours taskset/cgroup pinning
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _images(category: str, size: int, stream: str, count: int, seed: int = 0) -> np.ndarray:
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample

    return np.stack([to_model_input(sample(category, i, size=size, seed=seed, stream=stream)[0], size, 3)
                     for i in range(count)])


def train_demo_run(out: Path, detector: str, config: dict[str, Any], category: str, size: int, epochs: int,
                   budget_s: float, seed: int = 0,
                   say: Callable[[str], Any] = print) -> tuple[Path, np.ndarray, int]:
    """Train ``detector`` on synthetic ``category`` parts; returns (run folder, validation
    images, epochs trained)."""
    from edgead.models.base import TrainConfig
    from edgead.training.trainer import train_from_arrays

    torch.set_num_threads(_cores())
    train = _images(category, size, "train", N_TRAIN, seed)
    val = _images(category, size, "val", N_VAL, seed)
    say(f"synthetic {category}: {len(train)} training + {len(val)} validation normal images at {size}px")
    run_dir = train_from_arrays(
        detector, train, val, out, config={**config, "image_size": size, "channels": 3},
        train=TrainConfig(epochs=epochs, batch_size=16, device="cpu", seed=seed, time_budget_s=budget_s),
        meta={"data": {"layout": "synthetic", "category": category, "image_size": size,
                       "n_train": len(train), "n_val": len(val), "seed": seed}},
        progress=False)
    history = json.loads((Path(run_dir) / "history.json").read_text())
    return Path(run_dir), val, len(history)
