"""Start-up choices a station makes for itself, each measured here and reported.

* ``--precision auto`` (:func:`choose_precision`): the fastest precision of the bundle that holds a
  passing certificate of this device on the chosen backend. Each certified precision is timed on
  this machine at start-up (a short trtexec-style run: the certificate says it is right, only this
  machine says how fast); an uncertified or failed precision is never chosen, whatever its speed.
* Engine threads (:func:`choose_threads`): on a small CPU, pre- and post-processing compete with
  the engine for the cores, so the thread count that is fastest for the engine alone is not the one
  that is fastest for the pipeline. Each candidate (1, cores - 1, cores) is timed with the
  pipeline's own pre- and post-processing stages running beside the engine on a camera-sized frame,
  and the best frames per second wins.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

import numpy as np

from edgead.core.bundle import FUSED, Bundle
from edgead.core.engine import Engine

def _median_ms(engine: Engine, duration_s: float, min_runs: int = 5) -> float:
    from edgead.certify.latency import measure

    return float(measure(engine, warmup_ms=100.0, duration_s=duration_s, min_iterations=min_runs)["latency_ms"]["median"])


def certified_here(bundle: Bundle, graph: str = FUSED) -> Callable[[Engine, str], str | None]:
    """A ``check`` for :func:`choose_precision`: None when the engine holds a passing certificate
    of this device, else why not (the certificate rules of :mod:`edgead.certify.certificate`)."""
    from edgead.certify.certificate import find_certificate

    return lambda engine, precision: find_certificate(bundle, engine, precision, graph).problem


def choose_precision(bundle: Bundle, backend: str, open_precision: Callable[[str], Engine],
                     check: Callable[[Engine, str], str | None] | None = None, graph: str = FUSED,
                     duration_s: float = 0.5) -> dict[str, Any]:
    """{"precision", "why", "candidates": {precision: {"median_ms"} | {"refused"}}} for this device.

    ``open_precision(p)`` opens the engine of precision ``p``; ``check(engine, p)`` says why it may
    not run here (None: it holds a passing certificate of this device; default
    :func:`certified_here`). Raises :class:`~edgead.runtime.infer.BundleRefused` when no
    precision qualifies.
    """
    from edgead.certify.certificate import device_of
    from edgead.runtime.infer import BundleRefused

    check = check or certified_here(bundle, graph)
    candidates: dict[str, dict[str, Any]] = {}
    device = None
    from edgead.engines import engine_precisions

    for precision in engine_precisions(bundle, backend, graph):
        try:
            engine = open_precision(precision)
        except Exception as exc:  # noqa: BLE001 - a precision this backend can't open is not a candidate
            candidates[precision] = {"refused": f"cannot open: {exc}"}
            continue
        try:
            device = device_of(engine).label
            problem = check(engine, precision)
            candidates[precision] = ({"refused": problem} if problem is not None
                                     else {"median_ms": _median_ms(engine, duration_s)})
        finally:
            engine.close()
    timed = {p: c["median_ms"] for p, c in candidates.items() if "median_ms" in c}
    if not timed:
        why = "; ".join(f"{p}: {c['refused']}" for p, c in candidates.items()) or "the bundle has no graphs"
        raise BundleRefused(f"refusing bundle: --precision auto found no {backend} precision of {bundle.root} with a "
                            f"passing certificate of {device or 'this device'} ({why}); certify one with "
                            f"`edgead bench parity {bundle.root} --backend {backend}` or run with --certify")
    best = min(timed, key=timed.__getitem__)
    others = ", ".join(f"{p} {ms:.2f} ms" for p, ms in sorted(timed.items(), key=lambda kv: kv[1]) if p != best)
    refused = ", ".join(f"{p} ({c['refused']})" for p, c in candidates.items() if "refused" in c)
    why = (f"{best} is the fastest certified {backend} precision on {device}: {timed[best]:.2f} ms median"
           + (f" (vs {others})" if others else " (the only certified one)")
           + (f"; not eligible: {refused}" if refused else ""))
    return {"precision": best, "why": why, "candidates": candidates}


# ---------------------------------------------------------------- threads for the pipeline
HostWork = Callable[[], None]  # one frame's pre- and post-processing


def host_work(shape: tuple[int, ...], calibration: Any, frame_hw: tuple[int, int] = (480, 640)) -> HostWork:
    """One frame's host-side work, with the pipeline's own stages: a camera-sized BGR frame
    pre-processed into the engine's input, and a map post-processed (smoothing, regions) back to
    the frame's size."""
    from edgead.runtime.postprocess_stage import Postprocessor
    from edgead.runtime.preprocess import Preprocessor

    pre, post = Preprocessor.for_input_shape(tuple(shape)), Postprocessor(calibration)
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (*frame_hw, 3), dtype=np.uint8)
    buffer = np.zeros(tuple(shape)[1:], np.float32)
    amap = rng.random(tuple(shape)[-2:], dtype=np.float32)

    def work() -> None:
        pre.into(frame, buffer)
        post(float(calibration.image_threshold), amap, frame_hw)

    return work


def pipeline_fps(engine: Engine, work: HostWork, duration_s: float = 1.0, depth: int = 2) -> float:
    """Frames per second through the engine and ``work`` (one frame's host work), run as the
    pipeline runs them: the host work of each inferred frame on another thread, at most ``depth``
    frames in flight (the engine's two slots). A host stage that is slower than the engine then
    sets the rate, and a fast one costs only the cores it takes for its frames (a host thread that
    worked without pause would overstate its share and always favour fewer engine threads)."""
    from edgead.certify.latency import random_feeds

    feeds = random_feeds(engine)
    engine.run(feeds)
    inferred, in_flight = threading.Semaphore(0), threading.Semaphore(depth)
    stop, failed = threading.Event(), []

    def host() -> None:
        while not stop.is_set():
            if inferred.acquire(timeout=0.05):
                try:
                    work()
                except Exception as exc:  # noqa: BLE001 - re-raised on the engine's thread
                    failed.append(exc)
                    return
                in_flight.release()

    def slot() -> None:  # wait for a frame's host work to finish, or re-raise its failure
        while not in_flight.acquire(timeout=0.05):
            if failed:
                raise failed[0]

    worker = threading.Thread(target=host, daemon=True)
    worker.start()
    frames, began = 0, time.perf_counter()
    try:
        while time.perf_counter() - began < duration_s or frames < 3:
            slot()
            engine.run(feeds)
            frames += 1
            inferred.release()
        for _ in range(depth):  # the last frames' host work is part of the time
            slot()
        elapsed = time.perf_counter() - began
    finally:
        stop.set()
        worker.join()
    return frames / elapsed


def thread_candidates(cores: int | None = None) -> list[int]:
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, max(1, cores - 1), cores})


def choose_threads(open_threads: Callable[[int], Engine], work: HostWork, candidates: list[int] | None = None,
                   duration_s: float = 0.4) -> dict[str, Any]:
    """{"threads", "why", "fps": {threads: pipeline fps}}: the engine thread count with the best
    pipeline throughput on this machine, each candidate timed with the host ``work`` beside it."""
    fps: dict[int, float] = {}
    for n in candidates or thread_candidates():
        engine = open_threads(n)
        try:
            fps[n] = pipeline_fps(engine, work, duration_s)
        finally:
            engine.close()
    best = max(fps, key=fps.__getitem__)
    others = ", ".join(f"{n} thread{'s' * (n > 1)} {f:.1f} fps" for n, f in sorted(fps.items()) if n != best)
    why = (f"{best} engine thread{'s' * (best > 1)}: {fps[best]:.1f} frames/s with the host's pre/post-processing "
           f"running beside the engine" + (f" (vs {others})" if others else ""))
    return {"threads": best, "why": why, "fps": {str(n): f for n, f in fps.items()}}


CPU_BACKENDS = ("onnxruntime", "openvino")  # engines whose thread count is ours to choose


def open_station_engine(path: str, backend: str, precision: str, *, threads: int | None = None,
                        allow_unverified: bool = False, trust: str | None = None, certify: str = "auto",
                        warn: Callable[[str], None] = print, say: Callable[[str], Any] = print,
                        graph: str = FUSED) -> tuple[Bundle, Engine, dict[str, str], dict[str, Any]]:
    """:func:`~edgead.runtime.infer.open_certified_engine` with the start-up choices: ``precision``
    "auto" picks the fastest certified precision; ``threads`` None on a CPU backend picks the
    pipeline's best thread count. Returns (bundle, engine, certificate status, choices made)."""
    from edgead.runtime.infer import (BundleRefused, check_certificate, load_checked_bundle, open_bundle_engine,
                                      open_certified_engine)

    choices: dict[str, Any] = {}
    if precision == "auto" or (threads is None and backend in CPU_BACKENDS):
        bundle = load_checked_bundle(path, backend, precision, allow_unverified, warn, trust, graph)
        if precision == "auto":
            def check(engine: Engine, p: str) -> str | None:  # certifies as a fixed precision would
                try:
                    check_certificate(bundle, engine, backend, p, certify, False, warn, say, graph)
                except BundleRefused as err:
                    return str(err).removeprefix("refusing bundle: ")
                return None

            choice = choose_precision(bundle, backend, lambda p: open_bundle_engine(bundle, backend, p, threads, graph),
                                      check, graph)
            precision, choices["precision"] = choice["precision"], choice
            say(f"edgead-run: --precision auto: {choice['why']}")
        if threads is None and backend in CPU_BACKENDS:
            work = host_work(bundle.input_shape, bundle.calibration)
            choice = choose_threads(lambda n: open_bundle_engine(bundle, backend, precision, n, graph), work)
            threads, choices["threads"] = choice["threads"], choice
            say(f"edgead-run: threads: {choice['why']} (--threads N to set it)")
    bundle, engine, status = open_certified_engine(path, backend, precision, threads=threads,
                                                   allow_unverified=allow_unverified, trust=trust, certify=certify,
                                                   warn=warn, say=say, graph=graph)
    return bundle, engine, status, choices
