"""Where a run's images come from: an MVTec AD category or an anomalib-style Folder layout.

    DataSource.mvtec(root, category)
    DataSource.folder(normal_dir, abnormal_dir=None, mask_dir=None, normal_test_dir=None)

``normal()`` gives the normal images training may use (the trainer holds out its validation
split from them); ``test()`` the labelled test images. A Folder layout without a normal test
folder keeps ``FOLDER_NORMAL_TEST_FRACTION`` of its normal images for the test set, as anomalib's
Folder does, chosen by a seeded split of the paths, so training never sees them. The source is
recorded in the run (``to_dict``), so evaluation and export find the same images again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgead.data.datasets import DatasetError, Sample, folder_samples, mvtec_samples, split_train_val

FOLDER_NORMAL_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DataSource:
    layout: str  # "mvtec" | "folder"
    root: str | None = None
    category: str | None = None
    normal_dir: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    normal_test_dir: str | None = None
    seed: int = 0

    @classmethod
    def mvtec(cls, root: str | Path, category: str) -> "DataSource":
        return cls("mvtec", root=str(Path(root).resolve()), category=category)

    @classmethod
    def folder(cls, normal_dir: str | Path, abnormal_dir: str | Path | None = None, mask_dir: str | Path | None = None,
               normal_test_dir: str | Path | None = None, seed: int = 0) -> "DataSource":
        def resolved(p: str | Path | None) -> str | None:
            return None if p is None else str(Path(p).resolve())

        return cls("folder", normal_dir=resolved(normal_dir), abnormal_dir=resolved(abnormal_dir),
                   mask_dir=resolved(mask_dir), normal_test_dir=resolved(normal_test_dir), seed=seed)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataSource":
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
        if known.get("layout") not in ("mvtec", "folder"):
            raise DatasetError(f"unknown data layout {known.get('layout')!r} (expected mvtec or folder)")
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def name(self) -> str:
        return self.category if self.layout == "mvtec" else Path(self.normal_dir or "folder").name

    def describe(self) -> str:
        if self.layout == "mvtec":
            return f"{self.root}/{self.category}"
        return f"folder {self.normal_dir}" + (f" + {self.abnormal_dir}" if self.abnormal_dir else "")

    def _folder_split(self) -> tuple[list[Sample], list[Sample]]:
        normal = folder_samples(self.normal_dir)  # type: ignore[arg-type]
        if self.normal_test_dir is not None:
            return normal, folder_samples(self.normal_test_dir)
        return split_train_val(normal, val_fraction=FOLDER_NORMAL_TEST_FRACTION, seed=self.seed + 1, min_val=1)

    def normal(self) -> list[Sample]:
        """Normal images for training and its validation split."""
        if self.layout == "mvtec":
            return mvtec_samples(self.root, self.category, "train")  # type: ignore[arg-type]
        return self._folder_split()[0]

    def test(self) -> list[Sample]:
        """Labelled test images: normal ones first, then anomalous ones (with masks if given)."""
        if self.layout == "mvtec":
            return mvtec_samples(self.root, self.category, "test")  # type: ignore[arg-type]
        normal_test = self._folder_split()[1]
        if self.abnormal_dir is None:
            raise DatasetError(f"{self.describe()}: no abnormal folder, so there is nothing to test against "
                               "(give --abnormal-dir)")
        abnormal = [s for s in folder_samples(self.normal_dir, self.abnormal_dir, self.mask_dir)  # type: ignore[arg-type]
                    if s.label != 0]
        return normal_test + abnormal
