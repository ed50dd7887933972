"""``edgead-run``: inspect a camera, stream, video or image folder with an exported bundle.

This process never imports torch: a station installs only numpy, OpenCV and the engine runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any, Callable

from edgead.runtime.sources import URI_HELP

# Exit codes (documented in --help).
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_SOURCE, EXIT_MODEL, EXIT_FRAME_ERRORS = 0, 1, 2, 3, 4, 5
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

EPILOG = URI_HELP + """
output URIs (positional OUTPUT or --output):
  display://0                       window with heat-map, regions, verdict, score, FPS (needs an OpenCV
                                    with GUI and a DISPLAY; shown by default when DISPLAY is set,
                                    unless --headless)
  file://out.mp4 | out.mp4 | out.avi  annotated video (mp4v / MJPG)
  mqtt://HOST:1883/TOPIC?on=all|ng  one JSON message per frame / per not-OK frame  (extra "line")
  opc.tcp://HOST:4840               an OPC UA server with the last verdict and counters (extra "line")
  modbus://HOST:502?coil=0&pulse_ms=50  a reject pulse per not-OK frame             (extra "line")
  http://127.0.0.1:8080             the station view: a live page in a browser (extra `view`); another
                                    address than 127.0.0.1 needs a token (EDGEAD_VIEW_TOKEN or
                                    --view-token; else one is generated and printed once)

results (--results DIR, default ./edgead-results): summary.json and, unless --log says otherwise,
log.jsonl: one JSON line per inspected frame (frame id, capture time, raw and normalised score,
verdict, regions, per-stage latency, frame age) plus {"event": ...} lines (start, reconnect,
frame_error, stop, summary). The summary counts captured = inspected + dropped + errored.

exit codes: 0 clean end (end of stream, --frames reached, window closed); 1 internal error;
2 bad usage; 3 input source error (bad URI, missing device/file, camera lost for good);
4 model refused or unusable (checksums, signature, device certificate, engine); 5 the run finished but at
least one frame got an ERROR verdict; 130 stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM.
A source or internal failure outranks a signal, which outranks frame errors.

examples:
  edgead-run --demo                                    # no camera, no data: builds a demo bundle once
  edgead-run --camera 0 --model bundles/washer         # /dev/video0
  edgead-run csi://0 --model bundles/washer --backend tensorrt --precision fp16 --line-rate 30
  edgead-run 'parts/*.png' out.mp4 --model bundles/washer --save-ng ng/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgead-run", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Inspect frames with an edgead bundle: per frame an anomaly map, a score and an "
                    "OK/NG verdict, at line speed.")
    p.add_argument("input", nargs="?", help="input URI (see below)")
    p.add_argument("output", nargs="?", help="output URI (see below); more with --output")
    p.add_argument("--model", metavar="BUNDLE", help="bundle directory (from `edgead export`)")
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of the onnxruntime engine (default: onnxruntime's own choice)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="run a bundle that fails its checksums or has no passing parity certificate")
    cert = p.add_mutually_exclusive_group()
    cert.add_argument("--certify", dest="certify", action="store_const", const="always", default="auto",
                      help="certify the engine on this device against the bundle's golden outputs before the "
                           "first frame (default: only when the bundle has no certificate for this "
                           "backend/precision yet)")
    cert.add_argument("--no-certify", dest="certify", action="store_const", const="never",
                      help="never certify here: refuse an engine without a certificate of this device")
    p.add_argument("--trust", metavar="KEYS",
                   help="Ed25519 public key (.pub) or folder of keys: refuse a bundle not signed by one of them")
    src = p.add_argument_group("input")
    src.add_argument("--camera", type=int, metavar="N", help="V4L2 camera /dev/videoN (NOT CSI; use csi://N)")
    src.add_argument("--input-width", type=int, metavar="W",
                     help="capture width asked of a camera; files and folders are resized to it")
    src.add_argument("--input-height", type=int, metavar="H")
    src.add_argument("--input-rate", type=float, metavar="FPS",
                     help="camera frame rate; paces files, folders and synthetic sources, which then "
                          "behave as live (drop policy latest by default)")
    src.add_argument("--input-loop", type=int, default=0, metavar="N",
                     help="extra passes over a video/folder (-1 forever; default 0 = once)")
    src.add_argument("--frames", "--num-buffers", dest="frames", type=int, metavar="N",
                     help="stop after N captured frames")
    src.add_argument("--reconnect-max-delay", type=float, default=5.0, metavar="S",
                     help="cap of the exponential reconnect backoff of a lost camera (default 5 s)")
    src.add_argument("--reconnect-attempts", type=int, default=-1, metavar="N",
                     help="give up after N reconnect attempts (default -1: never)")
    run = p.add_argument_group("pipeline")
    run.add_argument("--drop-policy", choices=("latest", "block"),
                     help="latest: drop frames under overload (default for live sources); "
                          "block: inspect every frame (default for files, folders, unpaced synthetic)")
    run.add_argument("--line-rate", type=float, metavar="HZ",
                     help="report whether the station keeps up with HZ parts per second")
    out = p.add_argument_group("output")
    out.add_argument("--output", dest="output_opt", metavar="URI", action="append",
                     help="an output URI, as the positional OUTPUT; repeat for several")
    out.add_argument("--headless", action="store_true", help="no window (default when there is no DISPLAY)")
    out.add_argument("--results", metavar="DIR", help="results folder (default ./edgead-results)")
    out.add_argument("--log", metavar="FILE", help="JSONL log (default RESULTS/log.jsonl)")
    out.add_argument("--save-ng", metavar="DIR", help="save NG frames and their maps as PNG")
    out.add_argument("--quiet", action="store_true", help="print only the summary")
    out.add_argument("--fail-safe-output", action="store_true",
                     help="while the link of an mqtt/opc.tcp/modbus output is down, every frame is NG "
                          "(a sink's fail_safe=0|1 overrides this)")
    out.add_argument("--view-token", metavar="TOKEN", help="access token of an http:// station view (visible "
                     "in ps: prefer the environment variable EDGEAD_VIEW_TOKEN)")
    demo = p.add_argument_group("demo")
    demo.add_argument("--demo", action="store_true",
                      help="build (once, cached in $EDGEAD_CACHE or ~/.cache/edgead) a small demo bundle "
                           "and inspect the synthetic conveyor with it")
    demo.add_argument("--demo-rebuild", action="store_true", help="rebuild the cached demo bundle")
    return p


class UsageError(ValueError):
    """Bad command-line usage; the message says what to give instead."""


def _input_uri(args: argparse.Namespace) -> str:
    from edgead.runtime.sources import camera_uri

    if args.camera is not None and args.input:
        raise UsageError(f"give either --camera {args.camera} or an input URI ({args.input}), not both")
    if args.camera is not None:
        return camera_uri(args.camera)
    if not args.input:
        raise UsageError("no input: give --camera N, an input URI or --demo (see --help)")
    return args.input


def _outputs(args: argparse.Namespace) -> list[str]:
    return [u for u in ([args.output] if args.output else []) + list(args.output_opt or [])]


def _open_sinks(args: argparse.Namespace, outputs: list[str], context: Any, stack: ExitStack) -> list[Any]:
    """Every sink the run writes to, closed by ``stack`` (whatever happens)."""
    from edgead.runtime.annotate import has_gui
    from edgead.runtime.sinks import NgSaver, open_sink, sink_scheme

    uris = list(outputs)
    headless = args.headless or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if not headless and not any(sink_scheme(u) == "display" for u in uris):
        if has_gui():
            uris.insert(0, "display://0")
        else:
            context.say("note: this OpenCV has no GUI (headless wheel): running headless")
    sinks = [open_sink(uri, context) for uri in uris]
    if args.save_ng:
        sinks.append(NgSaver(args.save_ng, context.vrange))
    for sink in sinks:
        stack.callback(_close_quietly, sink, context.say)
    return sinks


def _close_quietly(resource: Any, say: Callable[[str], Any]) -> None:
    try:
        resource.close()
    except Exception as exc:  # noqa: BLE001 - closing must not hide the summary
        say(f"edgead-run: closing {type(resource).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # options may sit between INPUT and OUTPUT
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    try:
        if args.demo:
            from edgead.runtime.demo import DemoError, prepare_demo

            try:
                prepare_demo(args, say)
            except DemoError as err:
                print(f"edgead-run --demo: error: {err}", file=sys.stderr)
                return EXIT_USAGE
        return _run(args, say)
    except UsageError as err:
        print(f"edgead-run: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("edgead-run: interrupted", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]


class _Refused(Exception):
    """A start-up failure with its exit code; the message is printed as one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _run(args: argparse.Namespace, say: Callable[..., Any]) -> int:
    uri = _input_uri(args)
    outputs = _outputs(args)
    if not args.model:
        raise UsageError("no model: give --model BUNDLE (a folder made by `edgead export`) or use --demo")
    with ExitStack() as stack:
        try:
            return _inspect(args, uri, outputs, say, stack)
        except _Refused as err:
            print(f"edgead-run: {err}", file=sys.stderr)
            return err.code


def _inspect(args: argparse.Namespace, uri: str, outputs: list[str], say: Callable[..., Any],
             stack: ExitStack) -> int:
    from edgead.core.bundle import BundleError
    from edgead.core.engine import EngineError
    from edgead.runtime.infer import BundleRefused, describe_engine, open_certified_engine
    from edgead.runtime.log import JsonlLog, LogError
    from edgead.runtime.native import describe as describe_native
    from edgead.runtime.pipeline import Backoff, Pipeline, PipelineConfig
    from edgead.runtime.postprocess_stage import Postprocessor
    from edgead.runtime.sinks import SinkContext, SinkError
    from edgead.runtime.sources import InputOptions, SourceError, open_source

    warnings: list[str] = []  # an unverified bundle run anyway: the station view shows it as a banner
    try:  # the model first: a refused bundle should fail before a camera is grabbed
        bundle, engine, certificate = open_certified_engine(
            args.model, args.backend, args.precision, threads=args.threads, allow_unverified=args.allow_unverified,
            trust=args.trust, certify=args.certify, warn=lambda message: (warnings.append(message), say(message)),
            say=say)
        stack.enter_context(closing(engine))
    except (BundleRefused, BundleError, EngineError) as err:
        raise _Refused(str(err), EXIT_MODEL) from err
    results = Path(args.results or "edgead-results")
    try:
        results.mkdir(parents=True, exist_ok=True)
        log = stack.enter_context(closing(JsonlLog(args.log or results / "log.jsonl",
                                                   echo_events=None if args.quiet else sys.stderr)))
    except (OSError, LogError) as err:
        raise _Refused(str(err), EXIT_USAGE) from err
    opts = InputOptions(width=args.input_width, height=args.input_height, rate=args.input_rate,
                        loop=args.input_loop, default_size=int(bundle.input_shape[-1]))
    try:
        source = open_source(uri, opts, on_skip=lambda path, error: log.event("bad_image", path=path, error=error))
        source.open()
    except SourceError as err:
        log.event("source_error", source=uri, error=str(err))
        raise _Refused(str(err), EXIT_SOURCE) from err
    stack.callback(source.close)
    cal = bundle.calibration
    running: list[Any] = []  # the pipeline, once built: a window's q/Esc stops it
    context = SinkContext(vrange=(cal.map_min, cal.map_max), rate=args.input_rate or 30.0, say=say, results=results,
                          on_quit=lambda: running and running[0].stop("window closed"),
                          stats=lambda: running[0].stats.summary() if running else None, view_token=args.view_token,
                          run={"model": str(bundle.root), "detector": bundle.detector, "backend": args.backend,
                               "precision": args.precision, "input": uri, "threshold": cal.image_threshold,
                               "certified": certificate["status"] == "certified", "certificate": certificate,
                               "calibration": cal.to_dict(),
                               "warnings": warnings})
    try:
        sinks = _open_sinks(args, outputs, context, stack)
    except SinkError as err:
        raise _Refused(str(err), EXIT_USAGE) from err
    policy = args.drop_policy or ("latest" if source.live else "block")
    config = PipelineConfig(policy=policy, max_frames=args.frames, fail_safe_output=args.fail_safe_output,
                            backoff=Backoff(cap=args.reconnect_max_delay, max_attempts=args.reconnect_attempts))
    pipeline = Pipeline(source, engine, Postprocessor(cal), sinks, log, config)
    running.append(pipeline)
    mode = "live" if source.live else ("read on demand" if policy == "block" else "read ahead")
    say(f"edgead-run: {bundle.detector} bundle {bundle.root} on {args.backend}/{args.precision}, "
        f"input {uri} ({mode}, drop policy {policy}); {describe_native(pipeline.pre, pipeline.post)}")
    got_signal: list[int] = []
    stack.callback(_install_signals(pipeline, got_signal))
    result = pipeline.run()
    summary = {"model": str(bundle.root), "detector": bundle.detector, "engine": describe_engine(engine),
               "input": uri, "drop_policy": policy, "stop_reason": result.stop_reason, **result.summary}
    if sink_summaries := pipeline.sink_summaries():
        summary["sinks"] = sink_summaries
    return _finish(args, pipeline, result, got_signal, summary, log, results, source.live)


def _finish(args: argparse.Namespace, pipeline: Any, result: Any, got_signal: list[int], summary: dict[str, Any],
            log: Any, results: Path, live: bool) -> int:
    from edgead.runtime.stats import format_summary

    if args.line_rate:
        summary["line_rate"] = pipeline.stats.summary(args.line_rate, saturated=not live)["line_rate"]
    if result.fatal:
        summary["fatal"] = result.fatal
    code = _exit_code(result, got_signal, summary)
    summary["exit_code"] = code
    log.event("stop", reason=result.stop_reason, exit_code=code)
    log.event("summary", **{k: v for k, v in summary.items() if k != "engine"})
    (results / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_summary(summary))
    print(f"results: {results / 'summary.json'}")
    return code


def _exit_code(result: Any, got_signal: list[int], summary: dict[str, Any]) -> int:
    if result.fatal:
        return EXIT_SOURCE if result.stop_reason == "source lost" else EXIT_INTERNAL
    if got_signal:
        return EXIT_SIGNAL.get(got_signal[0], 128 + got_signal[0])
    if summary["frames"]["errored"]:
        return EXIT_FRAME_ERRORS
    return EXIT_OK


def _install_signals(pipeline: Any, got: list[int]):
    """SIGINT/SIGTERM: stop capturing, drain, write the summary. A second signal kills at once."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in EXIT_SIGNAL}

    def handler(signum: int, _frame: Any) -> None:
        if got:  # second time: the operator means it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        got.append(signum)
        pipeline.stop(f"signal {signal.Signals(signum).name}")

    for s in EXIT_SIGNAL:
        signal.signal(s, handler)

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


if __name__ == "__main__":
    sys.exit(main())
