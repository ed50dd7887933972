"""``edgead export RUN --precision fp32 fp16 int8 --out DIR``: a training run -> a station bundle.

The bundle holds the fused graph ``detector.<precision>.onnx`` and every component's graph per
precision, plus ``manifest.json`` (schema in :mod:`edgead.core.bundle`) with the SHA-256 of each file.

INT8: each component is quantised on its own (its inputs are the FP32 chain's intermediate
tensors on the calibration images) and certified by substituting it into the FP32 chain (see
:data:`export.int8.COMPONENT_TOLERANCE`); a component that fails falls back to FP32 (the default,
``--int8-fallback fp32``: CPU stations, where an FP16 graph runs through Casts) or to FP16, then
FP32 (``--int8-fallback fp16``: GPU stations), recorded in ``precision_fallbacks``. The fused
INT8 graph is then *assembled* from those per-component choices with
:func:`export.onnx_export.chain_graphs` rather than re-quantising the fused graph: one
calibration, one set of scales, and the fused graph is by construction the certified chain.
FP32 graphs are always written: they are the reference and the source of the others.

Golden outputs (:mod:`edgead.export.golden`): a fixed number of validation images and labelled
anomalies with the run's PyTorch outputs, so a station certifies without torch or the run
(``--golden-count``, ``--golden-normal``, ``--golden-images``; ``--no-golden`` leaves them out).
The manifest (typed: :mod:`edgead.core.manifest`) is sealed with its own digest; ``--sign KEY``
adds an Ed25519 signature of that digest (:mod:`edgead.core.signing`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from edgead import __version__
from edgead.core.bundle import FUSED, MANIFEST, sha256_file, write_manifest
from edgead.core.calibration import Calibration
from edgead.core.contract import IMAGE, OUTPUT_NAMES
from edgead.core.manifest import ComponentSpec, GoldenSpec, InputSpec, Manifest
from edgead.models.base import Detector
from edgead.models.blocks import SignedRange
from edgead.export.fp16 import export_fp16
from edgead.export.graph_work import work_table
from edgead.export.golden import GOLDEN_IMAGES, GOLDEN_NORMAL, write_golden
from edgead.export.int8 import CALIB_METHODS, INT8_FALLBACKS, INT8_LAYOUTS, open_sessions, output_errors, run_chain, select_precisions
from edgead.export.onnx_export import ExportError, chain_graphs, export_detector, not_exportable_reason

PRECISIONS = ("fp32", "fp16", "int8")


def _resize_rule() -> str:
    try:
        from edgead.data.images import RESIZE_RULE
    except ImportError:
        return "area-down-linear-up"
    return RESIZE_RULE


def input_normalization(detector: Detector) -> tuple[list[float], list[float], str]:
    """(mean, std, text) of the normalisation the graph applies to its [0, 1] input."""
    c = detector.config.channels
    mean, std = getattr(detector, "input_mean", None), getattr(detector, "input_std", None)
    if mean is not None and std is not None:
        return list(mean), list(std), "applied inside the graph: (x - mean) / std"
    first = detector.components()[0].module
    if isinstance(getattr(first, "fp32_normalize", None), SignedRange):
        return [0.5] * c, [0.5] * c, "applied inside the graph: x * 2 - 1 = (x - 0.5) / 0.5; feed [0, 1]"
    return [0.0] * c, [1.0] * c, "none: the graph takes [0, 1] as is"


def _subsample(images: np.ndarray, count: int) -> np.ndarray:
    if count <= 0 or len(images) <= count:
        return images
    return images[np.unique(np.linspace(0, len(images) - 1, count).round().astype(int))]


def calibration_images(meta: dict[str, Any], size: int, channels: int, calib_images: str | Path | None = None,
                       data_root: str | Path | None = None, category: str | None = None,
                       count: int = 64) -> tuple[np.ndarray, str]:
    """Normal images for INT8 calibration and where they came from: ``calib_images`` (any folder
    of normal images), else the run's own training split (never its validation images)."""
    from edgead.data.datasets import folder_samples, load_arrays
    from edgead.data.source import DataSource

    if calib_images is not None:
        images, _, _ = load_arrays(folder_samples(calib_images), size, channels, skip_bad=True)
        return _subsample(images, count), str(Path(calib_images).resolve())
    data = meta.get("data") or {}
    if data_root and category:
        source = DataSource.mvtec(data_root, category)
    elif data.get("layout") in ("mvtec", "folder"):
        source = DataSource.from_dict(data)
    else:
        raise ExportError("INT8 needs calibration images: pass --calib-images DIR (normal images) or "
                          "--data ROOT --category C; the run records no training data")
    val_files = set(data.get("val_files") or [])
    samples = [s for s in source.normal() if s.path.name not in val_files]
    samples = [samples[i] for i in np.unique(np.linspace(0, len(samples) - 1, min(count, len(samples))).round().astype(int))]
    images, _, _ = load_arrays(samples, size, channels, skip_bad=True)
    return images, f"{source.describe()} (training split, {len(images)} images)"


def _prepare_out(out: Path) -> None:
    """An empty folder or a previous bundle (replaced); anything else is refused, because every
    file in the folder is checksummed into the manifest."""
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ExportError(f"{out}: output folder is not empty and is not a bundle; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def export_run(run_dir: str | Path, out_dir: str | Path, precisions: Sequence[str] = ("fp32",),
               calib_images: str | Path | None = None, calib_count: int = 64, calib_method: str = "minmax",
               data_root: str | Path | None = None, category: str | None = None, *, golden: bool = True,
               golden_count: int = GOLDEN_IMAGES, golden_normal: int = GOLDEN_NORMAL,
               golden_images: str | Path | None = None, sign: str | Path | None = None,
               postprocess: bool = False, int8_fallback: str = "fp32", int8_layout: str = "tensorrt") -> Path:
    """Export the run at ``run_dir`` into a bundle at ``out_dir``; returns the bundle folder.

    ``golden``: write the golden outputs (``golden_count`` images, ``golden_normal`` of them
    normal; :mod:`edgead.export.golden`). ``sign``: an Ed25519 private key file that signs the
    finished bundle (:mod:`edgead.core.signing`). ``postprocess``: also write the detector graph
    with the runtime's smoothing and normalisation on the engine (:mod:`edgead.export.postprocess`).
    ``int8_fallback``: the precision of a component that fails INT8 (fp32 for CPU stations, fp16
    for GPU stations). ``int8_layout``: the Q/DQ layout (:data:`edgead.export.int8.INT8_LAYOUTS`:
    tensorrt, which every backend runs, or cpu, fast on ONNX Runtime and refused by TensorRT)."""
    from edgead.training.checkpoint import load_run

    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown precision(s) {unknown}; choose from {PRECISIONS}")
    if int8_fallback not in INT8_FALLBACKS:
        raise ExportError(f"unknown INT8 fallback {int8_fallback!r}; choose from {sorted(INT8_FALLBACKS)}")
    if int8_layout not in INT8_LAYOUTS:
        raise ExportError(f"unknown INT8 layout {int8_layout!r}; choose from {sorted(INT8_LAYOUTS)}")
    if calib_method not in CALIB_METHODS:
        raise ExportError(f"unknown calibration method {calib_method!r}; choose from {sorted(CALIB_METHODS)}")
    run_dir = Path(run_dir).resolve()
    detector, calibration, meta = load_run(run_dir, device="cpu")
    if calibration is None:
        raise ExportError(f"{run_dir}: the run has no calibration.json (no threshold from validation images); "
                          "a bundle without a threshold can't give OK/NG verdicts: re-train or re-calibrate it")
    if not detector.exportable:
        raise ExportError(not_exportable_reason(detector))
    out = Path(out_dir)
    _prepare_out(out)
    info = export_detector(detector, out)
    graphs: dict[str, dict[str, str]] = info["graphs"]
    components = info["components"]
    fallbacks: dict[str, dict[str, str]] = {}
    quantization: dict[str, Any] = {}

    if "fp16" in precisions:
        for graph in list(graphs):
            export_fp16(out / graphs[graph]["fp32"], out / f"{graph}.fp16.onnx")
            graphs[graph]["fp16"] = f"{graph}.fp16.onnx"
    if "int8" in precisions:
        c = detector.config
        images, source = calibration_images(meta, c.image_size, c.channels, calib_images, data_root, category,
                                            calib_count)
        quantization["int8"] = assemble_int8(out, components, images, calib_method, graphs, fallbacks,
                                             int8_fallback, int8_layout)
        quantization["int8"].update({"method": calib_method, "fallback": int8_fallback, "layout": int8_layout,
                                     "images": int(len(images)), "source": source,
                                     "activations": "int8 symmetric per-tensor", "weights": "int8 symmetric per-channel",
                                     "format": "QDQ (explicit quantisation)"})

    engine_post = None
    if postprocess:
        from edgead.export.postprocess import export_postprocess

        engine_post = export_postprocess(out, calibration, info["shapes"], graphs)
    golden_spec = None
    if golden:
        c = detector.config
        golden_spec = write_golden(out, run_dir, meta, c.image_size, c.channels, n_images=golden_count,
                                   n_normal=golden_normal, data_root=data_root, category=category,
                                   folder=golden_images, n_val=calibration.n_images)
    manifest = build_manifest(detector, calibration, meta, run_dir, info, graphs, fallbacks, quantization, golden_spec)
    if engine_post is not None:
        manifest.extra["engine_postprocess"] = engine_post
    manifest.extra["work_gflops"] = work_table(out, graphs)  # the latency report's roofline
    write_manifest(out, manifest)
    if sign is not None:
        from edgead.core.signing import sign_bundle

        sign_bundle(out, sign)
    return out


def assemble_int8(out: Path, components: list[dict[str, Any]], images: np.ndarray, method: str,
                  graphs: dict[str, dict[str, str]], fallbacks: dict[str, dict[str, str]],
                  fallback: str = "fp32", layout: str = "tensorrt") -> dict[str, Any]:
    """Per-component INT8 with fallbacks, then the fused INT8 graph chained from the choices."""
    selected = select_precisions(out, components, images, "int8", method, make_fp16=export_fp16, fallback=fallback,
                                 layout=layout)
    for name, precision in selected["choice"].items():
        graphs[name]["int8"] = selected["files"][name]
        if precision != "int8":
            fallbacks.setdefault("int8", {})[name] = precision
        if precision == "fp16" and "fp16" not in graphs[name]:
            graphs[name]["fp16"] = selected["files"][name]
    parts = [(c["name"], onnx.load(str(out / selected["files"][c["name"]]))) for c in components]
    fused = chain_graphs(parts, [IMAGE], list(OUTPUT_NAMES))
    onnx.save(fused, str(out / f"{FUSED}.int8.onnx"))
    graphs[FUSED]["int8"] = f"{FUSED}.int8.onnx"
    # End-to-end check of the assembled graph on the calibration images (the parity benchmark
    # certifies it on validation and test images).
    fp32 = open_sessions({FUSED: out / graphs[FUSED]["fp32"]})
    int8 = open_sessions({FUSED: out / graphs[FUSED]["int8"]})
    wiring = [{"name": FUSED, "inputs": [IMAGE], "outputs": list(OUTPUT_NAMES)}]
    feeds = [image[None].astype(np.float32) for image in images]
    check = output_errors([run_chain(wiring, fp32, x) for x in feeds], [run_chain(wiring, int8, x) for x in feeds])
    return {"components": selected["components"], "detector_check": check}


def build_manifest(detector: Detector, calibration: Calibration, meta: dict[str, Any], run_dir: Path,
                   info: dict[str, Any], graphs: dict[str, dict[str, str]], fallbacks: dict[str, dict[str, str]],
                   quantization: dict[str, Any], golden: GoldenSpec | None = None) -> Manifest:
    c = detector.config
    shapes = info["shapes"]
    mean, std, text = input_normalization(detector)
    extra: dict[str, Any] = {
        "edgead_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": c.to_dict(),
        "source_run": str(run_dir),  # provenance only: certification never needs the run
        "data": {k: v for k, v in (meta.get("data") or {}).items() if k != "val_files"},
        "quantization": quantization,
    }
    extra.update(detector.manifest_extras())
    if getattr(c, "scorer", None) == "vgg":
        weights = c.vgg_weights
        extra["scorer_weights"] = {"source": weights or "random init (seeded)",
                                   "sha256": sha256_file(weights) if weights and Path(weights).is_file() else None}
    return Manifest(
        detector=detector.name,
        input=InputSpec(IMAGE, tuple(shapes[IMAGE]), "float32", "GRAY" if c.channels == 1 else "RGB", (0.0, 1.0),
                        _resize_rule(), tuple(mean), tuple(std), text),
        outputs=tuple({"name": n, "shape": list(shapes[n]), "dtype": "float32"} for n in OUTPUT_NAMES),
        calibration=calibration,
        components=tuple(ComponentSpec(x["name"], tuple(x["inputs"]), tuple(x["outputs"]), x.get("shapes", {}))
                         for x in info["components"]),
        graphs=graphs, files={}, golden=golden, precision_fallbacks=fallbacks, extra=extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgead export", description="Export a training run to a station bundle.")
    parser.add_argument("run", help="training run folder (runs/NAME)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--calib-images", help="folder of normal images for INT8 calibration "
                        "(default: the run's training images)")
    parser.add_argument("--calib-count", type=int, default=64, help="INT8 calibration images (default 64)")
    parser.add_argument("--calib-method", default="minmax", choices=sorted(CALIB_METHODS))
    parser.add_argument("--int8-fallback", default="fp32", choices=("fp32", "fp16"),
                        help="precision of a component that fails INT8: fp32 (default; CPU stations, where "
                             "ONNX Runtime and OpenVINO run FP16 through casts) or fp16 (GPU stations)")
    parser.add_argument("--int8-layout", default="tensorrt", choices=sorted(INT8_LAYOUTS),
                        help="Q/DQ layout of the INT8 graphs: tensorrt (default; every backend runs it) or cpu "
                             "(ONNX Runtime fuses it into real INT8 kernels, about 2x faster there; TensorRT "
                             "refuses it)")
    parser.add_argument("--data", help="MVTec root for calibration when the run's is elsewhere")
    parser.add_argument("--category", help="category under --data")
    parser.add_argument("--golden-count", type=int, default=GOLDEN_IMAGES,
                        help=f"images in the golden outputs (default {GOLDEN_IMAGES})")
    parser.add_argument("--golden-normal", type=int, default=GOLDEN_NORMAL,
                        help=f"of which normal, from the validation split (default {GOLDEN_NORMAL})")
    parser.add_argument("--golden-images", help="folder of normal images for the golden outputs "
                        "(default: the run's validation split)")
    parser.add_argument("--no-golden", action="store_true", help="no golden outputs: the bundle can then be "
                        "certified only against its training run (--against-run)")
    parser.add_argument("--sign", metavar="KEY", help="Ed25519 private key (PEM) that signs the bundle "
                        "(`edgead keygen --out NAME`)")
    parser.add_argument("--postprocess", action="store_true",
                        help="also export detector_post: the detector with the map smoothing and the score/map "
                             "normalisation on the engine (edgead-run --postprocess engine)")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run, args.out, args.precision, args.calib_images, args.calib_count,
                         args.calib_method, args.data, args.category, golden=not args.no_golden,
                         golden_count=args.golden_count, golden_normal=args.golden_normal,
                         golden_images=args.golden_images, sign=args.sign, postprocess=args.postprocess,
                         int8_fallback=args.int8_fallback, int8_layout=args.int8_layout)
    except (ExportError, ValueError, OSError, RuntimeError) as exc:
        print(f"edgead export: error: {exc}", file=sys.stderr)
        return 2
    from edgead.core.bundle import load_bundle

    bundle = load_bundle(out)
    print(f"bundle written: {out}")
    if golden := bundle.spec.golden:
        print(f"  golden outputs: {golden.n_images} images ({golden.n_normal} normal: {golden.normal_source}; "
              f"{golden.n_anomalous} anomalous: {golden.anomaly_source}), {golden.size_mb:.1f} MB")
    if args.sign:
        print(f"  signed with {args.sign} (signature.json)")
    for graph, by_precision in bundle.spec.graphs.items():
        print(f"  {graph:<14} " + "  ".join(f"{p}={f}" for p, f in by_precision.items()))
    reports = bundle.manifest.get("quantization", {}).get("int8", {}).get("components", {})
    for precision, comps in bundle.spec.precision_fallbacks.items():
        for comp, used in comps.items():
            trial = reports.get(comp, {}).get("trials", {}).get(precision, {})
            why = trial.get("reason") or "failed its tolerance (see manifest quantization)"
            print(f"  {precision}: component {comp!r} runs at {used}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
