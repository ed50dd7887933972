"""Issue 13, without a bundle: the degenerate-input guards, the score range, warnings that stay,
the signal policy, the results-folder rules, the checked video sink, argument types and the
orphan MVTec mask. Real files and real OpenCV video; engine doubles from the pipeline tests."""

from __future__ import annotations

import dataclasses
import io
import json
import signal

import cv2
import numpy as np
import pytest

from edgead.core.cli_support import exit_code_for, one_line
from edgead.runtime.alerts import Alerts
from edgead.runtime.guards import MAX_UPSCALE, MIN_SIDE, ScoreRange, frame_problem
from edgead.runtime.jobs import Frame
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.results import ResultsError, check_outputs, ng_stem, plan
from edgead.runtime.signals import Interrupted, SignalGuard
from edgead.runtime.sinks import NgSaver, SinkError, VideoSink
from edgead.runtime.sources import CaptureSource, FrameError, open_source
from test_runtime_pipeline import CAL, SIZE, FakeEngine, ListSource, frames


# -- degenerate frames ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape, why", [
    ((1, 1, 3), "below the minimum size"),
    ((MIN_SIDE - 1, 300, 3), "below the minimum size"),
    ((40, 40, 3), "upscaled 6.4x"),  # 256-px model: each side needs >= 64 px
    ((0, 0, 3), "not an image"),
])
def test_degenerate_frames_have_a_reason(shape, why):
    assert why in frame_problem(np.zeros(shape, np.uint8), 256)


def test_frames_the_model_can_inspect_pass():
    need = int(np.ceil(256 / MAX_UPSCALE))
    for shape in ((need, need), (need, 4000, 3), (480, 640, 3), (2048, 2048, 4)):
        assert frame_problem(np.zeros(shape, np.uint8), 256) is None


def test_one_pixel_frame_is_an_error_in_the_pipeline(tmp_path):
    images = frames(3)
    images[1] = images[1][:1, :1]
    log = JsonlLog(tmp_path / "log.jsonl")
    result = Pipeline(ListSource(images), FakeEngine(), Postprocessor(CAL), [], log).run()
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines() if '"verdict"' in x]
    assert [r["verdict"] for r in rows][1] == "ERROR" and "1x1" in rows[1]["error"]
    assert result.summary["frames"]["captured"] == 3 and result.summary["frames"]["errored"] == 1


# -- scores far outside the validation range -----------------------------------------------------

NARROW = dataclasses.replace(CAL, score_min=0.20, score_max=0.25, image_threshold=0.24, sigma=1.0)


def test_score_range_rule():
    rng = ScoreRange.from_calibration(NARROW)
    assert rng.flag(0.21) is None and rng.flag(0.2 - 0.049) is None and rng.flag(0.25 + 0.49) is None
    assert rng.flag(0.2 - 0.051) == "below" and rng.flag(0.25 + 0.51) == "above"
    assert rng.flag(float("nan")) is None  # NaN is an ERROR elsewhere


@pytest.mark.parametrize("policy, verdict", [("flag", "OK"), ("error", "ERROR")])
def test_out_of_range_score_is_flagged_and_warned(tmp_path, policy, verdict):
    flat = [np.full((SIZE, SIZE, 3), 128, np.uint8)] * 3  # score ~0: far below [0.20, 0.25]
    stream = io.StringIO()
    alerts = Alerts(stream=stream)
    log = JsonlLog(tmp_path / "log.jsonl")
    alerts.attach(log)
    result = Pipeline(ListSource(flat), FakeEngine(), Postprocessor(NARROW), [], log,
                      PipelineConfig(out_of_range=policy), alerts=alerts).run()
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    rows = [r for r in lines if "verdict" in r]
    assert [r["verdict"] for r in rows] == [verdict] * 3 and all(r["out_of_range"] == "below" for r in rows)
    assert result.summary["out_of_range"] == {"below": 3, "above": 0}
    warnings = [r for r in lines if r.get("event") == "warning"]
    assert len(warnings) == 1 and "far below the validation range" in warnings[0]["message"]
    assert alerts.summary()[0]["count"] == 3 and stream.getvalue().count("WARNING") == 1


# -- warnings that stay --------------------------------------------------------------------------

def test_alerts_buffer_until_the_log_then_count_repeats(tmp_path):
    stream = io.StringIO()
    alerts = Alerts(stream=stream)
    alerts.warn("WARNING: bundle unverified; running anyway", kind="unverified")
    alerts.warn("bundle unverified; running anyway", kind="unverified")
    log = JsonlLog(tmp_path / "log.jsonl")
    alerts.attach(log)
    log.close()
    events = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events] == ["bundle unverified; running anyway"]
    assert alerts.summary()[0]["count"] == 2
    assert stream.getvalue() == "edgead-run: WARNING: bundle unverified; running anyway\n"


# -- signals -------------------------------------------------------------------------------------

class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_signal_while_starting_raises_interrupted():
    guard = SignalGuard()
    with pytest.raises(Interrupted) as exc:
        guard._handle(signal.SIGTERM, None)
    assert exc.value.signum == signal.SIGTERM and guard.got == signal.SIGTERM


def test_second_signal_within_grace_is_not_kill_now(monkeypatch):
    clock, stops, kills = Clock(), [], []
    guard = SignalGuard(grace_s=1.0, clock=clock)
    monkeypatch.setattr(guard, "kill_now", kills.append)
    guard.running(stops.append)
    guard._handle(signal.SIGTERM, None)  # timeout's signal to the child...
    clock.t = 0.001
    guard._handle(signal.SIGTERM, None)  # ... and its copy to the process group
    assert stops == ["signal SIGTERM"] and kills == [] and guard.repeats == 1
    clock.t = 2.5
    guard._handle(signal.SIGINT, None)  # a deliberate second Ctrl-C, later
    assert kills == [signal.SIGINT]


def test_signal_while_finishing_does_not_change_the_outcome():
    guard = SignalGuard()
    guard.running(lambda reason: None)
    guard.finishing()
    guard._handle(signal.SIGINT, None)
    assert guard.got is None


def test_a_signal_before_the_pipeline_runs_stops_it_at_once():
    guard, stops = SignalGuard(), []
    guard.mode = "running_soon"  # neither starting nor running: e.g. between the two
    guard._handle(signal.SIGINT, None)
    guard.running(stops.append)
    assert stops == ["signal SIGINT"]


# -- results folders and outputs -----------------------------------------------------------------

def test_default_results_are_fresh_folders(tmp_path):
    a = plan(None, None, None, False, default_root=str(tmp_path / "res"), now=0)
    b = plan(None, None, None, False, default_root=str(tmp_path / "res"), now=0)  # the same second
    assert a.create() != b.create() and a.folder.name + "-2" == b.folder.name
    assert a.log == a.folder / "log.jsonl"


def test_non_empty_results_ng_and_log_are_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text("{}")
    with pytest.raises(ResultsError, match="not empty.*--overwrite"):
        plan(str(tmp_path / "r"), None, None, False)
    (tmp_path / "ng").mkdir()
    (tmp_path / "ng" / "00000001_frame.png").write_bytes(b"x")
    with pytest.raises(ResultsError, match="--save-ng"):
        plan(str(tmp_path / "new"), None, str(tmp_path / "ng"), False)
    (tmp_path / "x.jsonl").write_text("")
    with pytest.raises(ResultsError, match="--log"):
        plan(None, str(tmp_path / "x.jsonl"), None, False)


def test_overwrite_removes_only_the_earlier_runs_files(tmp_path):
    r, ng = tmp_path / "r", tmp_path / "ng"
    r.mkdir(), ng.mkdir()
    for p in (r / "summary.json", r / "log.jsonl", r / "notes.txt", ng / "00000003_a_frame.png", ng / "keep.png"):
        p.write_text("old")
    plan(str(r), None, str(ng), True).create()
    assert sorted(p.name for p in r.iterdir()) == ["notes.txt"] and [p.name for p in ng.iterdir()] == ["keep.png"]


def test_existing_positional_output_is_refused_as_a_second_input(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    a.write_bytes(b"a"), b.write_bytes(b"b")
    with pytest.raises(ResultsError, match="second input.*quote it"):
        check_outputs(str(b), [], str(a), overwrite=True)  # even with --overwrite
    with pytest.raises(ResultsError, match="the file exists"):
        check_outputs(None, [str(b)], str(a), overwrite=False)
    check_outputs(None, [str(b)], str(a), overwrite=True)  # on purpose
    with pytest.raises(ResultsError, match="is the input itself"):
        check_outputs(None, [f"file://{a}"], str(a), overwrite=True)
    check_outputs(str(tmp_path / "new.mp4"), ["display://0"], str(a), overwrite=False)


def test_ng_names_map_back_to_the_source():
    assert ng_stem(7, {"source": "/x/part 12.png", "source_kind": "image"}) == "00000007_part_12"
    assert ng_stem(7, {"source": "/x/line3.avi", "source_kind": "video", "source_frame": 41}) == \
        "00000007_line3-f000041"
    assert ng_stem(7, {"source": "/dev/video0", "source_kind": "camera", "source_frame": 7}) == "00000007"
    assert ng_stem(7, None) == "00000007"


def test_ng_saver_names_by_source_and_checks_writes(tmp_path):
    insp = Postprocessor(dataclasses.replace(CAL, sigma=1.0))(0.45, np.full((8, 8), 0.45, np.float32), (20, 30))
    assert insp.verdict == "NG"
    saver = NgSaver(str(tmp_path / "ng"), (0.0, 1.0))
    frame = Frame(3, np.zeros((20, 30, 3), np.uint8), 0.0, 0.0)
    saver.write(frame, insp, 1.0, {"source": "/d/p7.png", "source_kind": "image"})
    assert sorted(p.name for p in (tmp_path / "ng").iterdir()) == [
        "00000003_p7_frame.png", "00000003_p7_map.png", "00000003_p7_overlay.png"]
    saver.folder = tmp_path / "gone"  # the folder vanished: cv2.imwrite returns False
    with pytest.raises(SinkError, match="cannot write"):
        saver.write(frame, insp, 1.0, None)


# -- the video sink ------------------------------------------------------------------------------

def _ok():
    return Postprocessor(dataclasses.replace(CAL, sigma=1.0))(0.1, np.zeros((8, 8), np.float32), (48, 64))


def test_video_sink_letterboxes_other_sizes_and_verifies_the_file(tmp_path):
    sink = VideoSink(str(tmp_path / "out.avi"), 10, (0.0, 1.0))
    for i, hw in enumerate([(48, 64), (100, 50), (48, 64), (30, 200)]):
        sink.write(Frame(i, np.full(hw + (3,), 90, np.uint8), 0, 0), _ok(), 10.0)
    sink.finish()
    assert sink.summary() == {"path": str(tmp_path / "out.avi"), "written": 4, "resized": 2, "verified_frames": 4}
    cap = cv2.VideoCapture(str(tmp_path / "out.avi"))
    sizes = []
    while (got := cap.read())[0]:
        sizes.append(got[1].shape)
    assert sizes == [(48, 64, 3)] * 4


def test_video_sink_notices_a_vanished_file(tmp_path):
    sink = VideoSink(str(tmp_path / "out.avi"), 10, (0.0, 1.0))
    sink.write(Frame(0, np.zeros((48, 64, 3), np.uint8), 0, 0), _ok(), 10.0)
    (tmp_path / "out.avi").unlink()
    with pytest.raises(SinkError, match="disappeared"):
        sink.write(Frame(1, np.zeros((48, 64, 3), np.uint8), 0, 0), _ok(), 10.0)
    sink.close()


def test_video_sink_writes_an_unreadable_frame_as_a_placeholder(tmp_path):
    from edgead.runtime.postprocess_stage import error_inspection

    sink = VideoSink(str(tmp_path / "out.avi"), 10, (0.0, 1.0))
    sink.write(Frame(0, None, 0, 0), error_inspection("unreadable"), 10.0)
    sink.write(Frame(1, np.zeros((48, 64, 3), np.uint8), 0, 0), _ok(), 10.0)
    sink.finish()
    assert sink.written == sink.verified == 2 and sink.size == (160, 120)


# -- a truncated video ---------------------------------------------------------------------------

def _video(path, n=20, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    rng = np.random.default_rng(0)
    for _ in range(n):
        writer.write(rng.integers(0, 255, (size[1], size[0], 3), np.uint8))
    writer.release()
    return path


def test_truncated_avi_ends_with_an_error_frame(tmp_path):
    full = _video(tmp_path / "full.avi")
    cut = tmp_path / "cut.avi"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    source = open_source(str(cut))
    source.open()
    good = 0
    while True:
        try:
            source.read()
            good += 1
            assert source.origin() == {"source": str(cut), "source_kind": "video", "source_frame": good - 1}
        except FrameError as err:
            assert "truncated video" in str(err) and err.image is not None
            assert err.origin["source_frame"] == good
            break
    assert 0 < good < 19 and source.truncated["declared_frames"] == 20
    assert source.truncated["decoded_frames"] == good + 1
    with pytest.raises(Exception) as end:
        source.read()
    assert type(end.value).__name__ == "EndOfStream"


def test_complete_video_is_not_truncated(tmp_path):
    source = open_source(str(_video(tmp_path / "full.avi", n=6)))
    assert isinstance(source, CaptureSource)
    source.open()
    for i in range(6):
        source.read()
        assert source.origin()["source_frame"] == i
    assert source.truncated is None


# -- shared CLI helpers and the data sets --------------------------------------------------------

def test_one_line_errors_and_their_codes():
    from edgead.data.datasets import DatasetError

    assert one_line(KeyError("unknown detector 'x'; available: a")) == "unknown detector 'x'; available: a"
    assert one_line(ValueError("bad uri\nlong help\nmore")) == "bad uri (see --help)"
    assert exit_code_for(DatasetError("x")) == (3, False)
    assert exit_code_for(ZeroDivisionError("x")) == (1, True)


def test_orphan_mask_in_the_mvtec_layout_is_an_error(tmp_path):
    from edgead.data.datasets import DatasetError, mvtec_samples

    cat = tmp_path / "widget"
    for d in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (cat / d).mkdir(parents=True)
    img = np.zeros((8, 8, 3), np.uint8)
    for p in ("train/good/000.png", "test/good/000.png", "test/crack/000.png"):
        cv2.imwrite(str(cat / p), img)
    cv2.imwrite(str(cat / "ground_truth/crack/000_mask.png"), img[..., 0])
    assert len(mvtec_samples(tmp_path, "widget", "test")) == 2
    cv2.imwrite(str(cat / "ground_truth/crack/001_mask.png"), img[..., 0])  # its image is missing
    with pytest.raises(DatasetError, match=r"001_mask.png matches no test image.*test/crack/001.png"):
        mvtec_samples(tmp_path, "widget", "test")
