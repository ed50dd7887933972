"""Line sinks on loopback: what MQTT + OPC UA + Modbus TCP cost the station, and how fast each
verdict is on the wire.

    python -m benchmarks.line_sinks [--model BUNDLE] [--frames 300] [--rounds 3] [--rate 30]
                                    [--paced-frames 150] [--out results/line_sinks_cpu.json]

1. throughput: the full pipeline (replayed synthetic frames, ``block`` policy, JSONL log) with no
   sink and with all three sinks attached, alternating over ``--rounds`` in one run; the ratio of
   the medians (target >= 0.95), and the station process's CPU time per frame (fair on a shared
   machine, where wall-clock rounds swing with the neighbours' load);
2. latency: a paced run at ``--rate`` fps (a line's pace) with all three sinks; per sink p50/p99
   from the end of post-processing to the message confirmed on the wire (MQTT QoS 1 PUBACK, the
   OPC UA value in the address space, the Modbus coil write acknowledged); target p99 < 5 ms. The
   saturated rounds' latencies are reported too: there a sink slower than the pipeline queues
   (Modbus: one pulse per pulse_ms + gap_ms), so they measure the queue, not the link.

A local mosquitto is the broker; pymodbus's server runs in a subprocess (a PLC is another machine:
its work must not be charged to the station); the OPC UA server is the station's own, in process.
Everything listens on 127.0.0.1 only. Default model: the demo bundle (as benchmarks.pipeline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.pipeline import ReplaySource, _default_model, _demo_category
from edgead.runtime.infer import describe_engine, load_checked_bundle, open_bundle_engine
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.sinks import SinkContext, open_sink
from edgead.runtime.sources import Pacer

LOOPBACK = "127.0.0.1"


def cpu_description() -> dict[str, Any]:
    """CPU model, cores and the ISA flags that matter to the engines."""
    from edgead.core.machine import describe

    return describe()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode})")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {LOOPBACK}:{port}")


def start_servers(folder: Path) -> tuple[list[subprocess.Popen], int, int]:
    broker = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(broker).exists():
        raise SystemExit("mosquitto is not installed: apt-get install mosquitto")
    mqtt_port, modbus_port = free_port(), free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {mqtt_port} {LOOPBACK}\nallow_anonymous true\n")
    procs = [subprocess.Popen([broker, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.line_sinks", "--serve-modbus", str(modbus_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port(mqtt_port, procs[0], "mosquitto")
    wait_port(modbus_port, procs[1], "the Modbus server")
    return procs, mqtt_port, modbus_port


def serve_modbus(port: int) -> None:
    """A PLC stand-in: pymodbus's TCP server with 64 coils, until killed."""
    import asyncio
    import logging

    from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
    from pymodbus.server import ModbusTcpServer

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    context = ModbusServerContext(devices={1: ModbusDeviceContext(co=ModbusSequentialDataBlock(1, [0] * 64))},
                                  single=False)

    async def serve() -> None:
        await ModbusTcpServer(context, address=(LOOPBACK, port)).serve_forever()

    asyncio.run(serve())


class PacedReplay(ReplaySource):
    """The replayed frames at a line's pace: a live source."""

    live = True

    def __init__(self, *args: Any, rate: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pacer = Pacer(rate)

    def read(self):
        self.pacer.wait()
        return super().read()


def line_uris(mqtt_port: int, modbus_port: int) -> dict[str, str]:
    return {"mqtt": f"mqtt://{LOOPBACK}:{mqtt_port}/edgead/bench?on=all&qos=1&station=bench",
            "opcua": f"opc.tcp://{LOOPBACK}:{free_port()}/edgead?station=bench",
            "modbus": f"modbus://{LOOPBACK}:{modbus_port}?unit=1&coil=0&pulse_ms=10&gap_ms=10"}


def one_run(bundle: Any, engine: Any, source: Any, uris: dict[str, str] | None, run: dict[str, Any],
            folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One pipeline run; returns (pipeline summary, per-sink summaries)."""
    context = SinkContext(say=lambda m: print(f"  {m}", file=sys.stderr), run=run)
    sinks = [open_sink(uri, context) for uri in (uris or {}).values()]
    log = JsonlLog(folder / "log.jsonl")
    try:
        pipe = Pipeline(source, engine, Postprocessor(bundle.calibration), sinks, log, PipelineConfig(policy="block"))
        cpu = time.process_time()
        summary = pipe.run().summary
        done = summary["frames"]["inspected"] + summary["frames"]["errored"]
        summary["cpu_ms_per_frame"] = 1000.0 * (time.process_time() - cpu) / max(done, 1)
        per_sink = {name: sink.summary() for name, sink in zip(uris or {}, sinks)}
    finally:
        for sink in sinks:
            sink.close()
        log.close()
    return summary, per_sink


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.line_sinks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="bundle (default: the demo bundle)")
    p.add_argument("--frames", type=int, default=300, help="frames per saturated run")
    p.add_argument("--rounds", type=int, default=3, help="alternating none/all rounds (medians reported)")
    p.add_argument("--rate", type=float, default=30.0, help="fps of the paced latency run")
    p.add_argument("--paced-frames", type=int, default=150)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--out", default="results/line_sinks_cpu.json")
    p.add_argument("--serve-modbus", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_modbus:
        serve_modbus(args.serve_modbus)
        return 0

    model = args.model or _default_model()
    bundle = load_checked_bundle(model, "onnxruntime", "fp32", warn=lambda m: print(m, file=sys.stderr))
    category = bundle.manifest.get("data", {}).get("category") or _demo_category(model) or "washer"
    size = int(bundle.input_shape[-1])
    engine = open_bundle_engine(bundle, "onnxruntime", "fp32", args.threads)
    run = {"model": str(bundle.root), "detector": bundle.detector, "backend": "onnxruntime", "precision": "fp32",
           "input": f"replay://{category}", "threshold": bundle.calibration.image_threshold, "certified": True}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        procs, mqtt_port, modbus_port = start_servers(folder)
        try:
            one_run(bundle, engine, ReplaySource(category, size, 30), None, run, folder)  # warm-up
            none_fps, all_fps, saturated, cpu = [], [], [], {"none": [], "all": []}
            for r in range(args.rounds):
                order = ("none", "all") if r % 2 == 0 else ("all", "none")
                for kind in order:
                    uris = line_uris(mqtt_port, modbus_port) if kind == "all" else None
                    summary, sinks = one_run(bundle, engine, ReplaySource(category, size, args.frames), uris, run,
                                             folder)
                    (all_fps if kind == "all" else none_fps).append(summary["fps"])
                    cpu[kind].append(summary["cpu_ms_per_frame"])
                    if sinks:
                        saturated.append(sinks)
            paced_summary, paced = one_run(bundle, engine, PacedReplay(category, size, args.paced_frames,
                                                                       rate=args.rate),
                                           line_uris(mqtt_port, modbus_port), run, folder)
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)
            engine.close()
    ratio = float(np.median(all_fps) / np.median(none_fps)) if none_fps and np.median(none_fps) else float("nan")
    result = {
        "cpu": cpu_description(), "model": str(bundle.root), "engine": describe_engine(engine),
        "input_shape": list(bundle.input_shape), "frames": args.frames, "rounds": args.rounds,
        "throughput": {"none_fps": none_fps, "all_sinks_fps": all_fps, "ratio": round(ratio, 3), "target": 0.95,
                       "meets_target": bool(ratio >= 0.95)},
        "cpu_ms_per_frame": {"none": round(float(np.median(cpu["none"])), 3),
                             "all_sinks": round(float(np.median(cpu["all"])), 3),
                             "ratio_none_over_all": round(float(np.median(cpu["none"]) / np.median(cpu["all"])), 3),
                             "note": "this process's CPU time (fair under contention): the throughput ratio a "
                                     "CPU-bound station would see"},
        "latency_paced": {"rate_fps": args.rate, "frames": paced_summary["frames"], "p99_target_ms": 5.0,
                          "sinks": {k: _latency(v) for k, v in paced.items()},
                          "meets_target": all(_latency(v)["p99_ms"] < 5.0 for v in paced.values())},
        "latency_saturated_last_round": {k: _latency(v) for k, v in saturated[-1].items()} if saturated else {},
        "note": "wall-clock numbers on a shared machine are noisy; compare only within one run",
    }
    print(f"{bundle.detector} {list(bundle.input_shape)} onnxruntime/fp32, {args.threads} thread(s); "
          f"{result['cpu']['model']}")
    print(f"throughput, median of {args.rounds}: none {np.median(none_fps):.1f} fps, all three sinks "
          f"{np.median(all_fps):.1f} fps -> ratio {ratio:.1%} (target >= 95%)")
    c = result["cpu_ms_per_frame"]
    print(f"station CPU per frame: none {c['none']:.2f} ms, all three sinks {c['all_sinks']:.2f} ms "
          f"-> CPU-bound ratio {c['ratio_none_over_all']:.1%}")
    print(f"latency at {args.rate:g} fps (end of post-processing -> on the wire):")
    print(f"  {'sink':<8}{'p50 ms':>9}{'p99 ms':>9}{'sent':>7}{'unsent':>8}")
    for name, v in result["latency_paced"]["sinks"].items():
        print(f"  {name:<8}{v['p50_ms']:>9.3f}{v['p99_ms']:>9.3f}{v['sent']:>7}{v['unsent']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


def _latency(s: dict[str, Any]) -> dict[str, Any]:
    lat = s["latency_ms"]
    return {"p50_ms": lat["p50"], "p99_ms": lat["p99"], "n": lat["n"], "sent": s["sent"], "unsent": s["unsent"],
            "unsent_reasons": s["unsent_reasons"]}


if __name__ == "__main__":
    sys.exit(main())
