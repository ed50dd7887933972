"""Issue 13 through ``edgead-run`` itself, with the real small bundle of the end-to-end tests: every
frame accounted for and traceable, nothing overwritten, degenerate input refused, arguments
checked, warnings that stay under --quiet, signals at any moment. Each test failed on the code
before the change (see the issue's list)."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.runtime.cli import main
from test_runtime_e2e import SIZE, bundle, copy_bundle, env, read_jsonl  # noqa: F401 - the bundle fixture

RUN = [sys.executable, "-m", "edgead.runtime.cli"]


def parts(folder: Path, n: int = 4, size: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        cv2.imwrite(str(folder / f"part{i:02d}.png"), rng.integers(0, 255, (size, size, 3), np.uint8))
    return folder


def summary_of(results: Path) -> dict:
    return json.loads((results / "summary.json").read_text())


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- every frame accounted for and traceable -----------------------------------------------------

def test_corrupt_images_are_error_frames_counted_in_captured(bundle, tmp_path):
    folder = parts(tmp_path / "in")
    (folder / "part01.png").write_bytes(b"")  # 0 bytes
    (folder / "part02.png").write_bytes((folder / "part03.png").read_bytes()[:100])  # truncated
    results = tmp_path / "r"
    rc = main([str(folder), "--model", str(bundle), "--results", str(results), "--quiet"])
    f = summary_of(results)["frames"]
    assert (f["captured"], f["inspected"], f["errored"]) == (4, 2, 2) and rc == 5
    rows, _ = read_jsonl(results / "log.jsonl")
    errors = {Path(r["source"]).name: r["error"] for r in rows if r["verdict"] == "ERROR"}
    assert set(errors) == {"part01.png", "part02.png"} and "empty file" in errors["part01.png"]
    assert [r["frame"] for r in rows] == [0, 1, 2, 3]  # no id skipped, so none shifted


def test_a_folder_of_only_bad_files_is_not_a_clean_run(bundle, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("a.png", "b.jpg", "c.bmp"):
        (folder / name).write_bytes(b"not an image")
    rc = main([str(folder), "--model", str(bundle), "--results", str(tmp_path / "r"), "--quiet"])
    f = summary_of(tmp_path / "r")["frames"]
    assert rc == 5 and f["captured"] == f["errored"] == 3 and f["inspected"] == 0


def test_every_jsonl_record_names_its_source(bundle, tmp_path):
    folder = parts(tmp_path / "in", n=3)
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    cases = [(str(folder), "image"), (str(clip), "video"), ("synthetic://washer", "synthetic")]
    for i, (uri, kind) in enumerate(cases):
        results = tmp_path / f"r{i}"
        assert main([uri, "--model", str(bundle), "--results", str(results), "--frames", "5", "--quiet"]) == 0
        rows, _ = read_jsonl(results / "log.jsonl")
        assert rows and all(r["source_kind"] == kind and r["source"] for r in rows)
        if kind == "image":
            assert [Path(r["source"]).name for r in rows] == ["part00.png", "part01.png", "part02.png"]
        else:
            assert [r["source_frame"] for r in rows] == list(range(5))
            assert all(r["source"] == (str(clip) if kind == "video" else uri) for r in rows)


def test_ng_images_are_named_after_their_source(bundle, tmp_path, monkeypatch):
    from edgead.core.calibration import Calibration

    monkeypatch.setattr(Calibration, "verdict", lambda self, raw: "NG")  # every part rejected
    folder = parts(tmp_path / "in", n=3)
    (folder / "part00.png").write_bytes(b"junk")  # an earlier bad file must not shift the names
    results, ng = tmp_path / "r", tmp_path / "ng"
    main([str(folder), "--model", str(bundle), "--results", str(results), "--save-ng", str(ng), "--quiet"])
    rows, _ = read_jsonl(results / "log.jsonl")
    expected = {f"{r['frame']:08d}_{Path(r['source']).stem}_frame.png" for r in rows if r["verdict"] == "NG"}
    assert expected == {"00000001_part01_frame.png", "00000002_part02_frame.png"}
    assert expected <= {p.name for p in ng.iterdir()}


def test_truncated_avi_is_reported_as_truncated(bundle, tmp_path):
    full = tmp_path / "full.avi"
    writer = cv2.VideoWriter(str(full), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    rng = np.random.default_rng(0)
    for _ in range(20):
        writer.write(rng.integers(0, 255, (48, 64, 3), np.uint8))
    writer.release()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])  # a half-written recording
    results = tmp_path / "r"
    rc = main([str(cut), "--model", str(bundle), "--results", str(results), "--quiet"])
    summary = summary_of(results)
    assert rc == 6 and summary["exit_code"] == 6
    assert summary["truncated"]["declared_frames"] == 20 and summary["truncated"]["decoded_frames"] < 20
    rows, events = read_jsonl(results / "log.jsonl")
    assert rows[-1]["verdict"] == "ERROR" and "truncated video" in rows[-1]["error"]  # the half-decoded one
    assert len(rows) == summary["frames"]["captured"] == summary["truncated"]["decoded_frames"]
    assert any(e["event"] == "warning" and e["kind"] == "truncated" for e in events)


def test_one_pixel_image_is_an_error(bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "dot.png"), np.full((1, 1, 3), 128, np.uint8))
    rc = main([str(folder), "--model", str(bundle), "--results", str(tmp_path / "r"), "--quiet"])
    rows, _ = read_jsonl(tmp_path / "r" / "log.jsonl")
    assert rc == 5 and rows[0]["verdict"] == "ERROR" and "minimum size" in rows[0]["error"]


# -- nothing overwritten -------------------------------------------------------------------------

def test_a_second_run_does_not_touch_the_first_runs_files(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["synthetic://washer", "--model", str(bundle), "--frames", "4", "--quiet"]
    assert main(args + ["--save-ng", "ng"]) == 0
    first = next((tmp_path / "edgead-results").iterdir())
    before = digest(first)
    assert main(args) == 0  # default: a fresh folder of its own
    runs = sorted((tmp_path / "edgead-results").iterdir())
    assert len(runs) == 2 and digest(first) == before
    # An explicit, non-empty folder is refused, and so is a non-empty --save-ng folder.
    (tmp_path / "ng" / "00000000_frame.png").write_bytes(b"earlier")
    ng_before = digest(tmp_path / "ng")
    assert main(args + ["--results", str(first)]) == 2
    assert main(args + ["--results", "other", "--save-ng", "ng"]) == 2
    assert digest(first) == before and digest(tmp_path / "ng") == ng_before
    assert main(args + ["--results", str(first), "--overwrite"]) == 0


def test_an_existing_second_positional_is_refused_as_output(bundle, tmp_path, capsys):
    clips = []
    for name in ("a.avi", "b.avi"):  # `edgead-run g3/*.avi` unquoted
        writer = cv2.VideoWriter(str(tmp_path / name), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
        writer.write(np.zeros((48, 64, 3), np.uint8))
        writer.release()
        clips.append(tmp_path / name)
    before = clips[1].read_bytes()
    rc = main([str(clips[0]), str(clips[1]), "--model", str(bundle), "--results", str(tmp_path / "r")])
    assert rc == 2 and "second input" in capsys.readouterr().err and clips[1].read_bytes() == before


# -- bad arguments, warnings under --quiet, one-line errors --------------------------------------

@pytest.mark.parametrize("flag, value", [("--input-width", "-5"), ("--input-rate", "-1"), ("--line-rate", "-10"),
                                         ("--input-loop", "-5"), ("--frames", "0"), ("--threads", "0")])
def test_bad_argument_is_a_usage_error(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synthetic://washer", "--model", "b", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}" in err and "usage:" in err


def test_safety_warnings_appear_under_quiet(bundle, tmp_path, capsys):
    b = copy_bundle(bundle, tmp_path)
    onnx = pytest.importorskip("onnx")
    graph = next(b.glob("detector.fp32.onnx"))
    model = onnx.load(str(graph))
    model.doc_string = "edited after export"  # a valid graph that fails its checksum
    onnx.save(model, str(graph))
    results = tmp_path / "r"
    rc = main(["synthetic://washer", "--model", str(b), "--frames", "3", "--results", str(results),
               "--allow-unverified", "--quiet"])
    assert rc == 0
    assert "WARNING" in capsys.readouterr().err and "checksum" in (results / "log.jsonl").read_text()
    _, events = read_jsonl(results / "log.jsonl")
    assert any(e["event"] == "warning" and "checksum" in e["message"] for e in events)
    assert any("checksum" in w["message"] for w in summary_of(results)["warnings"])


def test_an_internal_error_is_one_line(bundle, tmp_path, monkeypatch, capsys):
    import edgead.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.Pipeline, "run", lambda self: 1 / 0)
    args = ["synthetic://washer", "--model", str(bundle), "--results", str(tmp_path / "r")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error: ZeroDivisionError" in err and "--debug" in err
    assert main(args + ["--debug", "--overwrite"]) == 1 and "Traceback" in capsys.readouterr().err


# -- signals -------------------------------------------------------------------------------------

def wait_until_loading_numpy(pid: int, deadline_s: float = 60.0) -> None:
    """Until the process has numpy's extension mapped: edgead code is running (before it, the
    interpreter itself is starting, which no program can report on, and a loaded CI machine can
    take over half a second for it). edgead-run imports numpy only after its signal handlers are in."""
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + deadline_s
    while maps.exists() and time.monotonic() < deadline:
        try:
            if "_multiarray_umath" in maps.read_text():
                return
        except OSError:
            return
        time.sleep(0.002)


def test_sigint_at_half_a_second_still_writes_the_summary(bundle, tmp_path):
    results = tmp_path / "r"
    started = time.monotonic()
    proc = subprocess.Popen(RUN + ["synthetic://washer", "--model", str(bundle), "--results", str(results)],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_loading_numpy(proc.pid)
    time.sleep(max(0.0, 0.5 - (time.monotonic() - started)))  # in the imports, the bundle check or the first frames
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = summary_of(results)
    assert summary["exit_code"] == 130 and summary["stop_reason"].startswith("signal SIGINT") and summary["balanced"]
    _, events = read_jsonl(results / "log.jsonl")
    assert [e["event"] for e in events][-2:] == ["stop", "summary"]
    assert "Traceback" not in err and "not installed" not in err


def test_timeouts_double_signal_is_not_kill_now(bundle, tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("no coreutils timeout")
    results = tmp_path / "r"
    # timeout signals the child, then its whole process group: two SIGTERMs at once.
    cmd = ["timeout", "--preserve-status", "-s", "TERM", "3"] + RUN + [
        f"synthetic://washer?size={SIZE}&rate=50", "--model", str(bundle), "--results", str(results)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=90)
    assert proc.returncode == 143, proc.stderr
    assert summary_of(results)["stop_reason"].startswith("signal SIGTERM")


def test_a_second_signal_within_the_grace_period_still_writes_the_summary(bundle, tmp_path):
    """The copy of a signal sent to the process group can land while the run drains (here: the
    capture thread sleeps in a 1 fps source for up to a second); it must not kill the run."""
    results = tmp_path / "r"
    proc = subprocess.Popen(RUN + [f"synthetic://washer?size={SIZE}&rate=1", "--model", str(bundle),
                                   "--results", str(results)],
                            cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = results / "log.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (log.is_file() and '"frame": 0' in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.1)  # handled by then, and well inside the grace period
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert summary_of(results)["stop_reason"] == "signal SIGTERM"


def test_an_interrupted_import_is_reported_as_an_interrupt(bundle, tmp_path, monkeypatch, capsys):
    import os

    import edgead.runtime.infer as infer
    from edgead.core.engine import EngineError

    def interrupted_import(*args, **kw):
        try:  # what a library's import does when the signal lands inside it
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except BaseException:
            raise EngineError("onnxruntime is not installed: pip install onnxruntime") from None

    monkeypatch.setattr(infer, "open_bundle_engine", interrupted_import)
    results = tmp_path / "r"
    assert main(["synthetic://washer", "--model", str(bundle), "--results", str(results)]) == 130
    assert "interrupted by SIGINT" in capsys.readouterr().err
    assert summary_of(results)["stop_reason"] == "signal SIGINT while starting"
