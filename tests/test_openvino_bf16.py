"""OpenVINO BF16 (issue 15): the FP32 graph at BF16 inference precision with its FP32 islands kept f32,
a bundle's detector as a chain of its components, its own certificates, and ``--precision auto``.

On a CPU without BF16 in hardware the precision is refused and not offered; the tests that need
BF16 compute skip there."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bundles import tiny_bundle  # noqa: E402

ov = pytest.importorskip("openvino")
torch = pytest.importorskip("torch")

HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU computes no BF16 (no AVX512-BF16 or AMX-BF16)")
SIZE = 32


def _normal(n: int, offset: int = 0) -> np.ndarray:
    from edgead.data.images import to_model_input
    from edgead.data.synth import sample

    return np.stack([to_model_input(sample("metal", offset + i, size=SIZE, stream="train")[0], SIZE, 3)
                     for i in range(n)])


@pytest.fixture(scope="module")
def patchcore_bundle(tmp_path_factory) -> Path:
    """A PatchCore (random VGG-19, relu3_4) fitted on 6 normal parts and exported FP32 with its golden set."""
    from edgead.export.bundle_writer import export_run
    from edgead.models.base import TrainConfig
    from edgead.training.trainer import train_from_arrays

    root = tmp_path_factory.mktemp("bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random backbone warns, as it should
        run = train_from_arrays("patchcore", _normal(6), _normal(8, offset=100), root / "run",
                                config={"vgg_weights": "random", "coreset_ratio": 0.1}, progress=False,
                                meta={"data": {"layout": "synthetic", "category": "metal"}},
                                train=TrainConfig(epochs=1, batch_size=4))
        return Path(export_run(run, root / "bundle", precisions=["fp32"]))


def test_every_fp32_op_of_the_fp16_export_is_mapped_to_openvino() -> None:
    from edgead.engines.openvino_engine import FP32_OPS_OV
    from edgead.export.fp16 import FP32_OPS

    assert set(FP32_OPS_OV) == set(FP32_OPS)


@needs_bf16
def test_precise_islands_run_fp32_and_the_rest_bf16(tmp_path: Path) -> None:
    from edgead.engines.openvino_engine import OpenVinoEngine

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fp32_normalize = torch.nn.Conv2d(3, 3, 1)
            self.body = torch.nn.Conv2d(3, 32, 3, padding=1)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.body(self.fp32_normalize(image))

    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.rand(1, 3, 16, 16),), str(path), input_names=["image"],
                      output_names=["out"], opset_version=17, dynamo=False)
    engine = OpenVinoEngine(path, precision="bf16", threads=1, cache=False)
    ran = {}
    for op in engine.compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if rt["layerType"].astype(str) == "Convolution":
            ran[rt["originalLayersNames"].astype(str)] = rt["runtimePrecision"].astype(str)
    assert engine.inference_precision == "bf16" and engine.fp32_islands
    assert {("fp32_normalize" in k, v) for k, v in ran.items()} == {(True, "f32"), (False, "bf16")}, ran


@needs_bf16
def test_a_graph_whose_island_openvino_runs_in_bf16_is_refused(tmp_path: Path) -> None:
    from edgead.engines.openvino_engine import IslandInBf16, OpenVinoEngine

    class Search(torch.nn.Module):  # PatchCore's one-stage search: the GEMM inside the FP32 island
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("bank", torch.rand(512, 64))

        def forward(self, queries: torch.Tensor) -> torch.Tensor:
            return (queries.pow(2).sum(-1, keepdim=True) - 2.0 * queries @ self.bank.t()
                    + self.bank.pow(2).sum(1)).topk(1, dim=-1, largest=False).values

    class Memory(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fp32_knn = Search()

        def forward(self, queries: torch.Tensor) -> torch.Tensor:
            return self.fp32_knn(queries)

    path = tmp_path / "search.onnx"
    torch.onnx.export(Memory().eval(), (torch.rand(1, 256, 64),), str(path), input_names=["queries"],
                      output_names=["best"], opset_version=17, dynamo=False)
    # the island's MatMul becomes a FullyConnected that ignores the attribute
    with pytest.raises(IslandInBf16, match="search.onnx: OpenVINO runs FP32 island op.*in BF16"):
        OpenVinoEngine(path, precision="bf16", cache=False)


@needs_bf16
def test_the_bank_is_ranked_in_bf16_and_measured_in_fp32(patchcore_bundle: Path) -> None:
    """PatchCore's memory: the ranking GEMM runs in BF16 (AMX or AVX512-BF16), the exact distances of
    its candidates in FP32, so on BF16-representable patches the distances are FP32's."""
    import onnx

    from edgead.engines.openvino_engine import OpenVinoEngine

    path = patchcore_bundle / "memory.fp32.onnx"
    engine = OpenVinoEngine(path, precision="bf16", threads=1, cache=False)
    fp32 = OpenVinoEngine(path, precision="fp32", threads=1, cache=False)
    ran = {}
    for op in engine.compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        ran[op.get_friendly_name()] = (rt["layerType"].astype(str), rt["runtimePrecision"].astype(str))
    assert any("/candidates/" in k and v == ("FullyConnected", "bf16") for k, v in ran.items()), ran
    island = {k: v for k, v in ran.items() if "fp32_knn" in k}
    assert any(t in ("Subgraph", "ReduceSum") for t, _ in island.values()), ran
    assert all(p != "bf16" for _, p in island.values()), island
    shape = next(spec.shape for spec in engine.inputs if spec.name == "patches")
    arrays = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    bank = next(a for a in arrays if a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == shape[1])
    rng = np.random.default_rng(0)  # queries near bank rows, as normal patches are
    picks = bank[rng.integers(len(bank), size=shape[2] * shape[3])]
    queries = picks + 0.05 * np.abs(picks).mean() * rng.standard_normal(picks.shape).astype(np.float32)
    patches = torch.from_numpy(np.ascontiguousarray(queries.T.reshape(shape))).bfloat16().float().numpy()
    got, want = engine.run({"patches": patches}), fp32.run({"patches": patches})
    np.testing.assert_allclose(got["patch_distance"], want["patch_distance"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["support_distance"], want["support_distance"], rtol=1e-5, atol=1e-6)
    engine.close()
    fp32.close()


@needs_bf16
def test_bf16_chain_certifies_apart_from_fp32(patchcore_bundle: Path) -> None:
    from edgead.certify.certificate import find_certificate
    from edgead.certify.parity import certify_golden
    from edgead.core.bundle import load_bundle
    from edgead.engines import engine_precisions, open_engine
    from edgead.engines.openvino_chain import OpenVinoChain

    bundle = load_bundle(patchcore_bundle)
    assert engine_precisions(bundle, "openvino") == ["fp32", "bf16"]
    assert engine_precisions(bundle, "onnxruntime") == ["fp32"]
    chain = open_engine(bundle, "openvino", "bf16", threads=1, cache=False)
    assert isinstance(chain, OpenVinoChain)
    assert chain.component_precisions["encoder"] == "bf16" and chain.component_precisions["memory"] == "bf16"
    assert not chain.fallbacks, chain.fallbacks
    fp32 = open_engine(bundle, "openvino", "fp32", threads=1, cache=False)
    image = {"image": _normal(1, offset=300)}
    got, want = chain.run(image), fp32.run(image)
    assert set(got) == {"score", "anomaly_map"} and got["anomaly_map"].shape == want["anomaly_map"].shape
    rel = abs(float(got["score"][0]) - float(want["score"][0])) / abs(float(want["score"][0]))
    assert 0 < rel < 0.05  # really reduced, and close
    report = certify_golden(bundle, backends=("openvino",), precisions=("bf16",))
    stats = report["results"]["openvino/bf16"]
    assert stats["pass"], stats["checks"]
    assert ".fp32.bf16.openvino." in stats["certificate"]
    assert find_certificate(bundle, chain, "bf16").problem is None
    # the BF16 certificate unlocks BF16 only: FP32 is still uncertified on OpenVINO
    assert "no parity certificate" in find_certificate(bundle, fp32, "fp32").problem
    chain.close()
    fp32.close()


def test_bf16_is_openvino_only_and_refused_without_bf16_compute(patchcore_bundle: Path) -> None:
    from edgead.engines import EngineError, engine_precisions, open_engine
    from edgead.engines.openvino_engine import OpenVinoEngine

    with pytest.raises(EngineError, match="bf16 runs on --backend openvino only"):
        open_engine(patchcore_bundle, "onnxruntime", "bf16")
    if not HAS_BF16:
        from edgead.core.bundle import load_bundle

        assert "bf16" not in engine_precisions(load_bundle(patchcore_bundle), "openvino")
        with pytest.raises(EngineError, match="no BF16"):
            OpenVinoEngine(patchcore_bundle / "encoder.fp32.onnx", precision="bf16")


@needs_bf16
def test_precision_auto_considers_bf16_once_certified(patchcore_bundle: Path) -> None:
    from edgead.runtime.autotune import open_station_engine

    quiet = lambda *a: None  # noqa: E731
    _, engine, _, choices = open_station_engine(str(patchcore_bundle), "openvino", "auto", threads=1,
                                                certify="auto", say=quiet, warn=quiet)
    engine.close()
    candidates = choices["precision"]["candidates"]
    assert set(candidates) == {"fp32", "bf16"}
    assert all("median_ms" in c for c in candidates.values()), candidates  # both certified here at start-up
    assert engine.precision == min(candidates, key=lambda p: candidates[p]["median_ms"])


def test_tiny_bundle_bf16_parity_or_refusal(tmp_path_factory) -> None:
    """The SSIM-AE: its SSIM head is all FP32 island; the autoencoder runs BF16 where the CPU can."""
    from edgead.certify.parity import certify_golden

    bundle = tiny_bundle(tmp_path_factory.mktemp("tiny_bf16"), "washer")
    report = certify_golden(bundle, backends=("openvino",), precisions=("bf16",), write=False)
    stats = report["results"]["openvino/bf16"]
    if HAS_BF16:
        assert stats.get("pass"), stats
    else:
        assert "no BF16" in stats["skipped"]


def test_a_signal_after_openvino_engines_is_handled_not_a_crash(tmp_path_factory) -> None:
    """OpenVINO leaves an alternate signal stack on the thread that compiled a model; with AMX in use,
    SIGINT then killed the process with SIGSEGV (no summary). The engine puts the thread's own back."""
    import subprocess

    bundle = tiny_bundle(tmp_path_factory.mktemp("tiny_signal"), "washer")
    precision = "bf16" if HAS_BF16 else "fp32"
    script = f"""
import os, signal, sys, time
from edgead.certify.parity import certify_golden
report = certify_golden({str(bundle)!r}, backends=("openvino",), precisions=({precision!r},), write=False)
assert report["results"]["openvino/{precision}"]["pass"], report["results"]
got = []
signal.signal(signal.SIGINT, lambda *a: got.append(1))
os.kill(os.getpid(), signal.SIGINT)
time.sleep(0.2)
print("handled", got)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "handled [1]" in done.stdout, (done.returncode, done.stderr[-2000:])
