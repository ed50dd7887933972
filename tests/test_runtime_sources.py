"""Every input URI of ``edgead-run``: parsing, opening, reading, end of stream, clear errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from edgead.runtime.sources import (CSI_PIPELINE, CaptureSource, EndOfStream, FrameError, ImageListSource, InputOptions,
                                    SourceError, SourceLost, SyntheticSource, camera_uri, csi_pipeline,
                                    has_gstreamer, open_source)


def read_all(source, limit=1000):
    source.open()
    out = []
    try:
        for _ in range(limit):
            out.append(source.read())
    except EndOfStream:
        pass
    source.close()
    return out


@pytest.fixture
def video(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 32))
    assert writer.isOpened()
    for i in range(6):
        writer.write(np.full((32, 48, 3), 40 * i, np.uint8))
    writer.release()
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"{i:02d}.png"), np.full((20, 30, 3), 50 * i, np.uint8))
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_video_file_plays_once_then_ends(video, prefix):
    source = open_source(f"{prefix}{video}")
    assert isinstance(source, CaptureSource) and not source.live
    frames = read_all(source)
    assert len(frames) == 6 and frames[0][0].shape == (32, 48, 3) and frames[0][1] is None


def test_paced_video_is_live_but_not_reconnectable(video):
    source = open_source(str(video), InputOptions(rate=200))
    assert source.live and not source.reconnectable
    assert len(read_all(source)) == 6


def test_video_file_loops(video):
    frames = read_all(open_source(str(video), InputOptions(loop=2)))
    assert len(frames) == 18


def test_video_resized_by_input_width_height(video):
    frames = read_all(open_source(str(video), InputOptions(width=24, height=16)))
    assert frames[0][0].shape == (16, 24, 3)


def test_folder_sorted_and_skips_non_images(folder):
    source = open_source(str(folder))
    assert isinstance(source, ImageListSource)
    frames = read_all(source)
    assert [int(f[0][0, 0, 0]) for f in frames] == [0, 50, 100]


def test_glob(folder):
    frames = read_all(open_source(str(folder / "0[12].png")))
    assert [int(f[0][0, 0, 0]) for f in frames] == [50, 100]


def test_folder_unreadable_image_is_a_frame_error_naming_it(folder):
    (folder / "01.png").write_bytes(b"garbage")
    source = open_source(str(folder))
    source.open()
    assert int(source.read()[0][0, 0, 0]) == 0 and source.origin()["source"].endswith("00.png")
    with pytest.raises(FrameError, match="01.png: cannot decode") as err:
        source.read()  # not skipped: the capture stage makes it an ERROR frame
    assert err.value.origin == {"source": str(folder / "01.png"), "source_kind": "image"} and err.value.image is None
    assert int(source.read()[0][0, 0, 0]) == 100
    with pytest.raises(EndOfStream):
        source.read()


def test_synthetic_with_ground_truth():
    source = open_source("synthetic://washer?size=48&seed=3&defect_rate=1.0")
    assert isinstance(source, SyntheticSource) and not source.live
    source.open()
    image, truth = source.read()
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert truth.defective and truth.mask.shape == (48, 48) and truth.mask.any()
    again = open_source("synthetic://washer?size=48&seed=3&defect_rate=1.0")
    again.open()
    assert np.array_equal(again.read()[0], image)  # deterministic


def test_synthetic_rate_makes_it_live_and_paced():
    source = open_source("synthetic://fabric?size=32&rate=50")
    assert source.live
    source.open()
    import time

    t0 = time.monotonic()
    for _ in range(6):
        source.read()
    assert time.monotonic() - t0 >= 0.09  # 5 periods of 20 ms at least


def test_synthetic_default_size_from_model():
    source = open_source("synthetic://pcb", InputOptions(default_size=40))
    source.open()
    assert source.read()[0].shape == (40, 40, 3)


@pytest.mark.parametrize("uri, message", [
    ("synthetic://nope", "unknown category"),
    ("synthetic://washer?colour=red", "unknown option"),
    ("synthetic://washer?size=big", "bad value"),
])
def test_synthetic_errors(uri, message):
    with pytest.raises(SourceError, match=message):
        open_source(uri).open()


def test_missing_camera_device_is_a_clear_error():
    source = open_source(camera_uri(97))
    assert source.live and source.uri == "v4l2:///dev/video97"
    with pytest.raises(SourceError, match=r"/dev/video97.*no such camera device"):
        source.open()


def test_missing_video_file(tmp_path):
    with pytest.raises(SourceError, match="no such video file"):
        open_source(str(tmp_path / "nope.mp4")).open()


def test_missing_folder_and_empty_glob(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "nope.png"))
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "*.png")).open()


def test_bare_number_is_ambiguous():
    with pytest.raises(SourceError, match="--camera 0"):
        open_source("0")


def test_unknown_scheme():
    with pytest.raises(SourceError, match="unknown input scheme"):
        open_source("ftp://host/x")


def test_csi_pipeline_string():
    assert csi_pipeline(1, 1280, 720, 60) == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=60/1 ! "
        "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1")
    assert CSI_PIPELINE.count("{") == 4


def test_csi_without_gstreamer_names_the_fix(monkeypatch):
    import edgead.runtime.sources as sources

    monkeypatch.setattr(sources, "has_gstreamer", lambda info=None: False)
    with pytest.raises(SourceError, match=r"csi://0: .*without GStreamer.*JetPack's system OpenCV"):
        open_source("csi://0")


def test_csi_opens_the_pipeline_with_gstreamer():
    seen = {}

    class FakeCap:
        def __init__(self, target, api):
            seen.update(target=target, api=api)

        def isOpened(self):
            return True

        def set(self, *a):
            return True

        def read(self):
            return True, np.zeros((4, 4, 3), np.uint8)

        def release(self):
            pass

    source = open_source("csi://2", InputOptions(width=640, height=480, rate=15), factory=FakeCap)
    source.open()
    assert source.live and seen["api"] == cv2.CAP_GSTREAMER
    assert seen["target"] == csi_pipeline(2, 640, 480, 15)


def test_has_gstreamer_parses_build_info():
    assert has_gstreamer("  Video I/O:\n    GStreamer:                   YES (1.20.3)\n")
    assert not has_gstreamer("    GStreamer:                   NO\n")
    assert isinstance(has_gstreamer(), bool)


def test_v4l2_and_rtsp_uris_route_to_the_right_backend():
    calls = []

    class Cap:
        def __init__(self, target, api):
            calls.append((target, api))

        def isOpened(self):
            return False

    with pytest.raises(SourceError, match="cannot open"):
        open_source("rtsp://cam.local:554/stream", factory=Cap).open()
    assert calls[-1] == ("rtsp://cam.local:554/stream", cv2.CAP_FFMPEG)
    src = open_source("v4l2:///dev/video0", factory=Cap)
    assert src.target == "/dev/video0" and src.api == cv2.CAP_V4L2 and src.live and src.reconnectable


def test_live_capture_that_stops_raises_source_lost():
    class Dead:
        def __init__(self, *a):
            pass

        def isOpened(self):
            return True

        def set(self, *a):
            return True

        def read(self):
            return False, None

        def release(self):
            pass

    source = open_source("rtsp://x/y", factory=Dead)
    source.open()
    with pytest.raises(SourceLost):
        source.read()
