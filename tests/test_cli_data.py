"""`edgead train` and `edgead eval` on an anomalib-style Folder layout, and the detector list."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.cli import main
from edgead.data.source import DataSource
from edgead.data.synth import DEFECTS, sample

SIZE = 32


def _folder_layout(root: Path) -> dict[str, Path]:
    dirs = {k: root / k for k in ("good", "bad", "masks")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for i in range(15):
        cv2.imwrite(str(dirs["good"] / f"part{i:02d}.png"), sample("washer", i, size=SIZE, stream="train")[0])
    for i, defect in enumerate(DEFECTS["washer"][:4]):
        image, mask = sample("washer", 100 + i, size=SIZE, defect=defect)
        cv2.imwrite(str(dirs["bad"] / f"ng{i}.png"), image)
        cv2.imwrite(str(dirs["masks"] / f"ng{i}_mask.png"), (mask > 0).astype(np.uint8) * 255)
    return dirs


def test_train_and_eval_on_a_folder_layout(tmp_path: Path, capsys) -> None:
    dirs = _folder_layout(tmp_path / "data")
    folder = ["--normal-dir", str(dirs["good"]), "--abnormal-dir", str(dirs["bad"]), "--mask-dir", str(dirs["masks"])]
    run = tmp_path / "run"
    assert main(["train", *folder, "--model", "ssim_ae", "--image-size", str(SIZE), "--epochs", "1",
                 "--set", "width=8", "latent_dim=8", "--out", str(run)]) == 0
    meta = json.loads((run / "config.json").read_text())
    assert meta["data"]["layout"] == "folder"
    source = DataSource.from_dict(meta["data"])
    test_normal = {s.path.name for s in source.test() if s.label == 0}
    trained_on = {s.path.name for s in source.normal()}
    assert test_normal and not (test_normal & trained_on)  # the normal test split is held out of training
    assert not (set(meta["data"]["val_files"]) & test_normal)
    capsys.readouterr()
    assert main(["eval", str(run), *folder, "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= report["image_auroc"] <= 1.0 and 0.0 <= report["pixel_auroc"] <= 1.0


def test_data_arguments_are_checked(tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path), "--model", "ssim_ae", "--out", str(tmp_path / "r")]) == 2
    assert "edgead train: error: --data" in (err := capsys.readouterr().err) and "needs --category" in err
    assert main(["train", "--data", str(tmp_path), "--normal-dir", str(tmp_path), "--model", "ssim_ae",
                 "--out", str(tmp_path / "r")]) == 2
    assert "not both" in capsys.readouterr().err


def test_train_help_lists_every_detector(capsys) -> None:
    from edgead.models import registry

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name, description in registry.describe():
        assert f"  {name}" in text and description in text
