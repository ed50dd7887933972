"""``edgead-run`` end to end with a real (tiny, random-init) ONNX Runtime bundle: signals and the
JSONL log, bundle refusal, exit codes, no torch in the runtime process, the pipeline benchmark."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.core.bundle import load_bundle
from bundles import tiny_bundle
from edgead.runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("runtime_bundle"), "washer")


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("DISPLAY", None)
    return e


def read_jsonl(path: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line must parse
    return [r for r in rows if "event" not in r], [r for r in rows if "event" in r]


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


# -- signals and the log -------------------------------------------------------------------------

def test_sigterm_drains_and_the_log_is_complete(bundle, tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "edgead.runtime.cli", f"synthetic://washer?size={SIZE}&rate=100",
           "--model", str(bundle), "--results", str(results), "--line-rate", "50"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = results / "log.jsonl"
    deadline = time.monotonic() + 90  # a loaded CI machine starts slowly
    while time.monotonic() < deadline:  # wait until frames are flowing
        if log.is_file() and log.read_text().count('"frame"') >= 20:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err

    frames, events = read_jsonl(log)
    summary = json.loads((results / "summary.json").read_text())
    f = summary["frames"]
    assert f["captured"] == f["inspected"] + f["dropped"] + f["errored"] and summary["balanced"]
    assert len(frames) == f["inspected"] + f["errored"] >= 20  # one line per frame
    assert len({r["frame"] for r in frames}) == len(frames)
    for r in frames:
        assert r["verdict"] in ("OK", "NG") and isinstance(r["score"], float) and 0 <= r["score_norm"] <= 1
        assert set(r["latency_ms"]) == {"preprocess", "infer", "postprocess", "sink"}
        assert r["age_ms"] > 0 and r["t_capture"] > 0 and r["truth"] in ("good", "hole", "scratch", "crack",
                                                                           "stain", "particle", "missing", "extra")
        for region in r["regions"]:
            assert len(region["bbox"]) == 4 and region["area"] > 0
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-2:] == ["stop", "summary"]
    assert events[-2]["reason"] == "signal SIGTERM" and events[-2]["exit_code"] == 143
    assert summary["stop_reason"] == "signal SIGTERM" and summary["drop_policy"] == "latest"
    assert "ground_truth" in summary and summary["line_rate"]["rate_hz"] == 50
    assert "captured" in out and "p99" in out


def test_runtime_process_never_imports_torch(bundle, tmp_path):
    code = ("import sys; from edgead.runtime.cli import main; rc = main(sys.argv[1:]); "
            "print('TORCH_LOADED', any(m == 'torch' or m.startswith('torch.') for m in sys.modules)); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "synthetic://washer", "--model", str(bundle), "--frames", "12",
           "--results", str(tmp_path / "r"), "--save-ng", str(tmp_path / "ng"), str(tmp_path / "out.avi")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "TORCH_LOADED False" in proc.stdout


# -- inputs and outputs through the CLI ----------------------------------------------------------

def test_video_in_annotated_video_out(bundle, tmp_path):
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 60))
    for i in range(8):
        writer.write(np.full((60, 80, 3), 30 * i, np.uint8))
    writer.release()
    out = tmp_path / "annotated.avi"
    rc = main([str(clip), str(out), "--model", str(bundle), "--results", str(tmp_path / "r"), "--quiet",
               "--save-ng", str(tmp_path / "ng"), "--log", str(tmp_path / "x.jsonl")])
    assert rc == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["frames"]["captured"] == summary["frames"]["inspected"] == 8
    assert summary["stop_reason"] == "end of stream" and summary["drop_policy"] == "block"
    cap = cv2.VideoCapture(str(out))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 8
    frames, _ = read_jsonl(tmp_path / "x.jsonl")
    assert len(frames) == 8
    ng = [r["frame"] for r in frames if r["verdict"] == "NG"]
    assert len(list((tmp_path / "ng").glob("*_frame.png"))) == len(ng)


def test_missing_camera_exits_nonzero_naming_it(bundle, tmp_path, capsys):
    rc = main(["--camera", "97", "--model", str(bundle), "--results", str(tmp_path)])
    assert rc == 3
    assert "/dev/video97" in capsys.readouterr().err


def test_missing_video_file_exits_nonzero(bundle, tmp_path, capsys):
    rc = main([str(tmp_path / "nope.mp4"), "--model", str(bundle), "--results", str(tmp_path)])
    assert rc == 3 and "nope.mp4" in capsys.readouterr().err


def test_explicit_display_without_gui_is_a_clear_error(bundle, tmp_path, capsys, monkeypatch):
    import edgead.runtime.sinks as sinks

    monkeypatch.setattr(sinks, "has_gui", lambda info=None: False)
    rc = main(["synthetic://washer", "display://0", "--model", str(bundle), "--results", str(tmp_path)])
    assert rc == 2 and "no GUI" in capsys.readouterr().err


def test_frame_errors_give_their_own_exit_code(bundle, tmp_path, monkeypatch):
    import edgead.runtime.infer as infer
    from edgead.engines import open_engine

    def nan_engine(b, backend, precision, threads=None, graph=None):
        engine = open_engine(b, backend, precision, **({"graph": graph} if graph else {}))
        real = engine.run

        def run(feeds):
            out = dict(real(feeds))
            out["score"] = np.full_like(out["score"], np.nan)
            return out

        engine.run = run
        return engine

    monkeypatch.setattr(infer, "open_bundle_engine", nan_engine)
    rc = main(["synthetic://washer", "--model", str(bundle), "--frames", "5", "--results", str(tmp_path), "--quiet"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 5 and summary["frames"]["errored"] == 5 and summary["frames"]["inspected"] == 0


def test_usage_errors(bundle, tmp_path):
    assert main(["--model", str(bundle)]) == 2  # no input
    assert main(["--camera", "0", "synthetic://washer", "--model", str(bundle)]) == 2
    assert main(["synthetic://washer"]) == 2  # no model


def test_help_explains_uris_and_camera_numbering(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("csi://0", "/dev/video0", "v4l2:///dev/videoN", "rtsp://", "synthetic://", "--input-loop",
                   "--drop-policy", "exit codes", "143"):
        assert needle in text, needle


# -- bundle refusal ------------------------------------------------------------------------------

def test_tampered_bundle_is_refused_unless_allowed(bundle, tmp_path, capsys):
    b = copy_bundle(bundle, tmp_path)
    graph = b / load_bundle(b).manifest["graphs"]["detector"]["fp32"]
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(graph))
    model.doc_string = "edited after export"  # still a valid graph, but no longer the certified file
    onnx.save(model, str(graph))
    args = ["synthetic://washer", "--model", str(b), "--frames", "3", "--results", str(tmp_path / "r")]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "--allow-unverified" in err
    assert main(args + ["--allow-unverified"]) == 0


def test_bundle_without_parity_certificate_is_refused_unless_allowed(bundle, tmp_path, capsys):
    from edgead.certify.certificate import write_certificate
    from edgead.engines import open_engine

    b = tmp_path / "bundle"
    shutil.copytree(bundle, b, ignore=shutil.ignore_patterns("*.cert.json"))
    args = ["synthetic://washer", "--model", str(b), "--frames", "3", "--results", str(tmp_path / "r"), "--overwrite"]
    assert main(args + ["--no-certify"]) == 4
    assert "no parity certificate for onnxruntime/fp32" in capsys.readouterr().err
    assert main(args + ["--no-certify", "--allow-unverified"]) == 0
    # A failed certificate of this device is refused too (and not silently re-made).
    engine = open_engine(load_bundle(b), "onnxruntime", "fp32")
    write_certificate(load_bundle(b), engine, "fp32", {"pass": False, "checks": {"map_max_abs": False}})
    engine.close()
    capsys.readouterr()
    assert main(args) == 4
    assert "FAILED its parity certificate on this device (map_max_abs)" in capsys.readouterr().err
    # A certificate for another precision does not count.
    assert main(args + ["--precision", "fp16"]) == 4


def test_not_a_bundle(tmp_path, capsys):
    assert main(["synthetic://washer", "--model", str(tmp_path), "--allow-unverified"]) == 4
    assert "not a bundle" in capsys.readouterr().err


# -- the pipeline benchmark ----------------------------------------------------------------------

def test_pipeline_benchmark(bundle, tmp_path, capsys):
    from benchmarks.pipeline import main as bench

    out = tmp_path / "bench.json"
    assert bench(["--model", str(bundle), "--frames", "40", "--warmup", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engine_only"]["fps"] > 0 and result["pipeline"]["fps"] > 0
    assert result["pipeline"]["frames"]["inspected"] == result["frames"] == 39 and result["ratio"] > 0  # 3 x 13
    assert "pipeline / engine-only" in capsys.readouterr().out
    assert result["thread_choice"] is None  # the engine's own default


def test_pipeline_benchmark_takes_edgead_runs_thread_choice(bundle, tmp_path, capsys):
    from benchmarks.pipeline import main as bench

    out = tmp_path / "bench.json"
    assert bench(["--model", str(bundle), "--frames", "20", "--rounds", "1", "--warmup", "2", "--threads", "auto",
                  "--native", "off", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    choice = result["thread_choice"]
    assert choice["threads"] == result["engine"]["threads"] and str(choice["threads"]) in choice["fps"]
    assert all(fps > 0 for fps in choice["fps"].values())
    assert "threads auto:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench(["--model", str(bundle), "--threads", "many"])
