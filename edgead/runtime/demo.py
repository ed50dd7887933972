"""``edgead-run --demo``: the whole product on a machine with no camera and no data.

The first run builds a small demo bundle with the project's own code (synthetic data -> train a
small SSIM autoencoder -> export ONNX -> certify parity) in a *subprocess*
(``python -m edgead.demo_build``), because training needs torch and this process must
never import it. The bundle is cached in ``$EDGEAD_CACHE/demo`` (default ``~/.cache/edgead/demo``)
and reused. Then the ordinary station loop inspects the synthetic conveyor, whose ground truth
gives the summary its accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

DEMO_FRAMES = 200
DEMO_RESULTS = "edgead-demo"
DEMO_INFO = "demo.json"  # written by demo_build next to the bundle
DEMO_RECIPE = "patchcore-metal-128-v5"  # a cache built by another recipe (an older edgead) is rebuilt
BUILD_TIMEOUT_S = 900


class DemoError(RuntimeError):
    """The demo bundle could not be built or found; the message says why and what to install."""


def cache_dir() -> Path:
    root = os.environ.get("EDGEAD_CACHE") or Path.home() / ".cache" / "edgead"
    return Path(root) / "demo"


def cached_bundle(cache: Path) -> tuple[Path, dict] | None:
    """The cached demo bundle and its info, if complete and intact."""
    from edgead.core.bundle import BundleError, load_bundle

    info_path = cache / DEMO_INFO
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        bundle = load_bundle(cache / info["bundle"], verify=True)
    except (BundleError, KeyError, ValueError):
        return None
    # demo_build certified it on this machine (a device certificate beside the graph); the run
    # checks that certificate again, so here the build's own record is enough
    return (bundle.root, info) if info.get("certified") and info.get("recipe") == DEMO_RECIPE else None


def build_bundle(cache: Path, say: Callable[..., None], rebuild: bool = False) -> tuple[Path, dict]:
    """Reuse the cached bundle or build it in a subprocess (one builder at a time: a file lock)."""
    if not rebuild and (hit := cached_bundle(cache)):
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / ".lock"):
        if not rebuild and (hit := cached_bundle(cache)):  # another process built it meanwhile
            return hit
        say(f"edgead-run --demo: building the demo bundle in {cache} (first run only, ~1-2 min of CPU)...")
        started = time.monotonic()
        cmd = [sys.executable, "-m", "edgead.demo_build", "--out", str(cache)]
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # so a source checkout works without install
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        tail: list[str] = []
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:  # relay the builder's progress
                say("  " + line.rstrip())
                tail = (tail + [line.rstrip()])[-20:]
                if time.monotonic() - started > BUILD_TIMEOUT_S:
                    proc.kill()
                    raise DemoError(f"building the demo bundle took longer than {BUILD_TIMEOUT_S} s")
        if proc.returncode != 0:
            raise DemoError(f"building the demo bundle failed (exit {proc.returncode}): {' | '.join(tail[-3:])}; "
                            "it needs the training and export extras: pip install 'edgead[train,export]'")
        hit = cached_bundle(cache)
        if hit is None:
            raise DemoError(f"the demo build finished but {cache} holds no certified bundle")
        say(f"edgead-run --demo: bundle ready in {time.monotonic() - started:.0f} s")
        return hit


class _lock:
    """An exclusive advisory file lock (POSIX); a no-op where fcntl is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> "_lock":
        self.fh = open(self.path, "w")
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def prepare_demo(args: argparse.Namespace, say: Callable[..., None]) -> None:
    """Fill in the demo's defaults on ``args``; the ordinary run does the rest."""
    if args.model:
        raise DemoError("--demo brings its own bundle; drop --model (or drop --demo)")
    bundle, info = build_bundle(cache_dir(), say, rebuild=args.demo_rebuild)
    args.model = str(bundle)
    if args.camera is None and not args.input:
        # seed 1: parts the detector never saw (training used other streams of seed 0)
        args.input = f"synthetic://{info['category']}?size={info['size']}&seed=1&defect_rate=0.3"
    if args.frames is None:
        args.frames = DEMO_FRAMES
    if args.results is None:
        args.results = DEMO_RESULTS
    args.headless = True
    say(f"edgead-run --demo: {info['detector']} on synthetic {info['category']} parts at {info['size']}px "
        f"(bundle {bundle})")
