"""Image loading, dataset layouts, the held-out split and array loading (tiny images, fast)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.data.datasets import (
    BadImageWarning,
    DatasetError,
    Sample,
    folder_samples,
    load_arrays,
    mvtec_samples,
    split_train_val,
)
from edgead.data.images import (
    RESIZE_RULE,
    ImageError,
    load_image,
    load_mask,
    read_image,
    to_model_input,
)


# ------------------------------------------------------------------ helpers
def write(path: Path, image: np.ndarray) -> Path:
    """Write with imencode + tofile so non-ASCII paths work too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(path.suffix, image)
    assert ok
    buf.tofile(path)
    return path


def gray(h: int = 8, w: int = 8, value: int = 128) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def bgr(h: int = 8, w: int = 8, colour: tuple[int, int, int] = (10, 20, 30)) -> np.ndarray:
    return np.full((h, w, 3), colour, np.uint8)


def name(path: Path) -> str:
    return re.escape(path.name)


def make_mvtec(root: Path, category: str = "bottle", size: int = 8) -> Path:
    cat = root / category
    for i in range(3):
        write(cat / "train" / "good" / f"{i:03d}.png", bgr(size, size))
    write(cat / "test" / "good" / "000.png", bgr(size, size))
    for defect in ("crack", "broken"):
        for i in range(2):
            write(cat / "test" / defect / f"{i:03d}.png", bgr(size, size))
            mask = np.zeros((size, size), np.uint8)
            mask[2:4, 2:4] = 255
            write(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root


# ------------------------------------------------------------------ read_image errors
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=f"{name(path)}: no such file"):
        read_image(path)
    with pytest.raises(ImageError, match=name(path)):
        load_image(path, 8, 3)


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(ImageError, match=name(path)):
        read_image(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageError, match=name(path)):
        load_image(path, 8, 1)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "folder.png"
    path.mkdir()
    with pytest.raises(ImageError, match=name(path)):
        read_image(path)


def test_read_keeps_stored_dtype_and_channels(tmp_path: Path) -> None:
    assert read_image(write(tmp_path / "g.png", gray())).shape == (8, 8)
    assert read_image(write(tmp_path / "c.png", bgr())).shape == (8, 8, 3)
    g16 = read_image(write(tmp_path / "g16.png", np.full((4, 4), 40000, np.uint16)))
    assert g16.dtype == np.uint16 and g16[0, 0] == 40000


def test_non_ascii_path(tmp_path: Path) -> None:
    path = write(tmp_path / "dossier_é" / "图像_ü.png", bgr(colour=(255, 0, 0)))
    x = load_image(path, 8, 3)
    assert x.shape == (3, 8, 8)
    np.testing.assert_allclose(x[:, 0, 0], [0.0, 0.0, 1.0])


# ------------------------------------------------------------------ conversions
def test_gray_8bit() -> None:
    x = to_model_input(gray(value=255), 8, 1)
    assert x.dtype == np.float32 and x.shape == (1, 8, 8)
    assert np.all(x == 1.0)
    x3 = to_model_input(gray(value=51), 8, 3)  # replicated to 3 channels
    assert x3.shape == (3, 8, 8)
    np.testing.assert_allclose(x3, 0.2, atol=1e-6)


def test_gray_16bit(tmp_path: Path) -> None:
    image = np.zeros((4, 4), np.uint16)
    image[0, 0] = 65535
    x = load_image(write(tmp_path / "g16.png", image), 4, 1)
    assert x[0, 0, 0] == 1.0 and x[0, 1, 1] == 0.0


def test_bgr_to_rgb_order() -> None:
    x = to_model_input(bgr(colour=(255, 0, 0)), 8, 3)  # pure blue in OpenCV's BGR
    np.testing.assert_array_equal(x[:, 3, 3], [0.0, 0.0, 1.0])
    y = to_model_input(bgr(colour=(255, 0, 0)), 8, 3, bgr=False)  # already RGB: red
    np.testing.assert_array_equal(y[:, 3, 3], [1.0, 0.0, 0.0])


def test_rgb_to_gray_uses_bgr2gray() -> None:
    image = bgr(colour=(200, 100, 50))
    expected = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[0, 0] / 255.0
    np.testing.assert_allclose(to_model_input(image, 8, 1)[0], expected, atol=1e-6)


def test_rgba_drops_alpha_over_black(tmp_path: Path) -> None:
    image = np.zeros((4, 4, 4), np.uint8)
    image[..., :3] = (255, 0, 0)  # blue
    image[..., 3] = 255
    image[0, 0, 3] = 0  # one transparent pixel
    x = load_image(write(tmp_path / "rgba.png", image), 4, 3)
    assert x.shape == (3, 4, 4)
    np.testing.assert_array_equal(x[:, 1, 1], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(x[:, 0, 0], [0.0, 0.0, 0.0])
    opaque = image.copy()
    opaque[..., 3] = 255
    expected = to_model_input(opaque[..., :3], 4, 3)
    np.testing.assert_array_equal(to_model_input(opaque, 4, 3), expected)


def test_float_input() -> None:
    image = np.full((6, 6, 3), 0.5, np.float64)
    np.testing.assert_allclose(to_model_input(image, 4, 3), 0.5, atol=1e-6)
    np.testing.assert_allclose(to_model_input(image.astype(np.float16), 4, 1), 0.5, atol=1e-3)


@pytest.mark.parametrize("hw", [(300, 200), (5, 7), (64, 64), (40, 10)])
def test_resized_to_target(hw: tuple[int, int]) -> None:
    x = to_model_input(bgr(*hw, colour=(0, 128, 255)), 32, 3)
    assert x.shape == (3, 32, 32)
    np.testing.assert_allclose(x[:, 5, 5], [1.0, 128 / 255, 0.0], atol=1e-6)


def test_resize_rule_area_down_linear_up() -> None:
    assert RESIZE_RULE == "area-down-linear-up"
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    area = cv2.resize(big, (16, 16), interpolation=cv2.INTER_AREA) / np.float32(255)
    np.testing.assert_allclose(to_model_input(big, 16, 1)[0], area, atol=1e-6)
    small = rng.integers(0, 256, (5, 5), dtype=np.uint8)
    linear = cv2.resize(small, (16, 16), interpolation=cv2.INTER_LINEAR) / np.float32(255)
    np.testing.assert_allclose(to_model_input(small, 16, 1)[0], linear, atol=1e-6)


def test_out_written_in_place() -> None:
    out = np.full((3, 8, 8), -1.0, np.float32)
    result = to_model_input(bgr(16, 16, colour=(0, 0, 255)), 8, 3, out=out)
    assert result is out
    np.testing.assert_array_equal(out[:, 0, 0], [1.0, 0.0, 0.0])
    batch = np.zeros((2, 1, 8, 8), np.float32)
    to_model_input(gray(value=255), 8, 1, out=batch[1])  # a slot of a batch buffer
    assert np.all(batch[1] == 1.0) and np.all(batch[0] == 0.0)
    with pytest.raises(ValueError, match="out"):
        to_model_input(gray(), 8, 3, out=np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        to_model_input(gray(), 8, 1, out=np.zeros((1, 8, 8), np.float64))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="channels"):
        to_model_input(gray(), 8, 2)
    with pytest.raises(ValueError, match="dtype"):
        to_model_input(np.zeros((4, 4), np.int32), 8, 1)


def test_module_does_not_import_torch() -> None:
    code = (
        "import sys, edgead.data.images, edgead.data.datasets; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    assert result.returncode == 0


# ------------------------------------------------------------------ masks
def test_load_mask_binary_nearest(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[:8, :8] = 1  # any value > 0 is defect
    m = load_mask(write(tmp_path / "m.png", mask), 4)
    assert m.dtype == np.float32 and m.shape == (4, 4)
    assert set(np.unique(m)) == {0.0, 1.0}
    assert m[:2, :2].all() and not m[2:, 2:].any()


def test_mask_wrong_size(tmp_path: Path) -> None:
    path = write(tmp_path / "m_mask.png", np.zeros((8, 9), np.uint8))
    with pytest.raises(ImageError, match=name(path)) as info:
        load_mask(path, 4, expect_hw=(8, 8), image_path=tmp_path / "img.png")
    assert "img.png" in str(info.value) and "8x9" in str(info.value)


def test_missing_mask_file(tmp_path: Path) -> None:
    path = tmp_path / "absent_mask.png"
    with pytest.raises(ImageError, match=name(path)):
        load_mask(path, 4)


# ------------------------------------------------------------------ MVTec AD
def test_mvtec_train_and_test(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    train = mvtec_samples(root, "bottle", "train")
    assert [s.path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train)

    test = mvtec_samples(root, "bottle", "test")
    assert [(s.defect, s.label, s.path.name) for s in test] == [
        ("broken", 1, "000.png"),
        ("broken", 1, "001.png"),
        ("crack", 1, "000.png"),
        ("crack", 1, "001.png"),
        ("good", 0, "000.png"),
    ]
    crack0 = test[2]
    assert crack0.mask_path == root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    assert test == mvtec_samples(root, "bottle", "test")  # deterministic


def test_mvtec_missing_category_lists_available(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    make_mvtec(tmp_path, "cable")
    with pytest.raises(DatasetError, match="carpet") as info:
        mvtec_samples(root, "carpet", "train")
    assert "bottle, cable" in str(info.value)


def test_mvtec_missing_split(tmp_path: Path) -> None:
    root = tmp_path
    write(root / "bottle" / "train" / "good" / "000.png", gray())
    with pytest.raises(DatasetError, match="test") as info:
        mvtec_samples(root, "bottle", "test")
    assert "bottle" in str(info.value)


def test_mvtec_empty_folder(tmp_path: Path) -> None:
    good = tmp_path / "bottle" / "train" / "good"
    good.mkdir(parents=True)
    (good / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=re.escape(str(good))):
        mvtec_samples(tmp_path, "bottle", "train")


def test_mvtec_missing_mask(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    mask = root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    with pytest.raises(DatasetError, match=re.escape(str(mask))) as info:
        mvtec_samples(root, "bottle", "test")
    assert str(root / "bottle" / "test" / "crack" / "001.png") in str(info.value)


# ------------------------------------------------------------------ Folder
def make_folder(root: Path) -> tuple[Path, Path, Path]:
    normal, abnormal, masks = root / "normal", root / "abnormal", root / "masks"
    for i in range(3):
        write(normal / f"n{i}.png", gray())
    write(abnormal / "a0.png", gray())
    write(abnormal / "a1.jpg", gray())
    write(masks / "a0.png", gray(value=0))
    write(masks / "a1_mask.png", gray(value=255))
    return normal, abnormal, masks


def test_folder_layout(tmp_path: Path) -> None:
    normal, abnormal, masks = make_folder(tmp_path)
    samples = folder_samples(normal, abnormal, masks)
    assert [(s.path.name, s.label, s.defect) for s in samples] == [
        ("n0.png", 0, "good"),
        ("n1.png", 0, "good"),
        ("n2.png", 0, "good"),
        ("a0.png", 1, "abnormal"),
        ("a1.jpg", 1, "abnormal"),
    ]
    assert samples[3].mask_path == masks / "a0.png"
    assert samples[4].mask_path == masks / "a1_mask.png"
    assert all(s.mask_path is None for s in folder_samples(normal, abnormal))
    assert len(folder_samples(normal)) == 3


def test_folder_mask_matching_no_image(tmp_path: Path) -> None:
    normal, abnormal, masks = make_folder(tmp_path)
    orphan = write(masks / "zz_mask.png", gray())
    with pytest.raises(DatasetError, match=name(orphan)):
        folder_samples(normal, abnormal, masks)


def test_folder_abnormal_without_mask(tmp_path: Path) -> None:
    normal, abnormal, masks = make_folder(tmp_path)
    image = write(abnormal / "a2.png", gray())
    with pytest.raises(DatasetError, match=name(image)):
        folder_samples(normal, abnormal, masks)


def test_folder_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty_normal"
    empty.mkdir()
    with pytest.raises(DatasetError, match=name(empty)):
        folder_samples(empty)
    with pytest.raises(DatasetError, match="missing_dir"):
        folder_samples(tmp_path / "missing_dir")


# ------------------------------------------------------------------ split
def normals(n: int) -> list[Sample]:
    return [Sample(Path(f"/data/{i:03d}.png"), 0, "good", None) for i in range(n)]


def test_split_deterministic_disjoint_held_out() -> None:
    samples = normals(40)
    train, val = split_train_val(samples, val_fraction=0.2, seed=3)
    assert len(val) == 8 and len(train) == 32
    assert not {s.path for s in train} & {s.path for s in val}  # held out of training
    assert {s.path for s in train} | {s.path for s in val} == {s.path for s in samples}
    assert (train, val) == split_train_val(list(reversed(samples)), val_fraction=0.2, seed=3)
    assert split_train_val(samples, val_fraction=0.2, seed=4)[1] != val


def test_split_min_val_and_too_few() -> None:
    train, val = split_train_val(normals(10), val_fraction=0.1, min_val=4)
    assert len(val) == 4 and len(train) == 6
    with pytest.raises(DatasetError, match="too few"):
        split_train_val(normals(4), min_val=4)


def test_split_refuses_anomalous() -> None:
    bad = Sample(Path("/data/defect_007.png"), 1, "crack", Path("/data/defect_007_mask.png"))
    with pytest.raises(DatasetError, match="defect_007.png"):
        split_train_val(normals(10) + [bad])


# ------------------------------------------------------------------ load_arrays
def test_load_arrays_mvtec_with_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path, size=8)
    samples = mvtec_samples(root, "bottle", "test")
    images, masks, loaded = load_arrays(samples, 8, 3, with_masks=True)
    assert images.shape == (5, 3, 8, 8) and images.dtype == np.float32
    assert masks is not None and masks.shape == (5, 8, 8)
    assert loaded == samples
    np.testing.assert_allclose(images[0, :, 0, 0], [30 / 255, 20 / 255, 10 / 255], atol=1e-6)
    assert masks[0].sum() == 4 and masks[0, 2:4, 2:4].all()  # the 2x2 defect
    assert masks[4].sum() == 0  # the "good" test image gets a zero mask


def test_load_arrays_without_masks(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    images, masks, loaded = load_arrays(mvtec_samples(root, "bottle", "train"), 4, 1)
    assert images.shape == (3, 1, 4, 4) and masks is None and len(loaded) == 3


def test_load_arrays_mask_size_mismatch(tmp_path: Path) -> None:
    root = make_mvtec(tmp_path)
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    write(mask, np.zeros((8, 6), np.uint8))
    samples = mvtec_samples(root, "bottle", "test")
    with pytest.raises(ImageError, match=name(mask)) as info:
        load_arrays(samples, 8, 3, with_masks=True)
    assert str(root / "bottle" / "test" / "crack" / "000.png") in str(info.value)


def test_load_arrays_first_bad_file_raises(tmp_path: Path) -> None:
    normal, _, _ = make_folder(tmp_path)
    (normal / "n1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="n1.png"):
        load_arrays(folder_samples(normal), 8, 1)


def test_load_arrays_skip_bad_warns_and_skips(tmp_path: Path) -> None:
    normal, _, _ = make_folder(tmp_path)
    write(normal / "n0.png", gray(value=255))
    (normal / "n1.png").write_bytes(b"")
    write(normal / "n2.png", gray(value=0))
    with pytest.warns(BadImageWarning, match="n1.png"):
        images, _, loaded = load_arrays(folder_samples(normal), 8, 1, skip_bad=True)
    assert [s.path.name for s in loaded] == ["n0.png", "n2.png"]
    assert images.shape == (2, 1, 8, 8)
    assert np.all(images[0] == 1.0) and np.all(images[1] == 0.0)  # rows match samples


def test_load_arrays_all_bad_or_empty(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    with pytest.warns(BadImageWarning, match="bad.png"), pytest.raises(DatasetError):
        load_arrays([Sample(bad, 0, "good", None)], 8, 1, skip_bad=True)
    with pytest.raises(DatasetError):
        load_arrays([], 8, 1)


def test_load_arrays_with_masks_needs_mask_paths(tmp_path: Path) -> None:
    normal, abnormal, _ = make_folder(tmp_path)
    with pytest.raises(DatasetError, match="a0.png"):
        load_arrays(folder_samples(normal, abnormal), 8, 1, with_masks=True)
