"""``edgead-run``: inspect a camera, stream, video or image folder with an exported bundle.

This process never imports torch: a station installs only numpy, OpenCV and the engine runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack, closing
from typing import Any, Callable

# Light imports only up here (no OpenCV, no engine): main() installs the signal handlers before
# anything heavy is loaded, so a signal at any moment still ends with a summary.
from edgead.core.cli_support import int_at_least, loop_count, positive_float, positive_int, report
from edgead.runtime.signals import EXIT_SIGNAL, Interrupted, SignalGuard, exit_code, signal_name
from edgead.runtime.uri_help import URI_HELP

# Exit codes (documented in --help).
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_SOURCE, EXIT_MODEL, EXIT_FRAME_ERRORS = 0, 1, 2, 3, 4, 5
EXIT_TRUNCATED = 6
__all__ = ["EXIT_SIGNAL", "build_parser", "main"]

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

results: each run writes a fresh folder ./edgead-results/<YYYYmmdd-HHMMSS>/ (--demo: ./edgead-demo/...),
or exactly --results DIR, which must be absent or empty (--overwrite replaces an earlier run's files).
summary.json and, unless --log says otherwise, log.jsonl: one JSON line per captured frame (frame id,
its source: file, video file and frame index, or camera and frame number; capture time, raw and
normalised score, verdict, an ERROR's reason, regions, per-stage latency, frame age) plus
{"event": ...} lines (start, warning, reconnect, frame_error, stop, summary). The summary counts
captured = inspected + dropped + errored; an unreadable image is a captured frame with an ERROR.
Warnings (unverified bundle, scores out of the validation range, truncated video, failed output)
are printed whatever --quiet says, and kept in the log and in summary.json.

guards: a frame with a side under 8 px, or one the model (S x S) would upscale more than 4x (a side
under S/4), is ERROR with its reason. A score more than one validation span (score_max - score_min)
below score_min, or ten spans above score_max, is flagged "out_of_range" in its JSONL line and
warned about; --out-of-range error makes it ERROR instead. A video that ends before the frame count
its header declares is truncated: its last decoded frame is ERROR, and the summary says so.

exit codes:
  0    clean end (end of stream, --frames reached, window closed), no ERROR frame
  1    internal error (a bug: rerun with --debug and report the traceback)
  2    bad usage (bad argument, an output or results folder that would be overwritten)
  3    input source error (bad URI, missing device/file, undecodable video, camera lost for good)
  4    model refused or unusable (checksums, signature, device certificate, engine)
  5    the run finished, but at least one frame got an ERROR verdict (unreadable, too small...)
  6    the run finished, but a video was truncated (ended before its declared frame count)
  130  stopped by SIGINT (Ctrl-C), summary written; 143 stopped by SIGTERM, summary written
  A source or internal failure outranks a signal, which outranks 6, which outranks 5.

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
    p.add_argument("--backend", choices=("onnxruntime", "openvino", "tensorrt"), default="onnxruntime",
                   help="engine runtime (openvino: extra edgead[openvino], this CPU)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8", "bf16", "auto"), default="fp32",
                   help="engine precision; auto: the fastest precision with a passing certificate of this "
                        "device on --backend, timed at start-up (the choice and why are printed)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads of an onnxruntime/openvino engine (default: chosen at start-up for the best "
                        "pipeline throughput on this machine, with pre/post-processing running beside the engine)")
    p.add_argument("--postprocess", choices=("host", "engine"), default="host",
                   help="where the map is smoothed and normalised: on this host's CPU (default), or on the engine "
                        "(the bundle's detector_post graph, `edgead export --postprocess`; certified like the detector)")
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
    src.add_argument("--camera", type=int_at_least(0), metavar="N",
                     help="V4L2 camera /dev/videoN (NOT CSI; use csi://N)")
    src.add_argument("--input-width", type=positive_int, metavar="W",
                     help="capture width asked of a camera; files and folders are resized to it")
    src.add_argument("--input-height", type=positive_int, metavar="H")
    src.add_argument("--input-rate", type=positive_float, metavar="FPS",
                     help="camera frame rate; paces files, folders and synthetic sources, which then "
                          "behave as live (drop policy latest by default)")
    src.add_argument("--input-loop", type=loop_count, default=0, metavar="N",
                     help="extra passes over a video/folder (-1 forever; default 0 = once)")
    src.add_argument("--frames", "--num-buffers", dest="frames", type=positive_int, metavar="N",
                     help="stop after N captured frames")
    src.add_argument("--reconnect-max-delay", type=positive_float, default=5.0, metavar="S",
                     help="cap of the exponential reconnect backoff of a lost camera (default 5 s)")
    src.add_argument("--reconnect-attempts", type=loop_count, default=-1, metavar="N",
                     help="give up after N reconnect attempts (default -1: never)")
    run = p.add_argument_group("pipeline")
    run.add_argument("--drop-policy", choices=("latest", "block"),
                     help="latest: drop frames under overload (default for live sources); "
                          "block: inspect every frame (default for files, folders, unpaced synthetic)")
    run.add_argument("--line-rate", type=positive_float, metavar="HZ",
                     help="report whether the station keeps up with HZ parts per second")
    run.add_argument("--out-of-range", choices=("flag", "error"), default="flag",
                     help="a score far outside the validation range: flag it in the log and warn (default), "
                          "or make the frame ERROR")
    out = p.add_argument_group("output")
    out.add_argument("--output", dest="output_opt", metavar="URI", action="append",
                     help="an output URI, as the positional OUTPUT; repeat for several")
    out.add_argument("--headless", action="store_true", help="no window (default when there is no DISPLAY)")
    out.add_argument("--results", metavar="DIR",
                     help="results folder, absent or empty (default: a fresh ./edgead-results/<timestamp>/)")
    out.add_argument("--log", metavar="FILE", help="JSONL log (default RESULTS/log.jsonl)")
    out.add_argument("--save-ng", metavar="DIR", help="save NG frames and their maps as PNG (absent or empty)")
    out.add_argument("--overwrite", action="store_true",
                     help="write into a non-empty --results/--save-ng folder, over an existing --log or --output "
                          "file, replacing the earlier run's files")
    out.add_argument("--quiet", action="store_true", help="print only the summary and the warnings")
    out.add_argument("--fail-safe-output", action="store_true",
                     help="while the link of an mqtt/opc.tcp/modbus output is down, every frame is NG "
                          "(a sink's fail_safe=0|1 overrides this)")
    out.add_argument("--view-token", metavar="TOKEN", help="access token of an http:// station view (visible "
                     "in ps: prefer the environment variable EDGEAD_VIEW_TOKEN)")
    out.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    demo = p.add_argument_group("demo")
    demo.add_argument("--demo", action="store_true",
                      help="build (once, cached in $EDGEAD_CACHE or ~/.cache/edgead) a small demo bundle "
                           "and inspect the synthetic conveyor with it")
    demo.add_argument("--demo-rebuild", action="store_true", help="rebuild the cached demo bundle")
    return p


class UsageError(ValueError):
    """Bad command-line usage; the message says what to give instead."""


def _input_uri(args: argparse.Namespace) -> str:
    if args.camera is not None and args.input:
        raise UsageError(f"give either --camera {args.camera} or an input URI ({args.input}), not both")
    if args.camera is not None:
        from edgead.runtime.sources import camera_uri

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


class _State:
    """What the run has set up so far: an interrupted start-up still writes its summary there."""

    def __init__(self, args: argparse.Namespace, guard: SignalGuard, say: Callable[..., Any]) -> None:
        from edgead.runtime.alerts import Alerts

        self.args, self.guard, self.say = args, guard, say
        self.alerts = Alerts("edgead-run")
        self.explicit_results = args.results is not None  # before --demo fills in its default
        self.uri: str | None = None
        self.plan: Any = None  # edgead.runtime.results.ResultsPlan
        self.log: Any = None


def main(argv: list[str] | None = None) -> int:
    guard = SignalGuard().install()  # first of all: a signal from now on ends with a summary
    try:
        return _main(list(sys.argv[1:] if argv is None else argv), guard)
    finally:
        guard.restore()


def _main(argv: list[str], guard: SignalGuard) -> int:
    try:
        args = build_parser().parse_intermixed_args(argv)  # options may sit between INPUT and OUTPUT
    except Interrupted:
        guard.finishing()  # read them again, uninterrupted, to know where the summary goes
        args = build_parser().parse_intermixed_args(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    state = _State(args, guard, say)
    if guard.first is not None:
        return _interrupted(state, guard.first)
    try:
        if args.demo:
            from edgead.runtime.demo import DemoError, prepare_demo

            try:
                prepare_demo(args, say)
            except DemoError as err:
                print(f"edgead-run --demo: error: {err}", file=sys.stderr)
                return EXIT_USAGE
        return _run(state)
    except UsageError as err:
        print(f"edgead-run: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as intr:
        return _interrupted(state, getattr(intr, "signum", None))
    except Exception as err:  # noqa: BLE001 - one line, the traceback only with --debug
        if guard.got is not None:  # e.g. an import cut short by the signal: an interrupt, not a fault
            return _interrupted(state, guard.got)
        report("edgead-run", err, args.debug, internal=True)
        return EXIT_INTERNAL


class _Refused(Exception):
    """A start-up failure with its exit code; the message is printed as one line."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _run(state: _State) -> int:
    from edgead.runtime.results import ResultsError, check_outputs, fresh_root, plan

    args = state.args
    state.uri = uri = args.input if args.camera is None else f"--camera {args.camera}"
    try:  # before anything heavy: an interrupt from now on has a folder for its summary
        results = args.results if state.explicit_results else None
        state.plan = plan(results, args.log, args.save_ng, args.overwrite, default_root=fresh_root(args.demo))
        check_outputs(args.output, list(args.output_opt or []), uri, args.overwrite)
    except ResultsError as err:
        raise UsageError(str(err)) from err
    state.uri = uri = _input_uri(args)
    outputs = _outputs(args)
    if not args.model:
        raise UsageError("no model: give --model BUNDLE (a folder made by `edgead export`) or use --demo")
    with ExitStack() as stack:
        try:
            return _inspect(state, uri, outputs, stack)
        except _Refused as err:
            if state.guard.got is not None:  # e.g. "onnxruntime is not installed" from an interrupted import
                return _interrupted(state, state.guard.got)
            print(f"edgead-run: {err}", file=sys.stderr)
            return err.code
        except Interrupted as intr:  # while starting: the log is still open here
            return _interrupted(state, intr.signum)
        except Exception:  # noqa: BLE001 - an import cut short by a signal fails in its own way
            if state.guard.got is None:
                raise
            return _interrupted(state, state.guard.got)


def _open_log(state: _State) -> Any:
    from edgead.runtime.log import JsonlLog

    if state.log is None:
        state.plan.create()
        state.log = JsonlLog(state.plan.log, echo_events=None if state.args.quiet else sys.stderr)
        state.alerts.attach(state.log)
    return state.log


def _inspect(state: _State, uri: str, outputs: list[str], stack: ExitStack) -> int:
    from edgead.core.bundle import FUSED, BundleError
    from edgead.core.contract import POSTPROCESS_GRAPH
    from edgead.core.engine import EngineError
    from edgead.runtime.autotune import open_station_engine
    from edgead.runtime.infer import BundleRefused, describe_engine
    from edgead.runtime.log import LogError
    from edgead.runtime.native import describe as describe_native
    from edgead.runtime.pipeline import Backoff, Pipeline, PipelineConfig
    from edgead.runtime.postprocess_stage import Postprocessor
    from edgead.runtime.sinks import SinkContext, SinkError
    from edgead.runtime.sources import InputOptions, SourceError, open_source

    args, say = state.args, state.say
    warnings: list[str] = []  # an unverified bundle run anyway: the station view shows it as a banner

    def warn(message: str) -> None:
        warnings.append(message)
        state.alerts.warn(message, kind="unverified")

    try:  # the model first: a refused bundle should fail before a camera is grabbed
        bundle, engine, certificate, choices = open_station_engine(
            args.model, args.backend, args.precision, threads=args.threads, allow_unverified=args.allow_unverified,
            trust=args.trust, certify=args.certify, warn=warn, say=say,
            graph=POSTPROCESS_GRAPH if args.postprocess == "engine" else FUSED)
        stack.enter_context(closing(engine))
        args.precision = engine.precision  # "auto" resolved
    except (BundleRefused, BundleError, EngineError) as err:
        raise _Refused(str(err), EXIT_MODEL) from err
    try:
        log = stack.enter_context(closing(_open_log(state)))
        stack.callback(setattr, state, "log", None)  # closed from then on
    except (OSError, LogError) as err:
        raise _Refused(str(err), EXIT_USAGE) from err
    results = state.plan.folder
    opts = InputOptions(width=args.input_width, height=args.input_height, rate=args.input_rate,
                        loop=args.input_loop, default_size=int(bundle.input_shape[-1]))
    try:
        source = open_source(uri, opts)
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
                            out_of_range=args.out_of_range,
                            backoff=Backoff(cap=args.reconnect_max_delay, max_attempts=args.reconnect_attempts))
    post = Postprocessor(cal, on_engine=args.postprocess == "engine")
    pipeline = Pipeline(source, engine, post, sinks, log, config, alerts=state.alerts)
    running.append(pipeline)
    mode = "live" if source.live else ("read on demand" if policy == "block" else "read ahead")
    threads, parts = getattr(engine, "threads", None), getattr(engine, "component_precisions", None)
    say(f"edgead-run: {bundle.detector} bundle {bundle.root} on {args.backend}/{getattr(engine, 'precision', args.precision)}"
        f"{' [' + ', '.join(f'{k} {v}' for k, v in parts.items()) + ']' if parts else ''}"
        f"{f' ({threads} thread' + 's' * (threads > 1) + ')' if threads else ''}, "
        f"input {uri} ({mode}, drop policy {policy}), results {results}; "
        f"{describe_native(pipeline.pre, pipeline.post)}; map smoothing and normalisation on the {args.postprocess}")
    state.guard.running(pipeline.stop)
    result = pipeline.run()
    state.guard.finishing()
    summary = {"model": str(bundle.root), "detector": bundle.detector, "engine": describe_engine(engine),
               "postprocess": args.postprocess, **({"start_up_choices": choices} if choices else {}),
               "input": uri, "results": str(results), "drop_policy": policy, "stop_reason": result.stop_reason,
               **result.summary}
    if sink_summaries := pipeline.sink_summaries():
        summary["sinks"] = sink_summaries
    return _finish(state, pipeline, result, summary, source.live)


def _finish(state: _State, pipeline: Any, result: Any, summary: dict[str, Any], live: bool) -> int:
    from edgead.runtime.stats import format_summary

    args = state.args
    if args.line_rate:
        summary["line_rate"] = pipeline.stats.summary(args.line_rate, saturated=not live)["line_rate"]
    if result.fatal:
        summary["fatal"] = result.fatal
    code = _exit_code(result, state.guard.got, summary)
    summary["exit_code"] = code
    summary["warnings"] = state.alerts.summary()
    state.log.event("stop", reason=result.stop_reason, exit_code=code)
    state.log.event("summary", **{k: v for k, v in summary.items() if k != "engine"})
    path = state.plan.write_summary(summary)
    print(format_summary(summary))
    for warning in summary["warnings"]:
        print(f"warning: {warning['message']}" + (f" (x{warning['count']})" if warning["count"] > 1 else ""))
    print(f"results: {path}")
    return code


def _exit_code(result: Any, got_signal: int | None, summary: dict[str, Any]) -> int:
    if result.fatal:
        return EXIT_SOURCE if result.stop_reason == "source lost" else EXIT_INTERNAL
    if got_signal is not None:
        return exit_code(got_signal)
    if summary.get("truncated"):
        return EXIT_TRUNCATED
    if summary["frames"]["errored"]:
        return EXIT_FRAME_ERRORS
    return EXIT_OK


def _interrupted(state: _State, signum: int | None) -> int:
    """A signal while starting: nothing was inspected, but the summary and the log say so. Only the
    standard library from here: the signal may have cut an import short (numpy cannot load twice)."""
    from edgead.runtime.results import ResultsError, append_events, fresh_root, plan

    state.guard.finishing()
    signum = signum if signum is not None else 2  # SIGINT
    code, reason = exit_code(signum), f"signal {signal_name(signum)} while starting"
    print(f"edgead-run: interrupted by {signal_name(signum)} while starting; nothing was inspected",
          file=sys.stderr)
    args = state.args
    try:
        state.plan = state.plan or plan(args.results if state.explicit_results else None, args.log, args.save_ng,
                                        args.overwrite, default_root=fresh_root(args.demo))
    except ResultsError:
        return code  # the results folder was refused: nowhere safe to write
    frames = {"captured": 0, "inspected": 0, "dropped": 0, "errored": 0, "ng": 0, "ok": 0}
    summary = {"model": args.model, "input": state.uri or args.input, "results": None, "stop_reason": reason,
               "frames": frames, "balanced": True, "exit_code": code, "warnings": state.alerts.summary()}
    try:
        if state.log is None:
            state.plan.create()
        summary["results"] = str(state.plan.folder)
        events = [{"event": "stop", "reason": reason, "exit_code": code}, {"event": "summary", **summary}]
        if state.log is not None:
            for event in events:
                state.log.event(event.pop("event"), **event)
        else:
            append_events(state.plan.log, [{"event": "warning", **w} for w in summary["warnings"]] + events)
        print(f"results: {state.plan.write_summary(summary)}")
    except OSError as err:
        print(f"edgead-run: cannot write the results: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
