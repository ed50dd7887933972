"""Tests for the procedural synthetic inspection data set (edgead.data.synth)."""
from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pytest

from edgead.data.synth import (CATEGORIES, DEFECTS, Conveyor, SynthSpec, add_defect, generate,
                               render_normal, sample)

TINY = SynthSpec(image_size=32, n_train=2, n_test_good=2, n_test_per_defect=2, seed=3)


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> pathlib.Path:
    return generate(tmp_path_factory.mktemp("a"), spec=TINY)


def _pairs(size: int, per_defect: int):
    """(category, defect, clean image, defective image, mask) over every category/defect."""
    for c, cat in enumerate(CATEGORIES):
        for d, defect in enumerate(DEFECTS[cat]):
            for i in range(per_defect):
                rng = np.random.default_rng([11, c, d, i])
                clean = render_normal(cat, rng, size)
                bad, mask = add_defect(clean, cat, defect, rng)
                yield cat, defect, clean, bad, mask


def test_catalogue_meets_the_brief():
    kinds = list(CATEGORIES.values())
    assert kinds.count("texture") >= 3 and kinds.count("object") >= 2
    assert set(DEFECTS) == set(CATEGORIES)
    assert all(len(d) >= 3 for d in DEFECTS.values())
    every = {d for ds in DEFECTS.values() for d in ds}
    assert {"scratch", "hole", "stain", "crack", "particle", "missing", "extra"} <= every


def test_generate_is_byte_deterministic(tiny_set, tmp_path):
    again = generate(tmp_path / "b", spec=TINY)
    assert _files(tiny_set) == _files(again)
    other = _files(generate(tmp_path / "c", categories=["metal", "pcb"],
                            spec=SynthSpec(32, 2, 2, 2, seed=4)))
    same_names = {k: v for k, v in _files(tiny_set).items() if k in other}
    assert same_names.keys() == other.keys()
    assert sum(same_names[k] != other[k] for k in other) > len(other) // 2


def test_subset_and_sample_match_full_generation(tiny_set, tmp_path):
    part = _files(generate(tmp_path / "w", categories=["wood"], spec=TINY))
    full = _files(tiny_set)
    assert part == {k: v for k, v in full.items() if k.startswith("wood/")}
    image, mask = sample("washer", 1, size=32, seed=3, defect="missing", stream="test")
    on_disk = cv2.imread(str(tiny_set / "washer/test/missing/001.png"), cv2.IMREAD_UNCHANGED)
    gt = cv2.imread(str(tiny_set / "washer/ground_truth/missing/001_mask.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(image, on_disk) and np.array_equal(mask, gt)


def test_layout_is_mvtec(tiny_set):
    expected = set()
    for cat in CATEGORIES:
        for i in range(2):
            expected |= {f"{cat}/train/good/{i:03d}.png", f"{cat}/test/good/{i:03d}.png"}
            for d in DEFECTS[cat]:
                expected |= {f"{cat}/test/{d}/{i:03d}.png", f"{cat}/ground_truth/{d}/{i:03d}_mask.png"}
    assert set(_files(tiny_set)) == expected
    for png in tiny_set.rglob("*.png"):
        arr = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        if png.parent.parent.name == "ground_truth":
            assert arr.shape == (32, 32) and arr.dtype == np.uint8
            assert set(np.unique(arr)) == {0, 255}, png
        else:
            assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_defect_sizes_span_small_to_large():
    fractions = [(m > 0).mean() for *_, m in _pairs(64, 3)]
    assert min(fractions) < 0.02 and max(fractions) > 0.05


def test_masks_cover_a_visible_change_and_some_are_subtle():
    changes = []
    for cat, defect, clean, bad, mask in _pairs(64, 3):
        inside = mask > 0
        diff = np.abs(bad.astype(np.int16) - clean).mean(axis=2)
        assert diff[inside].mean() > 0, (cat, defect)
        assert not diff[~inside].any(), (cat, defect)  # nothing changes outside the mask
        changes.append(diff[inside].mean())
    changes = np.array(changes)
    assert (changes < 25).mean() > 0.1  # subtle: low-contrast or texture-only
    assert (changes > 40).mean() > 0.3  # and plenty of obvious ones


def test_add_defect_does_not_mutate_input():
    rng = np.random.default_rng(0)
    clean = render_normal("pcb", rng, 48)
    before = clean.copy()
    add_defect(clean, "pcb", "missing", rng)
    assert np.array_equal(clean, before)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_normal_images_vary(category):
    a, _ = sample(category, 0, size=64)
    b, _ = sample(category, 1, size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(np.int16) - b).mean() > 2


def test_brightness_threshold_cannot_separate_good_from_defective():
    spec = dict(size=64, seed=0, stream="test")
    for cat in CATEGORIES:
        good = [sample(cat, i, **spec)[0].mean() for i in range(8)]
        bad = [sample(cat, i, defect=d, **spec)[0].mean() for d in DEFECTS[cat] for i in range(3)]
        inside = np.mean([min(good) <= v <= max(good) for v in bad])
        assert inside >= 0.5, (cat, inside)


def test_conveyor_is_deterministic_and_respects_defect_rate():
    belt = Conveyor("fabric", size=32, seed=5, defect_rate=0.3)
    items = [item for _, item in zip(range(5), belt)]
    again = Conveyor("fabric", size=32, seed=5, defect_rate=0.3)
    for i, (img, mask, defect) in enumerate(items):
        img2, mask2, defect2 = again[i]
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2) and defect == defect2
        assert mask.any() == (defect is not None)
    rate = np.mean([belt.defect_at(i) is not None for i in range(400)])
    assert 0.2 < rate < 0.4
    assert all(Conveyor("metal", 32, defect_rate=0.0).defect_at(i) is None for i in range(50))
    img, mask, defect = Conveyor("metal", 32, defect_rate=1.0)[7]
    assert defect in DEFECTS["metal"] and mask.any()


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        sample("marble", 0)
    with pytest.raises(ValueError):
        sample("fabric", 0, defect="missing")
    with pytest.raises(ValueError):
        SynthSpec(image_size=4)


def test_add_defect_accepts_non_square_images():
    rng = np.random.default_rng(1)
    clean = np.ascontiguousarray(render_normal("washer", rng, 64)[:, :48])
    for defect in DEFECTS["washer"]:
        bad, mask = add_defect(clean, "washer", defect, rng)
        assert bad.shape == clean.shape and mask.shape == clean.shape[:2] and mask.any()
