"""Where an ONNX Runtime CPU engine spends a frame: its per-operator profile, per op type.

    python benchmarks/ort_profile.py BUNDLE [--precision fp32 int8] [--runs 30] [--threads 1] [--out JSON]

ORT's own profiler (``SessionOptions.enable_profiling``) times every kernel of the optimised graph,
so Q/DQ pairs that ORT fused into QLinearConv show up as such, and a ConvTranspose that stayed in
float between a DequantizeLinear and a QuantizeLinear shows up as ConvTranspose plus its Q/DQ
nodes. Per op type: share of the kernel time, mean ms per frame, node count; plus the float
ConvTranspose and Cast nodes of a reduced-precision graph, the usual suspects on CPUs.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgead.core import machine  # noqa: E402
from edgead.engines import resolve_graph  # noqa: E402


def profile(onnx_path: Path, runs: int = 30, threads: int = 1) -> dict[str, Any]:
    """Per-op-type kernel time of ``onnx_path`` on ORT's CPU provider over ``runs`` frames."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prof")
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(0).random(inp.shape, dtype=np.float32)
        for _ in range(5):  # warm-up, in the profile too: dropped below by the run count
            sess.run(None, {inp.name: x})
        for _ in range(runs):
            sess.run(None, {inp.name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_run = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    n_runs = len(per_run)
    time_by_op: dict[str, float] = collections.defaultdict(float)
    nodes_by_op: dict[str, set[str]] = collections.defaultdict(set)
    for e in kernels:
        op = e["args"].get("op_name", "?")
        time_by_op[op] += e["dur"] / 1e3
        nodes_by_op[op].add(e["name"].removesuffix("_kernel_time"))
    total = sum(time_by_op.values())
    ops = {op: {"ms_per_frame": t / max(n_runs, 1), "share": t / total if total else 0.0,
                "nodes": len(nodes_by_op[op])}
           for op, t in sorted(time_by_op.items(), key=lambda kv: -kv[1])}
    run_ms = sorted(e["dur"] / 1e3 for e in per_run[5:]) or [0.0]
    return {"graph": onnx_path.name, "threads": threads, "runs": n_runs, "median_run_ms": float(np.median(run_ms)),
            "ops": ops, "float_conv_transpose": sorted(nodes_by_op.get("ConvTranspose", set())),
            "casts": len(nodes_by_op.get("Cast", set()))}


def print_profile(p: dict[str, Any], top: int = 8) -> None:
    print(f"{p['graph']}: {p['median_run_ms']:.2f} ms median run ({p['threads']} thread(s), {p['runs']} runs)")
    for op, r in list(p["ops"].items())[:top]:
        print(f"  {op:<24}{r['ms_per_frame']:>8.2f} ms {r['share']:>6.1%}  {r['nodes']:>3} nodes")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="+", help="bundle folders or .onnx files")
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16", "int8"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the profiles as JSON")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {"host": machine.describe(), "profiles": {}}
    for item in args.bundle:
        for precision in args.precision:
            try:
                _, path = resolve_graph(item, precision)
            except Exception as exc:  # noqa: BLE001 - a precision the bundle lacks
                print(f"{item} {precision}: skipped ({exc})")
                continue
            p = profile(path, args.runs, args.threads)
            report["profiles"][f"{item} {precision}"] = p
            print_profile(p)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
