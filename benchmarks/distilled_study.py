"""The distilled PatchCore's student, chosen on the normal validation split only.

    python -m benchmarks.distilled_study --categories fabric metal wood washer pcb \
        --variants w16_d64 --budget-s 300 --out results/distilled_study_w16_d64.json

Each variant (``VARIANTS``: the student's width, depth and descriptor size, the distillation
pool) is trained with ``edgead train``'s trainer under a CPU-time budget, then scored on the
validation images against the PatchCore study's proxies (CutPaste, CutPaste-scar and three
thin-line copies of each validation image, ``benchmarks.patchcore_study``). The graph's own score
and map are used: the student runs, the VGG-19 does not. No test image is read. The VGG-19
PatchCore's row on the same proxies is ``cut3_p1_equal`` in ``results/patchcore_study_lines.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

_STUDIED = {  # student widths, descriptor size (0: all 256 channels), pool; measured before the 2026-12-05 defaults
    "w32": {"student_width": 32, "student_max_width": 128, "descriptor_dim": 0},
    "w32_d64": {"student_width": 32, "student_max_width": 128, "descriptor_dim": 64},
    "w16": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 0},
    "w16_d64": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64},
    "w16_d128": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 128},
    "w16_d64_tail4": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64, "tail": 4},
    "w16m128_d64": {"student_width": 16, "student_max_width": 128, "descriptor_dim": 64},
    "w24_d64": {"student_width": 24, "student_max_width": 96, "descriptor_dim": 64},
    "w16_d64_anom4": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64, "anomaly_copies": 4},
    "w16_d64_strokes": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64,
                        "anomaly_copies": 2, "anomaly_shapes": ("perlin", "stroke")},
    "w16_d64_bf16": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64, "train_precision": "bf16"},
    "w32_d64_bf16": {"student_width": 32, "student_max_width": 128, "descriptor_dim": 64, "train_precision": "bf16"},
    "w16_d64_px8": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64, "pixel_patch": 8},
    "w16_d64_px8_d32": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64, "pixel_patch": 8,
                        "pixel_dim": 32},
    "w16_d64_px8_g05": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64, "pixel_patch": 8,
                        "tap_gains": (1.0, 0.5)},
    "w16_d64_normal_only": {"student_width": 16, "student_max_width": 64, "descriptor_dim": 64,
                            "anomaly_copies": 0, "n_textures": 0},
}
# Each studied variant keeps what it was measured with (no pixel tap unless named, the reweighted
# maximum); "defaults" is the detector's own configuration.
VARIANTS: dict[str, dict[str, Any]] = {
    **{name: {"pixel_patch": 0, "image_score": "reweighted", **v} for name, v in _STUDIED.items()},
    "defaults": {},
}


@torch.no_grad()
def graph_outputs(detector: torch.nn.Module, images: np.ndarray, chunk: int = 16,
                  raw: bool = False) -> tuple[np.ndarray, ...]:
    """(scores (N,), maps smoothed as the runtime does (N, H, W)[, the graph's raw maps]) of the detector's own graph."""
    from edgead.core.postprocess import DEFAULT_SIGMA, smooth

    parts = [detector(torch.from_numpy(images[i:i + chunk])) for i in range(0, len(images), chunk)]
    scores, maps = (torch.cat(p).numpy() for p in zip(*parts))
    return (scores, smooth(maps[:, 0], DEFAULT_SIGMA)) + ((maps[:, 0],) if raw else ())


def _top_mean(fraction: float, smoothed: bool) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def score(smoothed_maps: np.ndarray, raw_maps: np.ndarray) -> np.ndarray:
        flat = (smoothed_maps if smoothed else raw_maps).reshape(len(raw_maps), -1)
        k = max(1, int(flat.shape[1] * fraction + 0.5))
        return np.sort(flat, axis=1)[:, -k:].mean(axis=1)
    return score


# Other image scores of the same maps, beside the graph's own: what a score head could compute.
# "top1_raw" is the kNN baseline's rule (the mean of the top 1% of the bilinear map).
AGGREGATIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "max_raw": _top_mean(0.0, False), "top1_raw": _top_mean(0.01, False), "top5_raw": _top_mean(0.05, False),
    "max_smoothed": _top_mean(0.0, True), "top1_smoothed": _top_mean(0.01, True),
}


def aggregation_aurocs(good: tuple[np.ndarray, ...], bad: dict[str, tuple[np.ndarray, ...]]) -> dict[str, float]:
    """Proxy image AUROC (all proxies) of each of ``AGGREGATIONS``, from (score, smoothed, raw) outputs."""
    from benchmarks.patchcore_study import image_aurocs

    return {f"proxy_image_auroc_{name}": image_aurocs(rule(*good[1:]), {k: rule(*v[1:]) for k, v in bad.items()})["all"]
            for name, rule in AGGREGATIONS.items()}


def study_variant(data: dict[str, Any], proxies: dict[str, tuple[np.ndarray, np.ndarray]], category: str,
                  name: str, budget_s: float, seed: int, work: Path, proxy: str,
                  model: str = "patchcore_distilled", config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``config`` (default: ``VARIANTS[name]``) under the budget; score it on the proxies."""
    from sklearn.metrics import roc_auc_score

    from benchmarks.patchcore_study import image_aurocs
    from edgead.models.base import TrainConfig
    from edgead.training.checkpoint import load_run
    from edgead.training.trainer import train_from_arrays

    config = VARIANTS[name] if config is None else config
    t0 = time.process_time()
    run = train_from_arrays(model, data["train"], data["val"], work / f"{category}-{name}",
                            config=config, train=TrainConfig(epochs=1000, time_budget_s=budget_s, seed=seed, proxy=proxy),
                            progress=False)
    train_s = time.process_time() - t0
    detector, _, _ = load_run(run)
    detector.eval()
    good_outputs = graph_outputs(detector, data["val"], raw=True)
    bad_outputs = {kind: graph_outputs(detector, x, raw=True) for kind, (x, _) in proxies.items()}
    good, good_maps = good_outputs[:2]
    bad = {kind: outputs[:2] for kind, outputs in bad_outputs.items()}
    labels = np.concatenate([np.zeros_like(good_maps, np.uint8)] + [m for _, m in proxies.values()]).ravel()
    maps = np.concatenate([good_maps] + [m for _, m in bad.values()]).ravel()
    history = json.loads((run / "history.json").read_text())
    aurocs = image_aurocs(good, {kind: s for kind, (s, _) in bad.items()})
    scored = [i for i, h in enumerate(history) if "val_proxy_auroc" in h]  # the final stage's epochs
    losses = {k: [round(h[k], 4) for h in history if k in h] for k in sorted({k for h in history for k in h})
              if k not in ("stage", "epoch", "val_proxy_auroc")}
    return {"category": category, "model": model, "variant": name, **config, "train_cpu_s": round(train_s, 1),
            "proxy": proxy, "epochs": len(history), **{f"{k}_loss": v for k, v in losses.items()},
            "kept_epoch": max(scored, key=lambda i: history[i]["val_proxy_auroc"]),
            "proxy_pixel_auroc": float(roc_auc_score(labels, maps)),
            "proxy_image_auroc_reweighted": aurocs.pop("all"),
            **{f"proxy_image_auroc_{k}": v for k, v in aurocs.items()},
            **aggregation_aurocs(good_outputs, bad_outputs)}


def study_main(argv: list[str] | None, *, doc: str, model: str, variants: dict[str, dict[str, Any]],
               default: str, config_of: Callable[[str], dict[str, Any]], prefix: str, out: str) -> int:
    """The command line of a trained-detector study: train each variant per category, score it on
    the validation proxies, and rewrite the JSON after every row."""
    from benchmarks.patchcore_study import _proxies
    from benchmarks.quality import load_category
    from benchmarks.report import write_report
    from benchmarks.study_data import add_data_arguments, generate_study_data

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--variants", nargs="*", default=[default], choices=list(variants),
                        help="default: the detector's defaults, chosen with this study")
    parser.add_argument("--budget-s", type=float, default=300.0, help="CPU seconds of training per variant")
    parser.add_argument("--proxy", default="cutpaste+lines", choices=["cutpaste", "cutpaste+lines"],
                        help="the trainer's epoch-selection proxy")
    parser.add_argument("--out", default=out)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work, root = generate_study_data(args, prefix)
    rows = []
    for category in args.categories:
        data = load_category(root, category, args.image_size)
        proxies = _proxies(data["val"], args.seed, lines=True)
        for name in args.variants:
            rows.append(study_variant(data, proxies, category, name, args.budget_s, args.seed, work, args.proxy,
                                      model=model, config=config_of(name)))
            print(json.dumps(rows[-1]), flush=True)
            write_report(args.out, {"image_size": args.image_size, "budget_cpu_s": args.budget_s, "proxy": args.proxy,
                                    "selection": "validation split vs CutPaste, CutPaste-scar and 3 thin-line "
                                                 "copies; no test image", "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, doc=__doc__ or "", model="patchcore_distilled", variants=VARIANTS, default="defaults",
                      config_of=VARIANTS.__getitem__, prefix="edgead-distilled-", out="results/distilled_study.json")


if __name__ == "__main__":
    raise SystemExit(main())
