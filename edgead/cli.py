"""``edgead``: synth, train, eval, export, bench, keygen.

Subcommands import their stack on use: ``edgead synth`` needs no torch, ``edgead train`` does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from edgead.core.cli_support import EDGEAD_EPILOG, UsageError, fail, fraction, pop_flag, positive_float, positive_int

# Subcommands that live in their own modules: "module:function", each function(argv) -> int.
DELEGATED = {
    "export": "edgead.export.bundle_writer:main",
    "bench parity": "edgead.bench:parity_main",
    "bench latency": "edgead.bench:latency_main",
    "keygen": "edgead.core.signing:keygen_main",
}


def parse_kv(pairs: list[str]) -> dict[str, object]:
    """``--set w_con=40 max_width=256`` -> {"w_con": 40, "max_width": 256} (values parsed as JSON)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_synth(args: argparse.Namespace) -> int:
    from edgead.data import synth

    spec = synth.SynthSpec(image_size=args.image_size, n_train=args.n_train, n_test_good=args.n_test_good,
                           n_test_per_defect=args.n_test_per_defect, seed=args.seed)
    root = synth.generate(args.out, args.categories or None, spec, progress=True)
    print(f"wrote synthetic MVTec-layout data set to {root}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from edgead.models.base import TrainConfig
    from edgead.models.registry import available
    from edgead.training.run_dir import prepare_run_dir
    from edgead.training.trainer import train_run

    if args.model not in (names := available()):
        raise UsageError(f"--model {args.model}: unknown detector; choose one of {', '.join(names)}")
    prepare_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)
    config = parse_kv(args.set)
    if args.scorer is not None:  # else the detector's own default (ssim for the SSIM-AE, l1 otherwise)
        config["scorer"] = args.scorer
    if args.width is not None:
        config["width"] = args.width
    if args.latent_dim is not None:
        config["latent_dim"] = args.latent_dim
    if args.vgg_weights:
        config["vgg_weights"] = args.vgg_weights
    extra = {f"epochs_{k}": v for k, v in parse_kv(args.stage_epochs).items()}
    if args.anomaly_source:  # synthetic-anomaly textures (DRAEM); recorded with the run's train config
        extra["anomaly_source"] = args.anomaly_source
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=args.augment,
                        device=args.device, seed=args.seed, proxy=args.proxy, extra=extra)
    run = train_run(args.model, _data_source(args), args.out, image_size=args.image_size,
                    channels=args.channels, val_fraction=args.val_fraction, skip_bad=args.skip_bad,
                    config=config, train=train, resume=args.resume)
    print(f"run saved to {run}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgead.evaluation.evaluate import evaluate_bundle, evaluate_run

    if (Path(args.run) / "manifest.json").is_file():  # a bundle: evaluate the engine the line runs
        report = evaluate_bundle(args.run, _data_source(args), args.backend, args.precision,
                                 out_dir=args.out, skip_bad=args.skip_bad)
    else:
        report = evaluate_run(args.run, _data_source(args), out_dir=args.out, skip_bad=args.skip_bad,
                              device=args.device)
    print(json.dumps({k: report[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1")}, indent=2))
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module, _, function = DELEGATED[command].partition(":")
    return getattr(importlib.import_module(module), function)(argv)


def _add_data_arguments(p: argparse.ArgumentParser, test: bool) -> None:
    """--data ROOT --category C (MVTec AD layout) or --normal-dir [--abnormal-dir --mask-dir]
    (anomalib's Folder layout)."""
    g = p.add_argument_group("data (MVTec AD layout, or an anomalib-style Folder layout)")
    g.add_argument("--data", help="MVTec AD root: ROOT/CATEGORY/train/good, test/<defect>, ground_truth/<defect>")
    g.add_argument("--category", help="category under --data")
    g.add_argument("--normal-dir", help="Folder layout: a folder of defect-free images")
    g.add_argument("--abnormal-dir", help="Folder layout: a folder of defective images"
                   + ("" if test else " (recorded in the run for eval; never trained on)"))
    g.add_argument("--mask-dir", help="Folder layout: masks matched to abnormal images by file stem")
    g.add_argument("--normal-test-dir", help="Folder layout: normal test images (default: 20%% of --normal-dir, "
                                             "held out of training and recorded in the run)")


def _data_source(args: argparse.Namespace):
    from edgead.data.source import DataSource

    if args.data and args.normal_dir:
        raise UsageError("give either --data ROOT --category C (MVTec layout) or --normal-dir DIR "
                         "(Folder layout), not both")
    if args.data:
        if not args.category:
            raise UsageError(f"--data {args.data} needs --category (a folder under it)")
        return DataSource.mvtec(args.data, args.category)
    if args.normal_dir:
        return DataSource.folder(args.normal_dir, args.abnormal_dir, args.mask_dir, args.normal_test_dir)
    raise UsageError("no data: give --data ROOT --category C (MVTec layout) or --normal-dir DIR "
                     "(Folder layout)")


def _detector_help() -> str:
    from edgead.models import registry

    rows = registry.describe()
    width = max(len(name) for name, _ in rows)
    return "detectors (--model):\n" + "\n".join(f"  {name:<{width}}  {text}" for name, text in rows)


def build_parser(list_detectors: bool = True) -> argparse.ArgumentParser:
    """The parser; ``list_detectors=False`` skips importing every detector (torch) for the train help."""
    parser = argparse.ArgumentParser(prog="edgead", description=__doc__, epilog=EDGEAD_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic inspection data set (MVTec layout)")
    p.add_argument("--out", default="data/synth")
    p.add_argument("--categories", nargs="*", default=None, help="default: all")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--n-train", type=positive_int, default=200)
    p.add_argument("--n-test-good", type=positive_int, default=40)
    p.add_argument("--n-test-per-defect", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train a detector on defect-free images", epilog=_detector_help() if list_detectors else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_arguments(p, test=False)
    p.add_argument("--model", default="patchcore", metavar="NAME", help="detector (listed below; default patchcore)")
    p.add_argument("--image-size", type=positive_int, default=128)
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--epochs", type=positive_int, default=15)
    p.add_argument("--stage-epochs", nargs="*", default=[], metavar="STAGE=N",
                   help="epochs per stage of a multi-stage method, e.g. gan=20 encoder=10")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=positive_float, default=None, help="default: the method's reference rate")
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--latent-dim", type=positive_int, default=None)
    p.add_argument("--scorer", default=None, choices=["l1", "ssim", "vgg"],
                   help="map function of reconstruction detectors (default: the detector's own; "
                        "ssim for the SSIM-AE, vgg for UTAD, l1 for the others)")
    p.add_argument("--vgg-weights", default=None, help="VGG-19 state dict (torchvision or normalised-VGG layout)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other detector config fields")
    p.add_argument("--anomaly-source", default=None, metavar="DIR",
                   help="folder of texture images for synthetic anomalies (draem; default: procedural textures)")
    p.add_argument("--val-fraction", type=fraction, default=0.15)
    p.add_argument("--augment", action="store_true", help="random flips and small rotations")
    p.add_argument("--proxy", default="cutpaste", choices=["cutpaste", "cutpaste+lines"],
                   help="validation proxy that picks the epoch kept: CutPaste copies (default), or also "
                        "thin-line copies of the validation images (when CutPaste saturates)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    p.add_argument("--out", required=True, help="run folder: new or empty, unless --resume or --overwrite")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run, or an engine of a bundle, on the test split")
    p.add_argument("run", help="training run, or bundle (then --backend/--precision choose the engine)")
    p.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino", "tensorrt"],
                   help="bundle only")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "bf16"],
                   help="bundle only (bf16: openvino, the FP32 graph at BF16 outside its FP32 islands)")
    _add_data_arguments(p, test=True)
    p.add_argument("--out", default=None, help="default: RUN/eval, or BUNDLE-eval-BACKEND-PRECISION beside a bundle")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    sub.add_parser("export", help="export a run to a bundle (see `edgead export --help`)", add_help=False)
    sub.add_parser("keygen", help="make an Ed25519 key pair to sign bundles (see `edgead keygen --help`)",
                   add_help=False)
    bench = sub.add_parser("bench", help="parity | latency (on this device; see `edgead bench parity --help`)",
                           add_help=False)
    bench.add_argument("what", choices=["parity", "latency"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv, debug = pop_flag(list(sys.argv[1:] if argv is None else argv), "--debug")
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print(f"{_prog(argv)}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line naming the file and the fix; --debug for more
        return fail(_prog(argv), err, debug)


def _prog(argv: list[str]) -> str:
    words = [a for a in argv[:2] if not a.startswith("-")]
    if words[:1] == ["bench"]:
        return "edgead " + " ".join(words[:2])
    return "edgead" + (f" {words[0]}" if words else "")


def _dispatch(argv: list[str]) -> int:
    if argv[:1] in (["export"], ["keygen"]):
        return _delegate(argv[0], argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and f"bench {argv[1]}" in DELEGATED:
        return _delegate(f"bench {argv[1]}", argv[2:])
    args = build_parser(list_detectors=argv[:1] == ["train"]).parse_args(argv)
    if args.command == "bench":  # `edgead bench` with no or an unknown target
        build_parser().parse_args(["bench", "--help"])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
