"""Does the station view slow the line? Pipeline throughput with the view attached and a client
connected, against no view, in one run, as a ratio (target >= 95%); plus the view's frame rate in
the client and how far it is behind the line.

    python -m benchmarks.view [--model BUNDLE] [--frames 400] [--rounds 3] [--frame-size 480]
                              [--clients mjpeg,browser] [--out results/view_cpu.json]

Arms, interleaved round by round (medians reported): ``none`` (no view: no server at all),
``idle`` (the view attached, nobody watching), ``mjpeg`` (a separate Python process reads
/stream.mjpg) and ``browser`` (headless Debian chromium shows the page; skipped without chromium). Frames are
pre-rendered synthetic conveyor parts at ``--frame-size``² replayed from memory under the ``block``
policy, so the pipeline is saturated: any CPU the view takes shows as lost throughput (a paced
camera below capacity would show nothing). Lag = receive time (MJPEG) or paint time (browser)
minus the frame's capture time, same clock. No torch in this process. Default model: the demo
bundle. On a shared 2-core machine the numbers are noisy: the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.pipeline import ReplaySource, _default_model, _demo_category
from edgead.core.machine import describe as machine
from edgead.runtime.infer import describe_engine, load_checked_bundle, open_bundle_engine
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.sinks import SinkContext

PORT_OFFSET = {"mjpeg": 0, "browser": 1, "idle": 2}
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1280,900")


def tree_cpu_s(root_pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(child for child, ppid in parent.items() if ppid == pid)
    return total


# -- the MJPEG client, a separate process --------------------------------------------------------

def mjpeg_client(url: str, out: str) -> None:
    """Read the stream (reconnecting while the benchmark swaps servers); one line per frame:
    connection, receive time, frame id, capture time."""
    conn = 0
    with open(out, "w", buffering=1) as log:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=30) as stream:
                    conn += 1
                    while line := stream.readline():
                        if not line.startswith(b"--edgeadframe"):
                            continue
                        head = {}
                        while (h := stream.readline().strip()):
                            k, _, v = h.decode().partition(":")
                            head[k.strip().lower()] = v.strip()
                        if "content-length" not in head:
                            break  # the closing boundary
                        stream.read(int(head["content-length"]))
                        log.write(f"{conn} {time.time():.6f} {head['x-frame']} {head['x-capture-time']}\n")
            except (OSError, ValueError):
                time.sleep(0.05)


def read_mjpeg_log(path: Path, skip: int) -> tuple[list[tuple[float, float]], int]:
    lines = path.read_text().splitlines()
    rows = [line.split() for line in lines[skip:]]
    return [(float(r[1]), float(r[3])) for r in rows if len(r) == 4], len(lines)


# -- the browser client --------------------------------------------------------------------------

def open_browser(profile: str) -> Any | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        print("no chromium/chromedriver: the browser arm is skipped", file=sys.stderr)
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


# -- one round -----------------------------------------------------------------------------------

def run_round(arm: str, bundle: Any, engine: Any, source: ReplaySource, port: int, clients: dict[str, Any],
              tmp: Path, view_fps: float = 15.0) -> dict[str, Any]:
    from edgead.runtime.view import open_view_sink

    post = Postprocessor(bundle.calibration)
    running: list[Pipeline] = []
    sinks, view = [], None
    if arm != "none":
        context = SinkContext(vrange=(bundle.calibration.map_min, bundle.calibration.map_max),
                              stats=lambda: running[0].stats.summary() if running else None,
                              run={"model": str(bundle.root), "detector": bundle.detector,
                                   "backend": "onnxruntime", "precision": "fp32", "input": source.uri})
        # One port per arm: the MJPEG client (always reconnecting) must join its own rounds only.
        view = open_view_sink(f"http://127.0.0.1:{port + PORT_OFFSET[arm]}?fps={view_fps:g}", context)
        sinks = [view]
        if arm == "browser":
            clients["browser"].get(view.url)
        deadline = time.monotonic() + 30
        while arm != "idle" and view.summary()["clients"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # let the client settle (a page also loads its script)
    source.sent = 0
    pipe = Pipeline(source, engine, post, sinks, JsonlLog(tmp / f"{arm}.jsonl"), PipelineConfig(policy="block"))
    running.append(pipe)
    client_pid = clients.get("pids", {}).get(arm)
    view_tid = view.server.thread.native_id if view is not None else None
    before = (time.perf_counter(), time.process_time(), cpu_of(client_pid), thread_cpu_s(view_tid))
    summary = pipe.run().summary
    after = (time.perf_counter(), time.process_time(), cpu_of(client_pid), thread_cpu_s(view_tid))
    wall, process, client, view_thread = (b - a for a, b in zip(before, after))
    n = max(summary["frames"]["inspected"], 1)
    out: dict[str, Any] = {"fps": summary["fps"], "wall_s": round(wall, 3), "frames": summary["frames"]["inspected"],
                           "cpu_ms_per_frame": round(1000.0 * process / n, 3),
                           "view_thread_cores": round(view_thread / wall, 4), "client_cores": round(client / wall, 4),
                           "end_to_end_ms": summary["latency_ms"]["end_to_end"]}
    if view is not None:
        out["view"] = view.summary()
        out["client"] = client_numbers(arm, clients, wall)
        view.close()
    return out


def cpu_of(pid: int | None) -> float:
    return tree_cpu_s(pid) if pid else 0.0


def thread_cpu_s(tid: int | None) -> float:
    """CPU seconds of one thread of this process (the view's server thread)."""
    if tid is None:
        return 0.0
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_numbers(arm: str, clients: dict[str, Any], wall: float) -> dict[str, Any]:
    if arm == "idle":
        return {"frames": 0, "fps": 0.0, "lag_ms": {}}
    if arm == "browser":
        seen = clients["browser"].execute_script("return [window.edgeadView.framesShown, window.edgeadView.lagMs];")
        frames, lags = int(seen[0]), [float(v) for v in seen[1]]
    else:
        rows, clients["mjpeg_seen"] = read_mjpeg_log(clients["mjpeg_log"], clients.get("mjpeg_seen", 0))
        frames, lags = len(rows), [1000.0 * (recv - cap) for recv, cap in rows]
    lag = {q: round(float(np.percentile(lags, int(q[1:]))), 2) for q in ("p50", "p99")} if lags else {}
    return {"frames": frames, "fps": round(frames / wall, 2), "lag_ms": lag}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.view", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="bundle (default: the demo bundle)")
    p.add_argument("--frames", type=int, default=400, help="frames per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frame-size", type=int, default=480, help="side of the square synthetic frames")
    p.add_argument("--clients", default="idle,mjpeg,browser",
                   help="view arms: idle (attached, nobody watching), mjpeg, browser")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    p.add_argument("--view-fps", type=float, default=15.0, help="the view's frame-rate cap (its ?fps=, default 15)")
    p.add_argument("--port", type=int, default=18971)
    p.add_argument("--out", default="results/view_cpu.json")
    p.add_argument("--mjpeg-client", nargs=2, metavar=("URL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mjpeg_client:
        mjpeg_client(*args.mjpeg_client)
        return 0

    model = args.model or _default_model()
    bundle = load_checked_bundle(model, "onnxruntime", "fp32", warn=lambda m: print(m, file=sys.stderr))
    category = bundle.manifest.get("data", {}).get("category") or _demo_category(model) or "metal"
    engine = open_bundle_engine(bundle, "onnxruntime", "fp32", args.threads)
    source = ReplaySource(category, args.frame_size, args.frames, pool=32)
    arms = ["none"] + [a for a in args.clients.split(",") if a in ("idle", "mjpeg", "browser")]
    load_before = os.getloadavg()
    rounds: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        clients: dict[str, Any] = {"mjpeg_log": tmp / "mjpeg.txt"}
        procs = []
        if "mjpeg" in arms:
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.view", "--mjpeg-client",
                                           f"http://127.0.0.1:{args.port}/stream.mjpg", str(tmp / "mjpeg.txt")]))
        clients["pids"] = {"mjpeg": procs[0].pid} if procs else {}
        if "browser" in arms:
            clients["browser"] = open_browser(str(tmp / "profile"))
            if clients["browser"] is None:
                arms.remove("browser")
                rounds.pop("browser")
            else:
                clients["pids"]["browser"] = clients["browser"].service.process.pid
        try:
            run_round("none", bundle, engine, ReplaySource(category, args.frame_size, 30, pool=4), args.port,
                      clients, tmp)  # warm-up
            for _ in range(args.rounds):
                for arm in arms:
                    rounds[arm].append(run_round(arm, bundle, engine, source, args.port, clients, tmp, args.view_fps))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
            if clients.get("browser") is not None:
                clients["browser"].quit()
            engine.close()
    result = summarize(args, bundle, engine, arms, rounds, load_before)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def summarize(args: argparse.Namespace, bundle: Any, engine: Any, arms: list[str],
              rounds: dict[str, list[dict[str, Any]]], load_before: tuple[float, ...]) -> dict[str, Any]:
    """Medians per arm. Two ratios: the measured throughput ratio (wall clock: noisy on a shared
    machine) and the one a CPU-bound station keeps, 1 - (view thread + client cores) / cores,
    from CPU time, which contention does not distort much."""
    cores = len(os.sched_getaffinity(0))
    med = lambda arm, key: float(np.median([r[key] for r in rounds[arm]]))  # noqa: E731
    base = med("none", "fps")
    table: dict[str, Any] = {}
    print(f"{bundle.detector} {list(bundle.input_shape)}, frames {args.frame_size}², {args.rounds} rounds x "
          f"{args.frames} frames, block policy, view fps cap {args.view_fps:g}, {cores} cores (medians)")
    print(f"{'arm':<9}{'line fps':>9}{'ratio':>8}{'view cores':>11}{'client cores':>13}{'CPU-bound ratio':>16}"
          f"{'client fps':>11}{'lag p50':>9}{'lag p99':>9}")
    for arm in arms:
        fps, view_cores, client_cores = med(arm, "fps"), med(arm, "view_thread_cores"), med(arm, "client_cores")
        row: dict[str, Any] = {"fps": round(fps, 2), "ratio": round(fps / base, 3) if base else None,
                               "rounds_fps": [r["fps"] for r in rounds[arm]],
                               "cpu_ms_per_frame": round(med(arm, "cpu_ms_per_frame"), 3),
                               "view_thread_cores": round(view_cores, 4), "client_cores": round(client_cores, 4),
                               "cpu_bound_ratio": round(1.0 - (view_cores + client_cores) / cores, 3),
                               "view_thread_only_ratio": round(1.0 - view_cores / cores, 3), "rounds": rounds[arm]}
        line = f"{arm:<9}{fps:>9.1f}{row['ratio']:>8.1%}"
        if arm != "none":
            lags = [r["client"]["lag_ms"] for r in rounds[arm] if r["client"]["lag_ms"]]
            row["client_fps"] = float(np.median([r["client"]["fps"] for r in rounds[arm]]))
            row["lag_ms_p50"] = float(np.median([lag["p50"] for lag in lags])) if lags else None
            row["lag_ms_p99"] = float(np.median([lag["p99"] for lag in lags])) if lags else None
            line += (f"{view_cores:>11.3f}{client_cores:>13.3f}{row['cpu_bound_ratio']:>16.1%}{row['client_fps']:>11.1f}"
                     f"{row['lag_ms_p50'] or float('nan'):>9.1f}{row['lag_ms_p99'] or float('nan'):>9.1f}")
        table[arm] = row
        print(line + f"   rounds fps {row['rounds_fps']}")
    return {"benchmark": "view", "machine": machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "noisy": "shared 2-core machine: other engineers' jobs ran meanwhile (see loadavg); the wall-clock "
                     "ratio is noisy, the CPU-time one much less so",
            "model": str(bundle.root), "engine": describe_engine(engine), "frame_size": args.frame_size,
            "frames_per_round": args.frames, "rounds": args.rounds, "view_max_fps": args.view_fps,
            "target_ratio": 0.95, "arms": table}


if __name__ == "__main__":
    sys.exit(main())
