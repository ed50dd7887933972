"""Which layers of a component make its INT8 graph fail the export's per-component check.

    python -m benchmarks.int8_sensitivity BUNDLE --images DIR [--component encoder]
        [--method percentile] [--layout cpu] [--full-range] [--out results/int8_sensitivity.json]

BUNDLE is an FP32 bundle (``edgead export``); DIR holds normal images. The first ``--calib-count``
images calibrate, the next ``--eval-count`` (held out from calibration) are scored. Each row
substitutes one INT8 graph of the component into the FP32 chain, as ``select_precisions`` does,
and reports the check's numbers (``edgead.export.int8.output_errors``; the bound on the score is
0.25 of the normal scores' spread) and the component's ORT latency on one thread:

* all weighted layers in INT8;
* each layer alone in INT8 (the others FP32): its sensitivity;
* the most sensitive k layers kept in FP32, k = 1..``--greedy``;
* with ``--bf16``, the whole FP32 component compiled by OpenVINO with FP32, then BF16, inference
  precision (on CPUs that list BF16): the other reduced precision this kind of CPU offers;
* with ``--aggregations``, the all-INT8 trial's error under other image scores computed from the
  same patch-distance map (max, top-k means, pooled or smoothed maxima), each against its own normal
  spread: does a smoother score absorb the INT8 noise?

It also splits the score error into a shift shared by all images (which a recalibrated threshold
would absorb) and per-image noise (which it would not). No torch; no test images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.report import write_report
from edgead.data.datasets import folder_samples, load_arrays
from edgead.export import int8


def _median_ms(call: Callable[[], object], repeats: int = 11, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _latency_ms(path: Path, feed: dict[str, np.ndarray]) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _median_ms(lambda: session.run(None, feed))


class Study:
    """The FP32 chain of a bundle, its reference outputs on held-out normal images, and trials."""

    def __init__(self, bundle: Path, component: str, calib: np.ndarray, held: np.ndarray, args: argparse.Namespace):
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.components = manifest["components"]
        self.fp32 = bundle / f"{component}.fp32.onnx"
        self.component, self.args, self.held = component, args, held
        self.sessions = int8.open_sessions({c["name"]: bundle / f"{c['name']}.fp32.onnx" for c in self.components})
        self.reference = self._run(self.sessions)
        inputs = next(c["inputs"] for c in self.components if c["name"] == component)
        self.feeds = [{n: r[n] for n in inputs} for r in
                      (int8.run_chain(self.components, self.sessions, x[None].astype(np.float32)) for x in calib)]
        self.layers = [n.name for n in onnx.load(str(self.fp32)).graph.node if n.op_type in int8.WEIGHTED_OPS]

    def _run(self, sessions: dict[str, object]) -> list[dict[str, np.ndarray]]:
        return [int8.run_chain(self.components, sessions, x[None].astype(np.float32)) for x in self.held]

    def trial(self, fp32_layers: list[str], label: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "int8.onnx"
            int8.quantize_int8(self.fp32, path, self.feeds, self.args.method, exclude=fp32_layers,
                               layout=self.args.layout, reduce_range=False if self.args.full_range else None)
            got = self._run({**self.sessions, **int8.open_sessions({self.component: path})})
            ms = _latency_ms(path, self.feeds[0])
        self.last_outputs = got
        return self._row(got, ms, label, fp32_layers)

    def openvino_trial(self, inference_precision: str) -> dict[str, Any]:
        session = _OpenVinoSession(self.fp32, inference_precision)
        got = self._run({**self.sessions, self.component: session})
        return self._row(got, session.latency_ms(self.feeds[0]), f"OpenVINO {inference_precision.upper()}", [])

    def _row(self, got: list[dict[str, np.ndarray]], ms: float, label: str, fp32_layers: list[str]) -> dict[str, Any]:
        err = int8.output_errors(self.reference, got)
        ref = np.array([r["score"].ravel()[0] for r in self.reference])
        delta = np.array([g["score"].ravel()[0] for g in got]) - ref
        spread = max(float(ref.std()), 1e-12)
        row = {"trial": label, "fp32_layers": [_short(n) for n in fp32_layers], **err,
               "pass": int8.within_tolerance(err), "score_shift_rel_spread": float(delta.mean() / spread),
               "score_noise_rel_spread": float(delta.std() / spread),
               "score_corr": float(np.corrcoef(ref, ref + delta)[0, 1]), "component_ms": ms}
        print(f"{label:28s} score {err['score_max_rel_spread']:6.3f} (shift {row['score_shift_rel_spread']:+.2f}, "
              f"noise {row['score_noise_rel_spread']:.2f})  map {err['map_mean_rel_spread']:.3f}  "
              f"r {err['map_pearson']:.4f}  {ms:6.1f} ms  {'pass' if row['pass'] else 'fail'}", flush=True)
        return row


class _OpenVinoSession:
    """An ONNX graph compiled by OpenVINO at a given inference precision, with ORT's ``run`` signature."""

    def __init__(self, path: Path, inference_precision: str) -> None:
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": inference_precision,
                                                             "INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(feeds)
        names = names or [o.any_name for o in self.compiled.outputs]
        return [np.array(self.request.get_tensor(n).data, copy=True) for n in names]

    def latency_ms(self, feed: dict[str, np.ndarray]) -> float:
        return _median_ms(lambda: self.request.infer(feed))


def _top_mean(k: int) -> Callable[[np.ndarray], float]:
    return lambda m: float(np.sort(m.ravel())[-k:].mean())


def _smoothed_max(sigma: float) -> Callable[[np.ndarray], float]:
    return lambda m: float(cv2.GaussianBlur(m, (0, 0), sigma).max())


AGGREGATIONS: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda m: float(m.max()), "top-3 mean": _top_mean(3), "top-10 mean": _top_mean(10),
    "top-30 mean": _top_mean(30), "top-100 mean": _top_mean(100),
    "3x3 mean-pooled max": lambda m: float(cv2.blur(m, (3, 3)).max()),
    "gaussian sigma 1 max": _smoothed_max(1.0), "gaussian sigma 4 max": _smoothed_max(4.0),
}


def aggregation_rows(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]],
                     key: str = "patch_distance") -> list[dict[str, Any]]:
    """Max |score error| / normal spread of each image score in :data:`AGGREGATIONS`, recomputed from
    the ``key`` map of the FP32 (``reference``) and reduced-precision (``got``) chains."""
    if key not in reference[0]:
        raise SystemExit(f"--aggregations: the chain has no {key!r} tensor (a patch detector's bundle has)")
    rows = [_aggregation_row("the detector's score", [r["score"].ravel()[0] for r in reference],
                             [g["score"].ravel()[0] for g in got])]
    for name, aggregate in AGGREGATIONS.items():
        ref, new = ([aggregate(np.asarray(o[key], np.float32).squeeze()) for o in outs] for outs in (reference, got))
        rows.append(_aggregation_row(name, ref, new))
    return rows


def _aggregation_row(name: str, ref: list[float], got: list[float]) -> dict[str, Any]:
    ref_a, delta = np.asarray(ref, np.float64), np.asarray(got, np.float64) - np.asarray(ref, np.float64)
    ratio = float(np.abs(delta).max() / max(float(ref_a.std()), 1e-12))
    print(f"  {name:24s} max |error| / normal spread {ratio:5.2f}", flush=True)
    return {"aggregation": name, "score_max_rel_spread": ratio, "normal_spread": float(ref_a.std())}


def _short(node: str) -> str:
    parts = [p for p in node.split("/") if p]
    return parts[-2] if len(parts) > 1 else node


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.int8_sensitivity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--images", required=True, type=Path, help="folder of normal images")
    p.add_argument("--component", default="encoder")
    p.add_argument("--calib-count", type=int, default=32)
    p.add_argument("--eval-count", type=int, default=32)
    p.add_argument("--method", default="percentile", choices=sorted(int8.CALIB_METHODS))
    p.add_argument("--layout", default="cpu", choices=sorted(int8.INT8_LAYOUTS))
    p.add_argument("--full-range", action="store_true", help="8-bit weights (the cpu layout uses 7 bits)")
    p.add_argument("--greedy", type=int, default=6, help="keep up to this many most sensitive layers in FP32")
    p.add_argument("--bf16", action="store_true", help="also the whole component in OpenVINO BF16 (needs openvino)")
    p.add_argument("--only-whole", action="store_true", help="skip the per-layer trials")
    p.add_argument("--aggregations", action="store_true",
                   help="also the all-INT8 error under other image scores of the patch-distance map")
    p.add_argument("--out", default="results/int8_sensitivity.json")
    args = p.parse_args(argv)
    images, _, _ = load_arrays(folder_samples(args.images), *_input_size(args.bundle), skip_bad=True)
    if len(images) < args.calib_count + args.eval_count:
        raise SystemExit(f"{args.images}: {len(images)} images, need {args.calib_count + args.eval_count}")
    study = Study(args.bundle, args.component, images[:args.calib_count],
                  images[args.calib_count:args.calib_count + args.eval_count], args)
    fp32_ms = _latency_ms(study.fp32, study.feeds[0])
    print(f"{args.component} FP32 {fp32_ms:.1f} ms; {len(study.layers)} weighted layers")
    rows = [study.trial([], "all INT8")]
    aggregations = aggregation_rows(study.reference, study.last_outputs) if args.aggregations else None
    if args.bf16:  # OpenVINO's FP32 beside it: the speed-up is BF16's over the same backend
        rows += [study.openvino_trial("f32"), study.openvino_trial("bf16")]
    layers = [] if args.only_whole else study.layers
    singles = [study.trial([n for n in study.layers if n != layer], f"only {_short(layer)} INT8") for layer in layers]
    rows += singles
    error = {layer: row["score_max_rel_spread"] for layer, row in zip(layers, singles)}
    order = sorted(layers, key=lambda n: -error[n])
    for k in range(1, (0 if args.only_whole else args.greedy) + 1):
        rows.append(study.trial(order[:k], f"{k} most sensitive FP32"))
    write_report(args.out, {"bundle": str(args.bundle), "component": args.component, "images": str(args.images),
                            "calib_count": args.calib_count, "eval_count": args.eval_count, "method": args.method,
                            "layout": args.layout, "full_range": args.full_range, "fp32_ms": fp32_ms,
                            "bound_score_max_rel_spread": int8.COMPONENT_TOLERANCE["int8"]["score_max_rel_spread"],
                            "rows": rows, **({"aggregations": aggregations} if aggregations else {})})
    return 0


def _input_size(bundle: Path) -> tuple[int, int]:
    shape = json.loads((bundle / "manifest.json").read_text())["input"]["shape"]
    return int(shape[2]), int(shape[1])


if __name__ == "__main__":
    sys.exit(main())
