"""The validation proxies that pick the epoch a training run keeps (edgead.training.proxies)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgead.models.base import TrainConfig
from edgead.training.proxies import PROXIES, mean_auroc, proxy_images
from edgead.training.trainer import train_from_arrays


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    base = torch.from_numpy(np.random.default_rng(seed).random((n, 3, size // 4, size // 4)).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear").numpy()


def test_each_proxy_is_deterministic_and_changes_every_image():
    val = _images(5)
    for kind, count in zip(PROXIES, (1, 2)):
        sets = proxy_images(val, kind, seed=4)
        again = proxy_images(val, kind, seed=4)
        assert len(sets) == count
        for s, t in zip(sets, again):
            assert s.shape == val.shape and np.array_equal(s, t)
            assert all(not np.array_equal(a, b) for a, b in zip(s, val))
    with pytest.raises(ValueError, match="unknown selection proxy"):
        proxy_images(val, "scratches", 0)


def test_mean_auroc_averages_the_sets_and_refuses_non_finite_scores():
    normal = np.array([0.1, 0.2, 0.3])
    assert mean_auroc(normal, [np.array([0.9, 1.0, 1.1]), np.array([0.0, 0.0, 0.0])]) == pytest.approx(0.5)
    assert np.isnan(mean_auroc(normal, [np.array([np.nan, 1.0, 1.0])]))


def test_a_run_selected_on_cutpaste_and_lines_records_it(tmp_path):
    train = TrainConfig(epochs=2, batch_size=3, proxy="cutpaste+lines")
    run = train_from_arrays("rd", _images(6), _images(4, seed=1), tmp_path / "run", config={"width": 4},
                            train=train, progress=False)
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 2 and all(0.0 <= r["val_proxy_auroc"] <= 1.0 for r in history)
    assert json.loads((run / "config.json").read_text())["train"]["proxy"] == "cutpaste+lines"
