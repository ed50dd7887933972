"""The native core built for other instruction sets than this machine's -march=native.

The Python module is built with -march=native, so on an AVX-512 machine CI would never run the
AVX2 or the 128-bit (SSE2 here, NEON on a Jetson) code paths of ``cpp_bindings/src/simd.hpp``.
``cpp_bindings/tests/driver.cpp`` is the same core without Python: it is compiled here for each
x86 level this CPU can run, with the module's floating-point flags, and held to the Python path
(bit-exact preprocessing, maps within ``native.MAP_RTOL`` of their range).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgead.core.machine import describe
from edgead.core.postprocess import gaussian_kernel, smooth, to_frame
from edgead.data.images import to_model_input
from edgead.runtime import native

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "cpp_bindings" / "tests" / "driver.cpp"] + [
    ROOT / "cpp_bindings" / "src" / f"{name}.cpp" for name in ("preprocess", "resize_u8", "postprocess")]
FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-Wno-psabi"]
# (name, -march, the ISA flag this CPU needs to run it)
LEVELS = [("x86-64 baseline (SSE2, no FMA)", "x86-64", None), ("AVX2 + FMA", "haswell", "avx2")]

pytestmark = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="needs g++ on an x86-64 machine")


def _levels() -> list:
    isa = describe()["isa"]
    return [pytest.param(march, id=name, marks=pytest.mark.skipif(flag is not None and not isa.get(flag),
                                                                 reason=f"this CPU has no {flag}"))
            for name, march, flag in LEVELS]


@pytest.fixture(scope="module", params=_levels())
def driver(request, tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("native_isa") / f"driver-{request.param}"
    subprocess.run(["g++", *FLAGS, f"-march={request.param}", f"-I{ROOT / 'cpp_bindings' / 'src'}",
                    *map(str, SOURCES), "-o", str(exe)], check=True, capture_output=True, timeout=300)
    return exe


def _run(driver: Path, tmp: Path, mode: str, data: np.ndarray, *args: object, out_shape: tuple, extra=None):
    src, out = tmp / f"{mode}.in", tmp / f"{mode}.out"
    data.tofile(src)
    cmd = [str(driver), mode, str(src), *map(str, data.shape[:2])]
    if mode == "pre":
        cmd += [str(data.shape[2]), *map(str, args)]
    elif mode == "blur":
        kernel_file = tmp / "kernel.bin"
        extra.tofile(kernel_file)
        cmd += [str(kernel_file), str(extra.size)]
    else:
        cmd += list(map(str, args))
    subprocess.run(cmd + [str(out)], check=True, timeout=60)
    return np.fromfile(out, dtype=np.float32).reshape(out_shape)


@pytest.mark.parametrize("size,out_channels", [(128, 3), (256, 3), (64, 1)])
def test_preprocess_is_bit_exact_at_every_level(driver, tmp_path, size, out_channels):
    rng = np.random.default_rng(size + out_channels)
    # camera frames, and sizes that pick each of cv2.resize's kernels (area, integer area, linear,
    # area on one axis and linear on the other)
    shapes = [(480, 640), (720, 1280), (2 * size, 2 * size), (size // 2 + 3, size // 3 + 1), (size + 5, size // 2 + 1),
              (3 * size + 1, 2 * size + 3)]
    for height, width in shapes:
        frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        got = _run(driver, tmp_path, "pre", frame, size, out_channels, out_shape=(out_channels, size, size))
        assert np.array_equal(got, to_model_input(frame, size, out_channels, bgr=True)), (height, width)


@pytest.mark.parametrize("shape,sigma", [((128, 128), 4.0), ((256, 256), 4.0), ((33, 47), 3.3)])
def test_smoothing_and_frame_map_at_every_level(driver, tmp_path, shape, sigma):
    rng = np.random.default_rng(shape[0])
    amap = (rng.random(shape, dtype=np.float32) * 3.0).astype(np.float32)
    reference = smooth(amap, sigma)
    span = float(reference.max() - reference.min())
    got = _run(driver, tmp_path, "blur", amap, out_shape=shape, extra=gaussian_kernel(sigma).astype(np.float32))
    np.testing.assert_allclose(got, reference, rtol=0, atol=native.MAP_RTOL * span)
    frame = _run(driver, tmp_path, "resize", reference, 480, 640, out_shape=(480, 640))
    np.testing.assert_allclose(frame, to_frame(reference, 640, 480), rtol=0, atol=native.MAP_RTOL * span)
