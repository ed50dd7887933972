"""The native per-frame core (cpp_bindings/, module edgead_native) against its NumPy/OpenCV twin.

Contract (cpp_bindings/README.md): preprocessing is bit-exact; smoothed and frame maps agree
within native.MAP_RTOL of the map's range; regions (bbox, area) and verdicts are identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.core.calibration import Calibration
from edgead.core.engine import SlottedEngine, TensorSpec
from edgead.core.postprocess import gaussian_kernel, regions, smooth, to_frame
from edgead.data.images import to_model_input
from edgead.runtime import native
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.preprocess import Preprocessor
from edgead.runtime.sources import EndOfStream, Source

try:
    import edgead_native
except ImportError:
    edgead_native = None
needs_native = pytest.mark.skipif(edgead_native is None or os.environ.get(native.ENV) == "0",
                                  reason="edgead_native is not built here (pip install ./cpp_bindings)")
ROOT = Path(__file__).resolve().parents[1]
CAL = Calibration(image_threshold=0.5, score_min=0.0, score_max=1.0, pixel_threshold=0.5, map_min=0.0,
                  map_max=1.0, n_images=10, quantile=0.99, pixel_quantile=0.999, sigma=4.0)


# -- preprocessing: bit-exact ---------------------------------------------------------------------

def _frame_sizes(rng: np.random.Generator, size: int) -> list[tuple[int, int]]:
    """Odd sizes that make the resize rule pick each of OpenCV's kernels."""
    s = size
    fixed = [(s, s), (2 * s, 2 * s), (3 * s, 2 * s), (s, 5 * s), (2 * s + 3, 3 * s + 1), (s // 2 + 1, s // 3 + 2),
             (s + 5, s // 2 + 1), (s // 2, s + 7), (s + 1, s), (1, 1), (2, 3 * s + 1)]
    drawn = [(int(rng.integers(2, 4 * s)), int(rng.integers(2, 4 * s))) for _ in range(12)]
    return fixed + drawn


def _views(rng: np.random.Generator, h: int, w: int, cn: int) -> list[np.ndarray]:
    """The same kind of frame as a contiguous array, a crop, a strided and a flipped view."""
    big = rng.integers(0, 256, (2 * h + 1, 3 * w + 2, cn), dtype=np.uint8)
    views = [np.ascontiguousarray(big[:h, :w]), big[1:h + 1, 2:w + 2], big[1::2, ::3][:h, :w], big[::-1, ::-1][:h, :w]]
    if cn == 3:
        views.append(big[:h, :w, ::-1])  # channel stride -1
        return views
    return [v[..., 0] for v in views] + [views[0]]  # HxW views, and HxWx1


@needs_native
@pytest.mark.parametrize("size,channels", [(64, 3), (37, 3), (128, 1), (256, 3)])
def test_preprocess_is_bit_exact(size, channels):
    rng = np.random.default_rng(size * 10 + channels)
    kinds = set()
    for h, w in _frame_sizes(rng, size):
        kinds.add(edgead_native.resize_kind(w, h, size, size))
        for cn in (1, 3):
            for frame in _views(rng, h, w, cn):
                reference = to_model_input(frame, size, channels, bgr=True)
                out = np.full((channels, size, size), np.nan, np.float32)
                edgead_native.preprocess_into(frame, out)
                assert np.array_equal(out, reference), (frame.shape, frame.strides, size, channels)
    assert kinds == {"copy", "area", "area_fast", "linear", "area_linear"}  # every kernel was exercised


@needs_native
@pytest.mark.parametrize("channels", [1, 3])
def test_every_byte_value_scales_exactly(channels):
    """v / 255 for all 256 values (the native core computes it without a division)."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for frame in (values, np.stack([values, values[::-1], values.T], axis=2)):
        out = np.empty((channels, 16, 16), np.float32)
        edgead_native.preprocess_into(frame, out)
        assert np.array_equal(out, to_model_input(frame, 16, channels, bgr=True))


@needs_native
def test_resize_matches_cv2_for_each_kernel():
    rng = np.random.default_rng(7)
    for (h, w, size) in [(480, 640, 128), (1080, 1920, 256), (512, 512, 256), (90, 60, 64), (300, 40, 64)]:
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        interp = cv2.INTER_AREA if (size < h or size < w) else cv2.INTER_LINEAR
        assert np.array_equal(edgead_native.resize_u8(frame, size, size),
                              cv2.resize(frame, (size, size), interpolation=interp)), (h, w, size)


@needs_native
def test_preprocessor_fills_the_slot_buffer_natively_and_falls_back_for_other_frames():
    size = 48
    pre, ref = Preprocessor(size, 3), Preprocessor(size, 3, use_native=False)
    assert pre.native and not ref.native
    slot = np.zeros((1, 3, size, size), np.float32)  # as SlottedEngine.host_inputs holds it
    rng = np.random.default_rng(3)
    for frame in (rng.integers(0, 256, (97, 131, 3), dtype=np.uint8),
                  rng.integers(0, 256, (30, 20), dtype=np.uint8),
                  rng.integers(0, 65536, (97, 131), dtype=np.uint16),    # 16-bit: Python path
                  rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)):   # BGRA: Python path
        expected = ref.into(frame, np.empty((3, size, size), np.float32))
        buffer = slot[0]
        assert pre.into(frame, buffer) is buffer
        assert np.array_equal(slot[0], expected), frame.shape
    half = np.zeros((3, size, size), np.float16)  # an FP16-input engine: Python path, cast
    assert np.array_equal(pre.into(frame, half), expected.astype(np.float16))


# -- post-processing: same regions, maps within tolerance ----------------------------------------

def _blob_map(size: int, blobs: list[tuple[float, float, float, float]], noise: float = 0.02) -> np.ndarray:
    """A map of Gaussian bumps (cy, cx, radius, height) on low noise."""
    rng = np.random.default_rng(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amap = rng.random((size, size), dtype=np.float32) * noise
    for cy, cx, r, height in blobs:
        amap += height * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)
    return amap.astype(np.float32)


MAPS = {
    "empty": (_blob_map(64, []), (480, 640)),
    "one_blob": (_blob_map(64, [(30, 20, 4, 1.5)]), (480, 640)),
    "border_blobs": (_blob_map(128, [(0, 0, 6, 2.0), (127, 64, 5, 1.8), (60, 127, 8, 1.2), (127, 127, 3, 3.0)]),
                     (720, 1280)),
    "many_small": (_blob_map(256, [(20 + 40 * i, 30 + 37 * j, 1.5, 1.2) for i in range(5) for j in range(6)]),
                   (1080, 1920)),
    "touching": (_blob_map(64, [(30, 28, 3, 1.4), (30, 37, 3, 1.4)]), (100, 75)),
}


@needs_native
@pytest.mark.parametrize("name", sorted(MAPS))
def test_postprocess_same_regions_and_verdicts(name):
    amap, frame_hw = MAPS[name]
    fast, ref = Postprocessor(CAL), Postprocessor(CAL, use_native=False)
    assert fast.native and not ref.native
    for score in (0.2, 0.9):
        a, b = fast(score, amap, frame_hw), ref(score, amap, frame_hw)
        assert (a.verdict, a.score, a.score_norm) == (b.verdict, b.score, b.score_norm)
        assert [(r.x, r.y, r.w, r.h, r.area) for r in a.regions] == [(r.x, r.y, r.w, r.h, r.area) for r in b.regions]
        span = float(b.frame_map.max() - b.frame_map.min()) or 1.0
        for ra, rb in zip(a.regions, b.regions):
            assert abs(ra.peak - rb.peak) <= native.MAP_RTOL * span
            assert abs(ra.mean - rb.mean) <= native.MAP_RTOL * span
        assert a.frame_map.shape == b.frame_map.shape == frame_hw
        np.testing.assert_allclose(a.frame_map, b.frame_map, rtol=0, atol=native.MAP_RTOL * span)
        assert a.to_dict().keys() == b.to_dict().keys()
    if name == "empty":
        assert a.regions == [] and b.regions == []
    if name == "border_blobs":
        touching = [r for r in b.regions if r.x == 0 or r.y == 0 or r.x + r.w == 1280 or r.y + r.h == 720]
        assert len(touching) == 4


@needs_native
@pytest.mark.parametrize("shape,sigma", [((64, 64), 4.0), ((128, 128), 2.0), ((256, 256), 4.0),
                                         ((33, 47), 3.3), ((7, 5), 1.5), ((100, 3), 8.0)])
def test_smoothing_and_frame_resize_within_tolerance(shape, sigma):
    rng = np.random.default_rng(shape[0] + shape[1])
    amap = rng.random(shape, dtype=np.float32) * 3.0
    reference = smooth(amap, sigma)
    ours = edgead_native.gaussian_blur(amap, gaussian_kernel(sigma))
    span = float(reference.max() - reference.min())
    np.testing.assert_allclose(ours, reference, rtol=0, atol=native.MAP_RTOL * span)
    np.testing.assert_allclose(edgead_native.resize_map(reference, 333, 251), to_frame(reference, 251, 333),
                               rtol=0, atol=native.MAP_RTOL * span)


@needs_native
def test_regions_match_connected_components_on_noisy_maps():
    """Many regions of equal area: the order must be OpenCV's label order, as the reference keeps it."""
    rng = np.random.default_rng(11)
    for trial in range(12):
        small = rng.random((64, 64), dtype=np.float32)
        height, width = int(rng.integers(2, 700)), int(rng.integers(2, 900))
        frame_map = to_frame(small, width, height)
        threshold = float(np.quantile(frame_map, [0.5, 0.9, 0.99][trial % 3]))
        expected = [(r.x, r.y, r.w, r.h, r.area) for r in regions(frame_map, threshold, min_area=2)]
        got = [tuple(r[:5]) for r in edgead_native.regions(small, height, width, threshold, 2)]
        assert got == expected


# -- the fallback -----------------------------------------------------------------------------------

_FALLBACK = """
import json, numpy as np
from edgead.core.calibration import Calibration
from edgead.runtime import native
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.preprocess import Preprocessor
cal = Calibration(0.5, 0.0, 1.0, 0.5, 0.0, 1.0, 10, 0.99, 0.999, 1.0)
pre, post = Preprocessor(32, 3), Postprocessor(cal)
out = pre.into(np.full((40, 50, 3), 255, np.uint8), np.zeros((3, 32, 32), np.float32))
amap = np.zeros((16, 16), np.float32); amap[4:9, 4:9] = 2.0
insp = post(0.9, amap, (64, 64))
print(json.dumps({"status": native.status(pre, post), "line": native.describe(pre, post), "ones": bool((out == 1).all()),
                  "regions": len(insp.regions), "map": list(insp.frame_map.shape)}))
"""


def _run_fallback(env_value: str | None, hide_module: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != native.ENV}
    if env_value is not None:
        env[native.ENV] = env_value
    code = ("import sys; sys.modules['edgead_native'] = None\n" if hide_module else "") + _FALLBACK
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env_value,hide_module,why", [("0", False, "EDGEAD_NATIVE=0"), (None, True, "not built")])
def test_fallback_path_runs_when_native_is_off_or_missing(env_value, hide_module, why):
    got = _run_fallback(env_value, hide_module)
    assert got["status"]["preprocess"] is False and got["status"]["postprocess"] is False
    assert why in got["status"]["module"] and "NumPy/OpenCV path" in got["line"]
    assert got["ones"] and got["regions"] == 1 and got["map"] == [64, 64]


@needs_native
def test_native_is_used_and_reported_when_built():
    got = _run_fallback(None, False)
    assert got["status"]["preprocess"] is True and got["status"]["postprocess"] is True
    assert got["line"].startswith("native core: preprocess + postprocess")
    assert got["ones"] and got["regions"] == 1 and got["map"] == [64, 64]


# -- the pipeline: both paths give the same records -------------------------------------------------

class _MeanEngine(SlottedEngine):
    """map = the image's channel mean distance from 0.5, pooled to 16x16; score = its max."""

    backend = "fake"

    def __init__(self, size: int = 32) -> None:
        super().__init__([TensorSpec("image", (1, 3, size, size))],
                         [TensorSpec("score", (1,)), TensorSpec("anomaly_map", (1, 1, 16, 16))])

    def run(self, feeds):
        x = np.abs(feeds["image"][0] - 0.5).mean(axis=0)
        amap = cv2.resize(x, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
        return {"score": amap.max().reshape(1), "anomaly_map": amap.reshape(1, 1, 16, 16)}


class _Frames(Source):
    live = False

    def __init__(self, frames):
        self.uri, self.frames, self.i = "list://", frames, 0

    def read(self):
        if self.i >= len(self.frames):
            raise EndOfStream
        self.i += 1
        return self.frames[self.i - 1], None


def _records(tmp_path: Path, use_native: bool, frames) -> tuple[list[dict], dict]:
    engine = _MeanEngine()
    log_path = tmp_path / f"log_{use_native}.jsonl"
    log = JsonlLog(log_path)
    cal = Calibration(0.3, 0.0, 0.5, 0.3, 0.0, 0.5, 10, 0.99, 0.999, 1.0)
    pipe = Pipeline(_Frames(frames), engine, Postprocessor(cal, use_native=use_native), [], log,
                    PipelineConfig(policy="block"))
    pipe.pre = Preprocessor.for_input_shape(engine.inputs[0].shape, use_native=use_native)
    summary = pipe.run().summary
    log.close()
    keep = ("frame", "verdict", "score", "score_norm")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    return [{**{k: r[k] for k in keep}, "regions": [(g["bbox"], g["area"]) for g in r["regions"]]}
            for r in lines if "verdict" in r], summary


@needs_native
def test_pipeline_records_are_the_same_with_and_without_native(tmp_path):
    rng = np.random.default_rng(5)
    frames = []
    for i in range(12):
        frame = np.full((120, 160, 3), 128, np.uint8)
        if i % 3:
            y, x = int(rng.integers(0, 90)), int(rng.integers(0, 120))
            frame[y:y + 40, x:x + 50] = (0, 255, 255) if i % 2 else (255, 0, 0)
        frames.append(frame)
    fast, fast_summary = _records(tmp_path, True, frames)
    ref, ref_summary = _records(tmp_path, False, frames)
    assert fast == ref and len(fast) == 12 and any(r["regions"] for r in fast)
    assert fast_summary["native"]["preprocess"] and fast_summary["native"]["postprocess"]
    assert not ref_summary["native"]["preprocess"] and not ref_summary["native"]["postprocess"]
