"""The validation proxies the PatchCore and SimpleNet studies choose on: they change the image
only inside their mask, and the thin-line proxy is thin."""

from __future__ import annotations

import numpy as np

from benchmarks.patchcore_study import LINE_COPIES, _proxies, lines_with_masks


def _images(n: int = 6, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.2, 0.8, (n, 3, size, size)).astype(np.float32)


def test_lines_change_only_a_thin_masked_line():
    images = _images()
    out, masks = lines_with_masks(images, seed=3)
    changed = np.abs(out - images).max(axis=1) > 0
    assert changed.any(axis=(1, 2)).all()  # every copy carries a line
    assert not (changed & (masks == 0)).any()  # nothing outside the mask moves
    shift = np.abs(out - images).max(axis=1)[masks == 1]
    assert shift.max() <= 64 / 255 + 1e-6
    area = masks.reshape(len(masks), -1).sum(1)
    assert (area >= 128 / 8 * 0.5).all() and (area <= 128 / 2 * 2 * 1.5 + 8).all()  # 1-2 px wide, 1/8-1/2 long


def test_proxies_include_line_copies_only_when_asked():
    val = _images(4)
    assert set(_proxies(val, 0, lines=False)) == {"cutpaste", "scar"}
    with_lines = _proxies(val, 0, lines=True)
    assert len(with_lines["line"][0]) == LINE_COPIES * len(val)
    for images, masks in with_lines.values():
        assert images.shape[1:] == val.shape[1:] and masks.shape == (len(images),) + val.shape[2:]


def test_image_aurocs_per_proxy_kind_and_over_all():
    from benchmarks.patchcore_study import RULES, _image_aurocs, image_aurocs

    good, bad = np.array([0.0, 1.0]), {"a": np.array([2.0, 3.0]), "b": np.array([0.5, -1.0])}
    assert image_aurocs(good, bad) == {"a": 1.0, "b": 0.25, "all": 0.625}
    scores = {rule: np.r_[good, bad["a"], bad["b"]] for rule in RULES}
    scores["max"] = -scores["max"]  # another rule, ranked the other way
    row = _image_aurocs(scores, {"a": 2, "b": 2}, n_val=2)
    assert row["proxy_image_auroc_a"] == 1.0 and row["proxy_image_auroc_b"] == 0.25  # the graph's rule
    assert row["proxy_image_auroc_reweighted"] == 0.625 and row["proxy_image_auroc_max"] == 0.375


def test_chunked_scoring_equals_scoring_all_images_at_once():
    """The study scores in chunks (at input x2 all images at once ran out of memory): same scores, maps."""
    import torch

    from benchmarks.patch_tap_study import _Cached
    from benchmarks.patchcore_study import TAPS, _scores
    from edgead.models.patchcore import PatchCore, PatchCoreConfig, build_bank

    torch.manual_seed(0)
    taps = {"relu3_4": torch.rand(13, 256, 8, 8), "relu4_4": torch.rand(13, 512, 4, 4)}
    det = PatchCore(PatchCoreConfig(image_size=32, taps=TAPS, vgg_weights="random", coreset_ratio=0.2)).eval()
    det.encoder = _Cached(taps, TAPS)
    with torch.no_grad():
        bank, _ = build_bank(det, torch.arange(5))
        det.set_bank(bank)
        whole = _scores(det, [taps], [13], chunk=13)
        chunked = _scores(det, [taps], [13], chunk=4)
    for rule in whole[0]:
        np.testing.assert_allclose(chunked[0][rule], whole[0][rule], rtol=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-6, atol=1e-7)
    assert whole[1].shape == (13, 32, 32)


def test_pixel_tap_holds_each_cells_raw_patch_on_the_taps_grid_and_weight():
    import torch

    from benchmarks.patchcore_study import PIXELS, _with_pixels

    images = [_images(3, 32), _images(2, 32)]
    taps = [{"relu3_4": torch.rand(3, 5, 8, 8) + 0.1}, {"relu3_4": torch.rand(2, 5, 8, 8)}]
    train, (evaluated,) = _with_pixels(taps[0], taps[1:], images, ("relu3_4",), weight=0.25)
    assert train[PIXELS].shape == (3, 3 * 8 * 8, 8, 8)  # 8x8 pixels per cell of the stride-4 grid
    # cell (2, 3) is the 8x8 window at rows 2*4-2.., cols 3*4-2..; up to the tap's scale
    cell = evaluated[PIXELS][1, :, 2, 3].view(3, 8, 8)
    window = torch.from_numpy(images[1][1, :, 6:14, 10:18])
    ratio = cell / window
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
    norm = lambda t: float(t.pow(2).sum(1).sqrt().mean())  # noqa: E731
    assert abs(norm(train["relu3_4"]) - 1) < 1e-5 and abs(norm(train[PIXELS]) - 0.25) < 1e-5


def test_trained_study_scores_the_final_stage_and_records_every_stages_losses(tmp_path):
    from benchmarks.distilled_study import study_variant

    val = _images(4, size=32)
    data = {"train": _images(6, size=32), "val": val}
    config = {"width": 4, "max_width": 8, "descriptor_dim": 8, "n_textures": 4, "patch_sizes": (17,),
              "vgg_weights": None, "student_crop": 24}
    row = study_variant(data, _proxies(val, 0, lines=True), "toy", "tiny", budget_s=1.0, seed=0, work=tmp_path,
                        proxy="cutpaste", model="students", config=config)
    assert row["model"] == "students" and row["student_crop"] == 24
    teacher_epochs = len(row["distill_loss"])
    assert teacher_epochs >= 1 and len(row["regression_loss"]) == row["epochs"] - teacher_epochs >= 1
    assert row["kept_epoch"] >= teacher_epochs  # only the students' epochs are scored
    for key in ("proxy_pixel_auroc", "proxy_image_auroc_reweighted", "proxy_image_auroc_line"):
        assert 0.0 <= row[key] <= 1.0


def test_pose_probe_shift_translates_and_repeats_the_border():
    from benchmarks.pyramidflow_pose_probe import _shifted

    images = np.arange(2 * 3 * 6 * 7, dtype=np.float32).reshape(2, 3, 6, 7)
    moved = _shifted(images, 2)
    assert moved.shape == images.shape
    np.testing.assert_array_equal(moved[:, :, 2:, 2:], images[:, :, :-2, :-2])  # content moved right and down
    np.testing.assert_array_equal(moved[:, :, 0, 2:], images[:, :, 0, :-2])  # top rows repeat the first row
    np.testing.assert_array_equal(moved[:, :, 2:, 0], images[:, :, :-2, 0])  # left columns repeat the first column


def test_study_aggregations_score_the_same_maps_by_each_rule():
    from benchmarks.distilled_study import AGGREGATIONS, aggregation_aurocs

    rng = np.random.default_rng(0)
    good_maps = rng.random((6, 16, 16)).astype(np.float32) * 0.1
    good_maps[:, 0, 0] = 1.0  # one hot pixel in every map, good or not: the maximum cannot tell them apart
    blob = good_maps.copy()
    blob[:, 4:8, 4:8] += 0.5  # 16 raised pixels below the hot one: every top-k mean sees them
    row = aggregation_aurocs((np.zeros(6), good_maps, good_maps), {"blob": (np.zeros(6), blob, blob)})
    assert set(row) == {f"proxy_image_auroc_{name}" for name in AGGREGATIONS}
    assert row["proxy_image_auroc_max_raw"] == row["proxy_image_auroc_max_smoothed"] == 0.5
    assert row["proxy_image_auroc_top1_raw"] == row["proxy_image_auroc_top5_raw"] == 1.0
    top1 = AGGREGATIONS["top1_raw"](good_maps, good_maps)
    np.testing.assert_allclose(top1, np.sort(good_maps.reshape(6, -1), axis=1)[:, -3:].mean(axis=1))  # 1% of 256: 3
