"""``edgead bench parity`` and ``edgead bench latency``: certification and speed of a bundle's
engines, on the device that runs them.

The top of the layer stack: it composes the torch-free certification (:mod:`edgead.certify`),
whose reference is the bundle's golden outputs, with the live PyTorch reference of a training run
(:mod:`edgead.training.reference`), imported only for ``--against-run``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgead.core.bundle import load_bundle
from edgead.core.engine import EngineError


def _run_dir(bundle: Any, run: str | None) -> str:
    run = run or bundle.manifest.get("source_run")
    if not run or not Path(run).is_dir():
        raise EngineError(f"the PyTorch reference needs the training run: {run or '(none recorded)'} is not here; "
                          "pass --run RUN_DIR")
    return str(run)


def certify_against_run(bundle_dir: str | Path, images: Any, masks: Any, labels: Any, run: str | Path,
                        **kw: Any) -> dict[str, Any]:
    """:func:`edgead.certify.parity.certify` with the training run's live PyTorch model as the
    reference (its FP32 outputs, and float64 when the noise-floor rule needs them)."""
    import torch

    from edgead.certify import parity
    from edgead.training.reference import reference_outputs

    kw.setdefault("reference_name", f"torch fp32 of {run} (live)")
    return parity.certify(bundle_dir, images, masks, labels, reference_outputs(run, images),
                          lambda: reference_outputs(run, images, torch.float64), **kw)


def _parity_parser() -> argparse.ArgumentParser:
    from edgead.certify import parity

    parser = argparse.ArgumentParser(
        prog="edgead bench parity", description=parity.__doc__.split("\n\n")[0],
        epilog="Without --against-run this needs only the station's packages (numpy, onnxruntime, TensorRT): "
               "the reference is the bundle's golden outputs. Each result is written as this device's "
               "certificate beside the graph (unless --no-write); exit 0 when every engine passes.")
    parser.add_argument("bundle")
    parser.add_argument("--backend", "--backends", dest="backends", nargs="+", default=["onnxruntime"],
                        choices=["onnxruntime", "openvino", "tensorrt"])
    parser.add_argument("--precision", "--precisions", dest="precisions", nargs="+",
                        choices=["fp32", "fp16", "int8", "bf16"],
                        help="default: every precision in the bundle (and bf16 on openvino where this CPU computes BF16)")
    parser.add_argument("--against-run", "--run", dest="run", metavar="RUN",
                        help="compare with the live PyTorch model of this training run instead of the golden "
                             "outputs (needs torch); on the golden images unless --data/--category are given")
    parser.add_argument("--data", help="with --against-run: MVTec-layout root (its validation + test images)")
    parser.add_argument("--category", help="with --data")
    parser.add_argument("--max-images", type=int, help="with --data: evenly spaced subset of validation + test")
    parser.add_argument("--out", help="write the full report as JSON")
    parser.add_argument("--no-write", action="store_true", help="don't write the device certificates")
    return parser


def _parity_report(args: argparse.Namespace) -> dict[str, Any]:
    from edgead.certify import parity
    from edgead.core.golden import read_golden

    if (args.data is None) != (args.category is None):
        raise ValueError("give --data and --category together")
    if args.data and not args.run:
        raise ValueError("--data needs --against-run RUN: only a live model gives references on other images; "
                         "without it the golden outputs in the bundle are the reference")
    common = {"backends": args.backends, "precisions": args.precisions, "write": not args.no_write}
    if not args.run:
        return parity.certify_golden(args.bundle, **common)
    bundle = load_bundle(args.bundle)
    run = _run_dir(bundle, args.run)
    if args.data:
        meta = json.loads((Path(run) / "config.json").read_text())
        images, masks, labels, desc = parity.load_data(args.bundle, args.data, args.category, meta, args.max_images)
    else:
        golden = read_golden(bundle.root, bundle.spec.golden)
        images, masks, labels, desc = golden.images, golden.masks, golden.labels, golden.description
    return certify_against_run(bundle, images, masks, labels, run, data=desc, **common)


def parity_main(argv: list[str] | None = None) -> int:
    from edgead.certify import parity
    from edgead.certify.certificate import CertificateError

    args = _parity_parser().parse_args(argv)
    try:
        report = _parity_report(args)
    except (ValueError, OSError, EngineError, RuntimeError, CertificateError) as exc:
        print(f"edgead bench parity: error: {exc}", file=sys.stderr)
        return 2
    parity.print_table(report)
    for key, stats in report["results"].items():
        if "certificate" in stats:
            print(f"{key}: certificate for {stats['device']}: {stats['certificate']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(parity.json_safe(report), indent=2) + "\n")
    ran = [s for s in report["results"].values() if "skipped" not in s]
    return 0 if ran and all(s["pass"] for s in ran) else 1


def latency_main(argv: list[str] | None = None) -> int:
    from edgead.certify import latency

    parser = argparse.ArgumentParser(prog="edgead bench latency", description=latency.__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--backend", nargs="+", default=["onnxruntime"], choices=["onnxruntime", "openvino", "tensorrt"])
    parser.add_argument("--precision", nargs="+", help="default: every precision in the bundle")
    parser.add_argument("--warmup-ms", type=float, default=200.0)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--iterations", type=int)
    group.add_argument("--duration", type=float, default=3.0, help="seconds (default 3, at least 10 iterations)")
    parser.add_argument("--threads", type=int, help="CPU threads (onnxruntime intra-op, openvino, torch)")
    parser.add_argument("--run", help="training run for the PyTorch baseline (default: recorded at export)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the PyTorch-eager baseline")
    parser.add_argument("--no-components", action="store_true", help="skip the per-component timing")
    parser.add_argument("--no-roofline", action="store_true", help="skip the GEMM peak measurement and the roofline")
    parser.add_argument("--out", help="write the report as JSON")
    args = parser.parse_args(argv)
    try:
        baseline = None
        if not args.no_baseline:
            from edgead.training.reference import graph_factory

            baseline = graph_factory(_run_dir(load_bundle(args.bundle), args.run), args.threads)
        report = latency.benchmark(args.bundle, args.backend, args.precision, args.warmup_ms, args.iterations,
                                   args.duration, args.threads, baseline, not args.no_components,
                                   not args.no_roofline)
    except (ValueError, OSError, EngineError, RuntimeError) as exc:
        print(f"edgead bench latency: error: {exc}", file=sys.stderr)
        return 2
    latency.print_table(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
