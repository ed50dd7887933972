"""Rescore trained distilled students: the pixel tap's gain chosen on validation, then the test split once.

    python -m benchmarks.distilled_rescore --work /tmp/edgead-distilled-XXXX --variant w16_d64_px8_d32 \
        --categories fabric metal wood washer pcb --out results/distilled_rescore.json

``--work`` is the folder a ``benchmarks.distilled_study`` run left (its data and its runs,
``<category>-<variant>``). For each category the student is kept as trained; only the bank (rebuilt
from the training images) and the score head change, so no CPU goes into training again:

1. on the validation proxies (CutPaste, scar, thin lines; no test image), the image score
   ``image_score=top_k`` (top 1% of the bilinear map, the kNN baseline's rule) with each of
   ``GAINS`` for the pixel tap; the best gain is chosen;
2. the test split is read once for the choice, under the top-k score and under the paper's
   reweighted maximum, side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

TOP_K_SCORE = {"image_score": "top_k", "top_k": 0.01, "score_sigma": 0.0}
GAINS: tuple[tuple[float, float], ...] = ((1.0, 1.0), (1.0, 2.0))  # (student, pixel tap) mean patch norms


def rebuilt(base: torch.nn.Module, settings: dict[str, Any], train: torch.Tensor) -> torch.nn.Module:
    """``base``'s student under other settings, its bank rebuilt from ``train``."""
    from edgead.models.patchcore import build_bank

    detector = type(base)(type(base.config).from_dict({**base.config.to_dict(), **settings}))
    detector.load_state_dict(base.state_dict())
    detector.eval()
    with torch.no_grad():
        detector.set_bank(build_bank(detector, train)[0])
    return detector


def split_metrics(detector: torch.nn.Module, data: dict[str, Any]) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    from benchmarks.distilled_study import graph_outputs

    scores, maps = graph_outputs(detector, data["test"])
    pixels = (np.asarray(data["masks"]) > 0.5).ravel().astype(np.uint8)
    return {"image_auroc": round(float(roc_auc_score(data["labels"], scores)), 4),
            "pixel_auroc": round(float(roc_auc_score(pixels, maps.ravel())), 4)}


def rescore_category(work: Path, category: str, variant: str, size: int, seed: int) -> dict[str, Any]:
    from benchmarks.distilled_study import graph_outputs
    from benchmarks.patchcore_study import _proxies, image_aurocs
    from benchmarks.quality import load_category
    from edgead.training.checkpoint import load_run

    data = load_category(work / "data", category, size)
    proxies = _proxies(data["val"], seed, lines=True)
    train = torch.from_numpy(data["train"])
    base, _, _ = load_run(work / f"{category}-{variant}")
    gains = GAINS if base.config.pixel_patch else ((),)
    validation = {}
    for gain in gains:
        detector = rebuilt(base, {**TOP_K_SCORE, "tap_gains": gain}, train)
        good = graph_outputs(detector, data["val"])[0]
        bad = {kind: graph_outputs(detector, x)[0] for kind, (x, _) in proxies.items()}
        validation[gain] = image_aurocs(good, bad)["all"]
    chosen = max(validation, key=validation.get)  # the first of equal AUROCs: the plain weighting
    return {"category": category, "variant": variant, "chosen_tap_gains": list(chosen),
            "proxy_image_auroc_by_gain": {json.dumps(list(g)): round(v, 4) for g, v in validation.items()},
            "test_top_k": split_metrics(rebuilt(base, {**TOP_K_SCORE, "tap_gains": chosen}, train), data),
            "test_reweighted": split_metrics(rebuilt(base, {"tap_gains": chosen}, train), data)}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import write_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a distilled_study run's folder")
    parser.add_argument("--variant", default="w16_d64_px8_d32")
    parser.add_argument("--categories", nargs="+", required=True)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/distilled_rescore.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for category in args.categories:
        rows.append(rescore_category(args.work, category, args.variant, args.image_size, args.seed))
        print(json.dumps(rows[-1]), flush=True)
        write_report(args.out, {"selection": "tap gain on the validation proxies; test read once for the choice",
                                "top_k_score": TOP_K_SCORE, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
