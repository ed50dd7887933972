"""FP32 ONNX -> INT8 Q/DQ ONNX (explicit quantisation) with onnxruntime's ``quantize_static``.

The same graph feeds ONNX Runtime and TensorRT: symmetric INT8 activations and weights (zero
points 0, what TensorRT's explicit quantisation expects), per-channel weights, scales from normal
training images. No TensorRT calibrator is involved (they are removed in TensorRT 11).

Kept in float (``nodes_to_exclude``):

* the FP32 islands of the FP16 export (``/fp32_`` scopes, reductions, TopK...): a quantised
  distance or top-k would rank 8-bit values;
* the *tail* of each graph: ops between the last weighted layer and a graph output (the
  decoder's Sigmoid/Tanh and ``[-1, 1] -> [0, 1]``). A component output is an image or a latent
  that an FP32 distance compares, so it leaves at full precision; with
  ``OpTypesToExcludeOutputQuantization`` a weighted layer's output is quantised only when its
  consumer is quantised, so the last layer computes in INT8 but writes float.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from edgead.core.contract import ANOMALY_MAP, IMAGE, SCORE
from edgead.core.wiring import Node, run_wiring
from edgead.export.fp16 import drop_dead_nodes, fp32_node_names

CALIB_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Q/DQ layout that TensorRT's ONNX parser takes (as in Hugging Face Optimum's TensorRT preset):
# biases stay float (TensorRT rejects an int32 DequantizeLinear: onnx-tensorrt#850, ORT#17738;
# ORT re-quantises float biases itself when it fuses QLinearConv), weights are stored float
# behind a Q/DQ pair, and each consumer gets its own Q/DQ pair.
TENSORRT_OPTIONS = {"QuantizeBias": False, "AddQDQPairToWeight": True, "DedicatedQDQPair": True}
# Two Q/DQ layouts of the same symmetric INT8 (``edgead export --int8-layout``):
# * tensorrt: the layout above, weighted layers' outputs left unquantised (TensorRT places them).
# * cpu: ONNX Runtime's and OpenVINO's own layout: int8 weight initialisers, int32 biases and a
#   Q/DQ pair after every weighted layer, so ORT fuses DQ -> Conv -> Q into QLinearConv. With
#   the tensorrt layout ORT dequantises every weight each frame and runs the conv in float
#   (VGG-19 to relu4_1, 128², 1 thread: 137 ms against 66 ms for this layout and 115 ms FP32).
#   Weights use 7 bits (``reduce_range``): ORT's fused x86 kernels otherwise saturate their
#   16-bit intermediate sums (PatchCore's VGG-19 encoder: relu4_4 Pearson 0.75 against FP32,
#   0.994 with it). TensorRT rejects the int32 bias DequantizeLinear, so the TensorRT backend refuses it.
INT8_LAYOUTS: dict[str, dict[str, Any]] = {
    "tensorrt": {"extra": {"OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS), **TENSORRT_OPTIONS},
                 "reduce_range": False},
    "cpu": {"extra": {}, "reduce_range": True},
}


class QuantizationError(RuntimeError):
    """Quantisation failed or produced a graph that breaks the INT8 contract."""


class ArrayReader(CalibrationDataReader):
    """Feeds a list of ``{input name: array}`` batches (batch 1) to the calibrator."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def tail_node_names(model: onnx.ModelProto, float_nodes: Iterable[str] = ()) -> list[str]:
    """Nodes between the last weighted layer and a float consumer: a graph output or one of
    ``float_nodes`` (the FP32 islands). Walks back from those until a weighted layer."""
    floats = set(float_nodes)
    producer = {o: n for n in model.graph.node for o in n.output}
    boundary = {o.name for o in model.graph.output}
    boundary |= {i for n in model.graph.node if n.name in floats for i in n.input}
    tail: set[str] = set()
    stack = [producer[t] for t in boundary if t in producer]
    while stack:
        node = stack.pop()
        if node.op_type in WEIGHTED_OPS or node.name in tail or node.name in floats:
            continue
        tail.add(node.name)
        stack += [producer[i] for i in node.input if i in producer]
    return [n.name for n in model.graph.node if n.name in tail]


def excluded_nodes(model: onnx.ModelProto, extra: Iterable[str] = ()) -> list[str]:
    floats = set(fp32_node_names(model)) | set(extra)
    return sorted(floats | set(tail_node_names(model, floats)))


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_feeds: Sequence[dict[str, np.ndarray]],
                  method: str = "minmax", exclude: Iterable[str] = (), preprocess: bool = True,
                  percentile: float = 99.999, layout: str = "tensorrt",
                  reduce_range: bool | None = None) -> onnx.ModelProto:
    """Quantise ``fp32_path`` to ``out_path`` from ``calib_feeds``; returns the model.

    ``preprocess`` runs ``quant_pre_process`` (shape inference and ORT's basic graph clean-up,
    which ORT recommends before static quantisation); the exclusion list is computed on the
    pre-processed graph, so renamed or folded nodes can't slip through. ``reduce_range`` (7-bit
    weights) defaults to the layout's choice.
    """
    if method not in CALIB_METHODS:
        raise QuantizationError(f"unknown calibration method {method!r}; choose one of {sorted(CALIB_METHODS)}")
    if not calib_feeds:
        raise QuantizationError("INT8 calibration needs at least one image")
    if layout not in INT8_LAYOUTS:
        raise QuantizationError(f"unknown INT8 layout {layout!r}; choose one of {sorted(INT8_LAYOUTS)}")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(fp32_path)
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
            source = pre
        model = onnx.load(str(source))
        excluded = excluded_nodes(model, exclude)
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True, **INT8_LAYOUTS[layout]["extra"]}
        if method == "percentile":
            extra["CalibPercentile"] = percentile
        try:
            quantize_static(str(source), str(out_path), ArrayReader(calib_feeds), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            reduce_range=INT8_LAYOUTS[layout]["reduce_range"] if reduce_range is None else reduce_range,
                            nodes_to_exclude=excluded, calibrate_method=CALIB_METHODS[method],
                            calibration_providers=["CPUExecutionProvider"], extra_options=extra)
        except Exception as exc:  # noqa: BLE001 - re-raised with the graph's name
            raise QuantizationError(f"{Path(fp32_path).name}: quantize_static failed: {exc}") from exc
        quantized = onnx.load(str(out_path))
        floats_read_float(quantized, excluded)
        drop_dead_nodes(quantized.graph)
        onnx.save(quantized, str(out_path))
    check_symmetric(quantized, out_path.name)
    onnx.checker.check_model(quantized)
    return quantized


def floats_read_float(model: onnx.ModelProto, float_nodes: Iterable[str]) -> None:
    """Let excluded (float) nodes read the unquantised tensor where the quantiser routed them
    through a Q/DQ pair added for a quantised sibling consumer: GANomaly's z feeds both the INT8
    generator and the FP32 latent distance, which must not see z rounded to 8 bits."""
    floats = set(float_nodes)
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in floats:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]


def qdq_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def quantized_nodes(model: onnx.ModelProto) -> list[str]:
    """Weighted nodes that read a DequantizeLinear output (i.e. run in INT8 on an INT8 backend)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in WEIGHTED_OPS and n.input and n.input[0] in dq_out]


def check_symmetric(model: onnx.ModelProto, name: str = "graph") -> None:
    """Every Q/DQ zero point is 0 (symmetric): TensorRT rejects anything else."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is not None and np.any(numpy_helper.to_array(zp) != 0):
            raise QuantizationError(f"{name}: {node.name} has a non-zero zero point (asymmetric quantisation)")


# ---------------------------------------------------------------- per-component certification
# A component's reduced-precision graph is kept when, substituted alone into the FP32 chain, the
# detector's outputs on the calibration images stay close to FP32's. Errors are measured against
# the spread of the FP32 outputs over those normal images (std over images for the score, over all
# pixels for the map): a score error well inside the normal-to-normal spread cannot move the
# threshold decision much, and a map error well under the map's own contrast can't move regions.
# The same bounds for both reduced precisions; FP16 normally passes them by orders of magnitude.
COMPONENT_TOLERANCE = {
    precision: {
        "score_max_rel_spread": 0.25,  # max |Δscore| / std(FP32 scores)
        "map_mean_rel_spread": 0.10,  # mean |Δmap| / std(FP32 map values)
        "map_min_pearson": 0.98,  # Pearson r of the maps, all pixels
    }
    for precision in ("int8", "fp16")
}
FALLBACK_ORDER = {"int8": ("int8", "fp16", "fp32"), "fp16": ("fp16", "fp32")}
# Where a component that fails INT8 goes: FP32 for CPU stations (ONNX Runtime's CPU provider and
# OpenVINO run an FP16 graph through Casts, slower than FP32), FP16 for GPU stations (TensorRT).
INT8_FALLBACKS = {"fp32": ("int8", "fp32"), "fp16": ("int8", "fp16", "fp32")}


def open_sessions(paths: dict[str, Path]) -> dict[str, object]:
    import onnxruntime as ort

    return {name: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for name, p in paths.items()}


def run_chain(components: Sequence[dict], sessions: dict[str, object], image: np.ndarray) -> dict[str, np.ndarray]:
    """Run component graphs one after another (``components``: manifest entries with the wiring),
    through the one wiring interpreter; returns every named tensor."""
    nodes = [Node.from_dict(c) for c in components]
    return run_wiring(nodes, {IMAGE: image},
                      lambda node, args: sessions[node.name].run(list(node.outputs), dict(zip(node.inputs, args))))  # type: ignore[attr-defined]


def output_errors(ref: Sequence[dict[str, np.ndarray]], got: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """The component criterion's numbers (see :data:`COMPONENT_TOLERANCE`)."""
    s_ref = np.array([r[SCORE].reshape(-1)[0] for r in ref], dtype=np.float64)
    s_got = np.array([g[SCORE].reshape(-1)[0] for g in got], dtype=np.float64)
    m_ref = np.stack([r[ANOMALY_MAP] for r in ref]).astype(np.float64).ravel()
    m_got = np.stack([g[ANOMALY_MAP] for g in got]).astype(np.float64).ravel()
    s_spread = max(float(s_ref.std()), 1e-12)
    m_spread = max(float(m_ref.std()), 1e-12)
    finite = bool(np.isfinite(s_got).all() and np.isfinite(m_got).all())
    pearson = float(np.corrcoef(m_ref, m_got)[0, 1]) if m_ref.std() > 0 and m_got.std() > 0 else float(np.allclose(m_ref, m_got))
    return {"score_max_abs": float(np.abs(s_got - s_ref).max()) if finite else float("inf"),
            "score_max_rel_spread": float(np.abs(s_got - s_ref).max() / s_spread) if finite else float("inf"),
            "map_mean_rel_spread": float(np.abs(m_got - m_ref).mean() / m_spread) if finite else float("inf"),
            "map_pearson": pearson if finite else float("nan"), "finite": finite}


def within_tolerance(err: dict[str, float], precision: str = "int8") -> bool:
    t = COMPONENT_TOLERANCE[precision]
    return bool(err["finite"] and err["score_max_rel_spread"] <= t["score_max_rel_spread"]
                and err["map_mean_rel_spread"] <= t["map_mean_rel_spread"] and err["map_pearson"] >= t["map_min_pearson"])


def select_precisions(out_dir: Path, components: Sequence[dict], images: np.ndarray, target: str = "int8",
                      method: str = "minmax", make_fp16: Callable[[Path, Path], object] | None = None,
                      fallback: str = "fp16", layout: str = "tensorrt") -> dict:
    """Build each component's ``target`` graph and keep it where it passes, else fall back
    (int8 -> ``fallback`` -> fp32; :data:`INT8_FALLBACKS`). ``make_fp16(fp32_path, fp16_path)``
    writes an FP16 graph on demand.

    Returns ``{"choice": {comp: precision}, "files": {comp: filename}, "components": {comp:
    report}}``. Graphs written here and not chosen are deleted again.
    """
    fp32 = {c["name"]: out_dir / f"{c['name']}.fp32.onnx" for c in components}
    sessions = open_sessions(fp32)
    feeds = [image[None].astype(np.float32) for image in images]
    ref = [run_chain(components, sessions, x) for x in feeds]
    report: dict[str, dict] = {}
    choice: dict[str, str] = {}
    for comp in components:
        name = comp["name"]
        trials: dict[str, dict] = {}
        created: list[Path] = []
        order = INT8_FALLBACKS[fallback] if target == "int8" else FALLBACK_ORDER[target]
        for precision in order:
            path = out_dir / f"{name}.{precision}.onnx"
            if precision == "fp32":
                trials["fp32"] = {"pass": True}
                break
            if precision == "int8":
                created.append(path)
                model = quantize_int8(fp32[name], path, [{n: r[n] for n in comp["inputs"]} for r in ref], method,
                                      layout=layout)
                nodes = quantized_nodes(model)
                if not nodes:  # an FP32 island (an L1/SSIM scorer): keep the FP32 graph
                    trials["int8"] = {"pass": False, "reason": "no quantisable layers (FP32 island)"}
                    trials["fp32"] = {"pass": True}
                    break
            elif not path.exists():
                created.append(path)
                if make_fp16 is None:
                    raise QuantizationError(f"component {name!r} needs an FP16 fallback but no make_fp16 was given")
                make_fp16(fp32[name], path)
            trial_sessions = {**sessions, **open_sessions({name: path})}
            err = output_errors(ref, [run_chain(components, trial_sessions, x) for x in feeds])
            trials[precision] = {**err, "pass": within_tolerance(err, precision)}
            if precision == "int8":
                trials["int8"]["quantized_layers"] = len(nodes)
            if trials[precision]["pass"]:
                break
        choice[name] = next(p for p, t in trials.items() if t["pass"])
        for path in created:
            if path.exists() and path.name != f"{name}.{choice[name]}.onnx":
                path.unlink()
        report[name] = {"precision": choice[name], "trials": trials}
    return {"choice": choice, "files": {n: f"{n}.{p}.onnx" for n, p in choice.items()}, "components": report}
