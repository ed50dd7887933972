"""Sinks, post-processing and the summary arithmetic, without a pipeline."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from edgead.core.calibration import Calibration
from edgead.runtime.pipeline import Frame
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.annotate import annotate, has_gui
from edgead.runtime.log import JsonlLog
from edgead.runtime.sinks import DisplaySink, NgSaver, SinkError, VideoSink
from edgead.runtime.stats import RunStats, format_summary, line_rate_check

CAL = Calibration(image_threshold=0.5, score_min=0.0, score_max=1.0, pixel_threshold=0.5, map_min=0.0,
                  map_max=1.0, n_images=10, quantile=0.99, pixel_quantile=0.999)


def ng_result(shape=(60, 80)):
    amap = np.zeros((16, 16), np.float32)
    amap[4:9, 4:9] = 2.0
    return Postprocessor(dataclasses.replace(CAL, sigma=0.0))(0.9, amap, shape)


def test_postprocess_scales_map_and_regions_to_the_frame():
    insp = ng_result((64, 128))
    assert insp.verdict == "NG" and insp.frame_map.shape == (64, 128)
    assert len(insp.regions) == 1
    r = insp.regions[0]
    assert 28 <= r.x <= 36 and 12 <= r.y <= 20 and r.w > 30 and r.area > 100  # 16x16 map -> 128x64 frame
    assert 0.5 < insp.score_norm <= 1.0


def test_postprocess_nan_score_is_error():
    insp = Postprocessor(CAL)(float("nan"), np.zeros((8, 8), np.float32), (8, 8))
    assert insp.verdict == "ERROR" and insp.to_dict()["score"] is None


def test_annotate_any_frame_kind():
    insp = ng_result()
    for image in (np.zeros((60, 80, 3), np.uint8), np.zeros((60, 80), np.uint16), np.zeros((60, 80, 4), np.uint8)):
        view = annotate(image, insp, 12.3, 0.0, 1.0)
        assert view.shape == (60, 80, 3) and view.dtype == np.uint8


def test_ng_saver_writes_frame_map_and_overlay(tmp_path):
    saver = NgSaver(str(tmp_path / "ng"), (0.0, 1.0))
    frame = Frame(7, np.full((60, 80, 3), 128, np.uint8), 0.0, 0.0)
    saver.write(frame, ng_result(), 10.0)
    names = sorted(p.name for p in (tmp_path / "ng").iterdir())
    assert names == ["00000007_frame.png", "00000007_map.png", "00000007_overlay.png"]
    saved_map = cv2.imread(str(tmp_path / "ng" / "00000007_map.png"), cv2.IMREAD_UNCHANGED)
    assert saved_map.dtype == np.uint16 and saved_map.shape == (60, 80) and saved_map.max() == 65535
    ok = Postprocessor(CAL)(0.1, np.zeros((16, 16), np.float32), (60, 80))
    saver.write(Frame(8, frame.image, 0.0, 0.0), ok, 10.0)  # OK frames are not saved
    assert len(list((tmp_path / "ng").iterdir())) == 3


def test_video_sink_rejects_unknown_container(tmp_path):
    with pytest.raises(SinkError, match="unsupported output video"):
        VideoSink(str(tmp_path / "x.gif"), 30, (0, 1))


def test_display_needs_a_gui(monkeypatch):
    import edgead.runtime.sinks as sinks

    monkeypatch.setattr(sinks, "has_gui", lambda info=None: False)
    with pytest.raises(SinkError, match="no GUI.*--headless"):
        DisplaySink("display://0", (0, 1), lambda: None)
    assert has_gui("  GUI:                           GTK3\n")
    assert not has_gui("  GUI:                           NONE\n")


def test_jsonl_log_lines_are_json_with_nan_as_null(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.frame({"frame": 0, "score": float("nan"), "v": np.float32(1.5)})
    log.event("reconnect", attempt=1)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows[0] == {"frame": 0, "score": None, "v": 1.5}
    assert rows[1]["event"] == "reconnect" and rows[1]["attempt"] == 1


def test_summary_and_line_rate():
    stats = RunStats()
    for i in range(10):
        stats.count_captured(float(i))
        stats.record("NG" if i % 5 == 0 else "OK", {"preprocess": 1.0, "infer": 10.0, "postprocess": 1.0,
                                                     "sink": 0.1}, 20.0 + i, defective=i % 5 == 0)
    stats.count_captured(11.0)
    stats.count_dropped()
    s = stats.summary(line_rate=30, saturated=False)
    assert s["balanced"] and s["frames"] == {"captured": 11, "inspected": 10, "dropped": 1, "errored": 0,
                                             "ng": 2, "ok": 8}
    assert s["ground_truth"]["accuracy"] == 1.0 and s["ground_truth"]["recall"] == 1.0
    lr = s["line_rate"]
    # a drop means the pipeline was saturated: capacity is the measured throughput
    assert lr["capacity_basis"].startswith("measured") and lr["period_ms"] == pytest.approx(33.333, abs=1e-3)
    assert "line rate 30 Hz" in format_summary(s)


def test_line_rate_estimate_from_the_slowest_stage():
    stages = {"infer": {"mean": 10.0, "n": 5}, "preprocess": {"mean": 1.0, "n": 5}}
    ok = line_rate_check(50, 20.0, stages, {"p99": 15.0}, saturated=False, dropped=0)
    assert ok["keeps_up"] and ok["capacity_fps"] == 100.0 and ok["throughput_headroom"] == 1.0
    slow = line_rate_check(50, 20.0, stages, {"p99": 25.0}, saturated=False, dropped=0)
    assert not slow["keeps_up"] and slow["latency_headroom"] < 0  # p99 longer than the 20 ms period
