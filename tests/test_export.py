"""Export: ONNX FP32 parity for every detector, fused == chained components, FP16 islands, INT8
Q/DQ contract and fallbacks, bundle integrity, device certificates, latency benchmark."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgead.certify.parity import TOLERANCES, noise_floor
from edgead.core.bundle import BundleError, load_bundle
from edgead.models import registry
from edgead.core.contract import IMAGE, OUTPUT_NAMES
from edgead.models.base import TrainConfig
from edgead.export.onnx_export import ExportError, export_detector

SIZE = 32
torch.set_num_threads(2)


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _tiny(name: str):
    torch.manual_seed(0)  # the same random weights whichever tests ran before (the FP32 bound is tight)
    return registry.create(name, image_size=SIZE, width=8).eval()


# -- FP32 export of every registered detector -----------------------------------------------------

@pytest.mark.parametrize("name", registry.available())
def test_fp32_export_matches_torch(name: str, tmp_path: Path) -> None:
    detector = _tiny(name)
    if not detector.exportable:
        with pytest.raises(ExportError, match="not exportable: .+") as err:
            export_detector(detector, tmp_path)
        assert name in str(err.value) and "torch backend" in str(err.value)
        parts = export_detector(detector, tmp_path, fused=False)  # its components still export
        assert parts["graphs"] and all((tmp_path / g["fp32"]).is_file() for g in parts["graphs"].values())
        return
    info = export_detector(detector, tmp_path, components=[])
    x = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        score, amap = detector(x)
        score64, amap64 = copy.deepcopy(detector).double()(x.double())
    got = _ort(tmp_path / info["graphs"]["detector"]["fp32"], {IMAGE: x.numpy()})
    ref = {"score": score.numpy(), "anomaly_map": amap.numpy()}
    ref64 = {"score": score64.numpy(), "anomaly_map": amap64.numpy()}
    # The certificate's FP32 rule: |Δ| ≤ 1e-4 (scores: relative), or no further from the float64
    # model than 2x PyTorch FP32 is (variances in SSIM/AdaIN round that much in FP32 anyway).
    floor = noise_floor(ref, got, ref64, TOLERANCES["fp32"]["noise_floor_factor"])
    assert np.abs(got["anomaly_map"] - ref["anomaly_map"]).max() <= 1e-4 or floor["anomaly_map"], floor
    assert (np.abs(got["score"] - ref["score"]) <= 1e-4 * np.abs(ref["score"])).all() or floor["score"], floor
    assert not detector.training  # export must leave the caller's module in eval mode


@pytest.mark.parametrize("name", ["ganomaly", "ssim_ae"])
def test_fused_graph_equals_chained_components(name: str, tmp_path: Path) -> None:
    from edgead.export.int8 import open_sessions, run_chain

    info = export_detector(_tiny(name), tmp_path)
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    fused = _ort(tmp_path / "detector.fp32.onnx", {IMAGE: x})
    sessions = open_sessions({c["name"]: tmp_path / f"{c['name']}.fp32.onnx" for c in info["components"]})
    chained = run_chain(info["components"], sessions, x)
    for out in OUTPUT_NAMES:
        assert np.abs(fused[out] - chained[out]).max() <= 1e-5
    # each component graph declares exactly its wiring
    for comp in info["components"]:
        model = onnx.load(str(tmp_path / f"{comp['name']}.fp32.onnx"))
        assert [i.name for i in model.graph.input] == comp["inputs"]
        assert [o.name for o in model.graph.output] == comp["outputs"]


def test_fp16_keeps_fp32_islands_and_io(tmp_path: Path) -> None:
    from edgead.export.fp16 import FP32_MARKER, export_fp16

    export_detector(_tiny("ganomaly"), tmp_path, components=[])
    model = onnx.shape_inference.infer_shapes(export_fp16(tmp_path / "detector.fp32.onnx", tmp_path / "d16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                               *model.graph.output)}
    islands = [n for n in model.graph.node if FP32_MARKER in n.name and n.op_type != "Cast"]
    assert any("/head/fp32_map/" in n.name for n in islands) and any("/head/fp32_score/" in n.name for n in islands)
    for node in islands:
        for tensor in (*node.input, *node.output):
            if tensor in types:
                assert types[tensor] != onnx.TensorProto.FLOAT16, f"{node.name}: {tensor} is FP16"
    assert all(types[v.name] == onnx.TensorProto.FLOAT for v in (*model.graph.input, *model.graph.output))
    assert any(t == onnx.TensorProto.FLOAT16 for t in types.values())  # the convolutions did convert
    x = np.random.default_rng(1).random((1, 3, SIZE, SIZE), dtype=np.float32)
    out = _ort(tmp_path / "d16.onnx", {IMAGE: x})  # ORT CPU loads and runs it
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in out.values())


@pytest.mark.parametrize("scorer", ["l1", "ssim", "vgg"])
def test_fp16_keeps_the_score_head_fp32(scorer: str, tmp_path: Path) -> None:
    """In the FP16 head graph nothing of the map or score function runs FP16, except the VGG
    map's own convolutions (and the pooling and concatenation between them)."""
    import warnings

    from edgead.export.fp16 import FP32_MARKER, export_fp16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG features
        detector = registry.create("ganomaly", image_size=SIZE, width=8, scorer=scorer).eval()
    export_detector(detector, tmp_path, fused=False, components=["head"])
    model = onnx.shape_inference.infer_shapes(export_fp16(tmp_path / "head.fp32.onnx", tmp_path / "head.fp16.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                               *model.graph.output)}
    half = [n for n in model.graph.node if n.op_type != "Cast"
            and any(types.get(t) == onnx.TensorProto.FLOAT16 for t in (*n.input, *n.output))]
    if scorer == "vgg":
        assert {n.op_type for n in half} <= {"Conv", "Relu", "MaxPool", "Concat", "Pad"}
        assert any(n.op_type == "Conv" for n in half) and all(FP32_MARKER not in n.name for n in half)
    else:
        assert not half, [n.name for n in half]
    reductions = [n for n in model.graph.node if n.op_type in ("ReduceMean", "ReduceSum", "TopK", "Pow", "Sqrt",
                                                                 "Div", "Abs", "Resize")]
    assert reductions and all(FP32_MARKER in n.name for n in reductions)
    rng, shapes = np.random.default_rng(2), detector.component_shapes()
    feeds = {i.name: rng.random(shapes[i.name], dtype=np.float32) for i in model.graph.input}
    want, got = _ort(tmp_path / "head.fp32.onnx", feeds), _ort(tmp_path / "head.fp16.onnx", feeds)
    tol = 1e-2 if scorer == "vgg" else 1e-6  # all-FP32 heads agree to rounding
    for name in OUTPUT_NAMES:
        assert np.abs(want[name] - got[name]).max() <= tol * max(1.0, np.abs(want[name]).max())


def test_int8_graph_is_symmetric_qdq(tmp_path: Path) -> None:
    from edgead.export.fp16 import FP32_MARKER
    from edgead.export.int8 import quantize_int8, quantized_nodes

    export_detector(_tiny("ganomaly"), tmp_path, components=[])
    rng = np.random.default_rng(0)
    feeds = [{IMAGE: rng.random((1, 3, SIZE, SIZE), dtype=np.float32)} for _ in range(4)]
    model = quantize_int8(tmp_path / "detector.fp32.onnx", tmp_path / "d8.onnx", feeds)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and quantized_nodes(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = {n.op_type + ":" + n.input[0]: inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    assert zero_points and all(np.all(z == 0) for z in zero_points.values())  # symmetric
    # activations and weights are int8 (biases are int32, as QDQ stores them)
    assert {z.dtype for k, z in zero_points.items() if k.startswith("Quantize")} == {np.dtype(np.int8)}
    # FP32 islands read unquantised tensors
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not [n.name for n in model.graph.node if FP32_MARKER in n.name and set(n.input) & dq_outputs]
    assert np.isfinite(_ort(tmp_path / "d8.onnx", feeds[0])["score"]).all()


# -- a small trained SSIM-AE, exported at every precision ----------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    from edgead.data.synth import SynthSpec, generate
    from edgead.data.source import DataSource
    from edgead.training.trainer import train_run
    from edgead.export.bundle_writer import export_run

    tmp = tmp_path_factory.mktemp("export")
    data = generate(tmp / "data", ["washer"], SynthSpec(image_size=SIZE, n_train=20, n_test_good=6,
                                                          n_test_per_defect=1, seed=0))
    run = train_run("ssim_ae", DataSource.mvtec(data, "washer"), tmp / "run", image_size=SIZE, config={"width": 8, "latent_dim": 16},
                    train=TrainConfig(epochs=2, batch_size=8, device="cpu"), progress=False)
    bundle = export_run(run, tmp / "bundle", precisions=("fp32", "fp16", "int8"), calib_count=12)
    return {"data": data, "run": run, "bundle": bundle, "tmp": tmp}


def test_bundle_manifest(trained) -> None:
    b = load_bundle(trained["bundle"])
    m = b.manifest
    assert m["detector"] == "ssim_ae" and m["source_run"] == str(Path(trained["run"]).resolve())
    assert m["input"]["shape"] == [1, 3, SIZE, SIZE] and m["input"]["color"] == "RGB" and m["input"]["range"] == [0, 1]
    assert m["input"]["resize"] and len(m["input"]["mean"]) == 3 and m["input"]["normalization"]
    assert [o["name"] for o in m["outputs"]] == list(OUTPUT_NAMES)
    assert m["calibration"]["image_threshold"] == b.calibration.image_threshold
    assert [c["name"] for c in m["components"]] == ["autoencoder", "head"]
    for graph in ("detector", "autoencoder", "head"):
        assert set(b.precisions(graph)) == {"fp32", "fp16", "int8"}
    for comp, used in m["precision_fallbacks"].get("int8", {}).items():
        assert m["graphs"][comp]["int8"] == f"{comp}.{used}.onnx"
    report = m["quantization"]["int8"]
    assert report["method"] == "minmax" and report["images"] == 12
    assert report["components"]["head"]["precision"] == "fp32"  # the SSIM head is an FP32 island: nothing to quantise


def test_reduced_precision_engines_meet_tolerances(trained) -> None:
    from edgead.bench import certify_against_run
    from edgead.certify.parity import load_data
    from edgead.certify.rules import MIN_DECISIVE

    meta = json.loads((Path(trained["run"]) / "config.json").read_text())
    images, masks, labels, desc = load_data(trained["bundle"], trained["data"], "washer", meta)
    report = certify_against_run(trained["bundle"], images, masks, labels, trained["run"], data=desc)
    assert len(images) < MIN_DECISIVE
    for key in ("onnxruntime/fp32", "onnxruntime/fp16", "onnxruntime/int8"):
        r = report["results"][key]
        checks = r["checks"]
        # the numbers meet their tolerances...
        assert checks["finite"], key
        assert all(checks.get(c) in (True, None) for c in ("map_max_abs", "score_max_rel", "image_auroc", "pixel_auroc")), (key, checks)
        # ...but a handful of validation + test images cannot certify the verdicts: the rule says so
        assert checks["enough_decisive_images"] is False and not r["pass"]
        assert r["end"]["n_decisive"] + r["end"]["n_in_band"] == len(images)
        cert = json.loads(Path(r["certificate"]).read_text())  # this device's certificate, beside the graph
        assert cert["pass"] is False and cert["data"] == desc and cert["precision"] == key.split("/")[1]
        assert Path(r["certificate"]).parent == Path(trained["bundle"])
    load_bundle(trained["bundle"])  # certificates are not part of the checksummed bundle


def test_parity_cli_writes_json_and_certificate(trained, tmp_path: Path) -> None:
    from edgead.bench import parity_main as main

    bundle = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], bundle, ignore=shutil.ignore_patterns("*.cert.json"))
    cache = bundle / "detector.fp32.trt-cache.engine"  # what TensorRT leaves beside the graphs
    cache.write_bytes(b"plan v1")
    out = tmp_path / "parity.json"
    rc = main([str(bundle), "--precision", "fp32", "--out", str(out)])  # against the golden outputs
    assert rc == 0
    report = json.loads(out.read_text())
    stats = report["results"]["onnxruntime/fp32"]
    assert {"max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel", "mean_rel", "elementwise_pass_rate"} <= set(stats["anomaly_map"])
    assert {"map_pearson", "score_spearman", "delta_image_auroc", "delta_pixel_auroc", "verdict_agreement",
            "band", "n_decisive", "flips_in_band", "flips_outside_band"} <= set(stats["end"])
    cert = json.loads(Path(stats["certificate"]).read_text())
    assert cert["pass"] and cert["date"] and cert["n_images"] == report["n_images"] == 48
    # neither the certificate nor the build cache is in the checksummed files, so a rebuilt
    # engine or a new certificate doesn't "tamper" the bundle
    files = load_bundle(bundle).spec.files
    assert cache.name not in files and Path(stats["certificate"]).name not in files
    cache.write_bytes(b"plan v2")
    load_bundle(bundle)
    assert main([str(bundle), "--data", str(trained["data"]), "--category", "washer"]) == 2  # needs --against-run


def test_tampered_bundle_is_refused(trained, tmp_path: Path) -> None:
    from edgead.engines import open_engine

    bundle = tmp_path / "bundle"
    shutil.copytree(trained["bundle"], bundle)
    graph = bundle / "head.fp16.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="head.fp16.onnx: checksum mismatch"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="head.fp16.onnx"):
        open_engine(bundle)


def test_missing_graph_or_precision_is_a_clear_error(trained, tmp_path: Path) -> None:
    from edgead.engines import open_engine

    with pytest.raises(BundleError, match="no component 'vgg'"):
        open_engine(trained["bundle"], graph="vgg")
    fp32_only = tmp_path / "fp32"
    from edgead.export.bundle_writer import export_run

    export_run(trained["run"], fp32_only)
    with pytest.raises(BundleError, match=r"no int8 graph.*--precision int8"):
        open_engine(fp32_only, precision="int8")


def test_export_refuses_an_uncalibrated_run(trained, tmp_path: Path) -> None:
    from edgead.export.bundle_writer import main

    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    (run / "calibration.json").unlink()
    with pytest.raises(ExportError, match="no calibration"):
        from edgead.export.bundle_writer import export_run

        export_run(run, tmp_path / "b")
    assert main([str(run), "--out", str(tmp_path / "b2")]) == 2


def test_latency_benchmark_reports_torch_baseline_and_ratios(trained, tmp_path: Path) -> None:
    from edgead.bench import latency_main as main

    out = tmp_path / "latency.json"
    assert main([str(trained["bundle"]), "--precision", "fp32", "int8", "--iterations", "3",
                 "--warmup-ms", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["baseline"]["backend"] == "torch" and report["baseline"]["latency_ms"]["median"] > 0
    for key in ("onnxruntime/fp32", "onnxruntime/int8"):
        r = report["results"][key]
        assert r["iterations"] == 3 and r["speedup_vs_torch"]["median"] > 0
        assert set(r["latency_ms"]) >= {"min", "mean", "median", "p90", "p95", "p99"}
        assert abs(sum(c["share"] for c in r["components"].values()) - 1) < 1e-6


def test_int8_component_that_fails_falls_back(trained, tmp_path: Path, monkeypatch) -> None:
    import edgead.export.int8 as int8
    from edgead.data.datasets import load_arrays, mvtec_samples
    from edgead.export.fp16 import export_fp16

    out = tmp_path / "graphs"
    out.mkdir()
    manifest = load_bundle(trained["bundle"]).manifest
    for comp in manifest["components"]:
        shutil.copy(trained["bundle"] / f"{comp['name']}.fp32.onnx", out)
    images, _, _ = load_arrays(mvtec_samples(trained["data"], "washer", "train")[:6], SIZE, 3)
    monkeypatch.setitem(int8.COMPONENT_TOLERANCE["int8"], "score_max_rel_spread", -1.0)  # INT8 can't pass
    selected = int8.select_precisions(out, manifest["components"], images, "int8", make_fp16=export_fp16)
    assert selected["choice"] == {"autoencoder": "fp16", "head": "fp32"}
    trials = selected["components"]["autoencoder"]["trials"]
    assert not trials["int8"]["pass"] and trials["int8"]["quantized_layers"] > 0
    assert not (out / "autoencoder.int8.onnx").exists()  # the rejected graph is not left behind
    assert (out / "autoencoder.fp16.onnx").is_file()


def test_engine_options_and_errors(trained, tmp_path: Path) -> None:
    from edgead.engines import EngineError, open_engine
    from edgead.engines.ort_engine import resolve_providers

    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineError, match="onnxruntime-gpu"):
            open_engine(trained["bundle"], providers="cuda")
    engine = open_engine(trained["bundle"], "onnxruntime", "fp16", graph="autoencoder", intra_op_num_threads=1)
    assert [s.name for s in engine.inputs] == ["image"] and [s.name for s in engine.outputs] == ["reconstruction"]
    with pytest.raises(EngineError, match="shape"):
        engine.run({"image": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(EngineError, match="unknown backend 'openvion'.*openvino"):
        open_engine(trained["bundle"], "openvion")  # a typo: the error lists the real ones
    from edgead.training.reference import TorchEngine

    torch_engine = TorchEngine.from_run(trained["run"])
    out = torch_engine.run({"image": np.full((1, 3, SIZE, SIZE), 0.5, np.float32)})
    assert out["score"].shape == (1,) and out["anomaly_map"].shape == (1, 1, SIZE, SIZE)
