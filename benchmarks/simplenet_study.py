"""SimpleNet's noise scale, chosen on the normal validation split only.

    python -m benchmarks.simplenet_study --categories metal washer --noise 0.015 0.1 \
        --out results/simplenet_study.json

SimpleNet's features are divided by their RMS on the training patches (so each element has RMS 1),
and the paper's noise std is 0.015. For each noise std in ``--noise`` the detector trains under the
same CPU budget as ``benchmarks/quality.py`` (process seconds, one thread) and is scored on the
validation images against the proxy-anomalous copies of ``benchmarks/patchcore_study`` (CutPaste,
CutPaste-scar, thin lines): image AUROC overall and per proxy, pixel AUROC of the smoothed maps.
No test image is read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


@torch.no_grad()
def _score(detector: torch.nn.Module, images: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    from edgead.core.postprocess import DEFAULT_SIGMA, smooth

    scores, maps = [], []
    for start in range(0, len(images), batch):
        s, m = detector(torch.from_numpy(images[start:start + batch]))
        scores.append(s.numpy())
        maps.append(smooth(m[:, 0].numpy(), DEFAULT_SIGMA))
    return np.concatenate(scores), np.concatenate(maps)


def study_category(root: Path, category: str, size: int, seed: int, noises: list[float], budget_s: float,
                   work: Path) -> list[dict[str, Any]]:
    from sklearn.metrics import roc_auc_score

    from benchmarks.patchcore_study import _proxies, image_aurocs
    from benchmarks.quality import load_category
    from edgead.models.base import TrainConfig
    from edgead.training.checkpoint import load_run
    from edgead.training.trainer import train_from_arrays

    data = load_category(root, category, size)
    proxies = _proxies(data["val"], seed, lines=True)
    rows = []
    for noise in noises:
        train = TrainConfig(epochs=1000, batch_size=16, seed=seed, time_budget_s=budget_s)
        run = train_from_arrays("simplenet", data["train"], data["val"], work / f"{category}-{noise}",
                                config={"noise_std": noise}, train=train, progress=False)
        detector, _, _ = load_run(run)
        detector.eval()
        good_scores, good_maps = _score(detector, data["val"])
        scored = {kind: _score(detector, images) for kind, (images, _) in proxies.items()}
        aurocs = image_aurocs(good_scores, {kind: s for kind, (s, _) in scored.items()})
        row: dict[str, Any] = {"category": category, "noise_std": noise,
                               "epochs": len(json.loads((run / "history.json").read_text())),
                               **{f"proxy_image_auroc_{kind}": aurocs[kind] for kind in proxies},
                               "proxy_image_auroc": aurocs["all"]}
        all_maps = [good_maps] + [m for _, m in scored.values()]
        all_masks = [np.zeros_like(good_maps, np.uint8)] + [masks for _, masks in proxies.values()]
        row["proxy_pixel_auroc"] = float(roc_auc_score(np.concatenate(all_masks).ravel(),
                                                       np.concatenate(all_maps).ravel()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import write_report
    from benchmarks.study_data import add_data_arguments, generate_study_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--noise", nargs="*", type=float, default=[0.015, 0.1, 0.3])
    parser.add_argument("--budget-s", type=float, default=90.0, help="training budget, CPU seconds (process time)")
    parser.add_argument("--out", default="results/simplenet_study.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work, root = generate_study_data(args, "edgead-snstudy-")
    rows = [r for c in args.categories
            for r in study_category(root, c, args.image_size, args.seed, args.noise, args.budget_s, work)]
    write_report(args.out, {"image_size": args.image_size, "budget_cpu_s": args.budget_s,
                            "selection": "validation split vs CutPaste, CutPaste-scar and thin-line copies; "
                                         "no test image", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
