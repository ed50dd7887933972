"""What machine this is: the CPU model and the ISA extensions that decide CPU inference speed.

Every benchmark JSON records :func:`describe`, and certificates are bound to :func:`cpu_fingerprint`,
because an engine certified on one CPU (or GPU) says nothing certain about another.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path
from typing import Any

# The /proc/cpuinfo flags that decide inference speed: x86 (AVX-512 VNNI and AMX for INT8, BF16)
# and ARM, for Jetson-class CPUs (asimddp: int8 dot product; i8mm; sve).
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
ARM_FLAGS = ("asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, flags


@lru_cache(maxsize=1)
def describe() -> dict[str, Any]:
    """{"cpu", "cores", "machine", "python", "isa": {flag: bool}} of this machine."""
    model, flags = _cpuinfo()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    known = ARM_FLAGS if platform.machine().lower() in ("aarch64", "arm64") else X86_FLAGS
    isa = {flag: flag in flags for flag in known}
    return {"cpu": model, "cores": cores, "machine": platform.machine(), "python": platform.python_version(),
            "isa": isa}


def cpu_fingerprint() -> str:
    """A short stable text naming this CPU and its inference-relevant ISA: "<model> [flags]"."""
    info = describe()
    present = [f for f, on in info["isa"].items() if on]
    return f"{info['cpu']} [{' '.join(present)}]"


def has_native_bf16() -> bool:
    """True where the CPU computes BF16 in hardware (AVX-512 BF16 or AMX BF16; ARM ``bf16``): there
    mixed-precision training is ~2x faster, elsewhere it is emulated and slower than FP32."""
    isa = describe()["isa"]
    return any(isa.get(flag, False) for flag in ("avx512_bf16", "amx_bf16", "bf16"))

