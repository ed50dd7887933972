"""The station loop with engine and source doubles: accounting, ERROR verdicts, reconnects,
frame conversion, the bounded queues. No bundle, no torch, fast."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest

from edgead.core.calibration import Calibration
from edgead.core.engine import SlottedEngine, TensorSpec
from edgead.runtime.pipeline import CLOSED, Backoff, Pipeline, PipelineConfig, StageQueue
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.preprocess import Preprocessor, to_bgr8
from edgead.runtime.log import JsonlLog
from edgead.runtime.sources import EndOfStream, Source, SourceError, SourceLost, Truth

SIZE = 32


class FakeEngine(SlottedEngine):
    """map = |x - 0.5| averaged over channels; score = its max. Optional delay, NaN and raise."""

    backend = "fake"

    def __init__(self, delay: float = 0.0, nan_on: set[int] = frozenset(), raise_on: set[int] = frozenset(),
                 nan_output: str = "anomaly_map") -> None:
        super().__init__([TensorSpec("image", (1, 3, SIZE, SIZE))],
                         [TensorSpec("score", (1,)), TensorSpec("anomaly_map", (1, 1, SIZE, SIZE))])
        self.delay, self.nan_on, self.raise_on, self.nan_output = delay, nan_on, raise_on, nan_output
        self.calls = 0
        self.seen: list[np.ndarray] = []

    def run(self, feeds):
        call = self.calls
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if call in self.raise_on:
            raise RuntimeError("CUDA went away")
        x = feeds["image"]
        self.seen.append(x.copy())
        amap = np.abs(x - 0.5).mean(axis=1, keepdims=True).astype(np.float32)
        out = {"score": amap.max().reshape(1).astype(np.float32), "anomaly_map": amap}
        if call in self.nan_on:
            out[self.nan_output] = out[self.nan_output].copy()
            out[self.nan_output].reshape(-1)[0] = np.nan
        return out


class ListSource(Source):
    """Pulled (or, with ``rate``, live) frames from a list; the last frame repeats ``repeat`` times."""

    def __init__(self, frames, live: bool = False, rate: float = 0.0, truth=None) -> None:
        self.uri, self.frames, self.live, self.rate, self.truth = "list://", list(frames), live, rate, truth
        self.i = 0

    def read(self):
        if self.i >= len(self.frames):
            raise EndOfStream
        if self.rate:
            time.sleep(1.0 / self.rate)
        image = self.frames[self.i]
        truth = self.truth[self.i] if self.truth else None
        self.i += 1
        return image, truth


CAL = Calibration(image_threshold=0.3, score_min=0.0, score_max=0.5, pixel_threshold=0.3, map_min=0.0,
                  map_max=0.5, n_images=10, quantile=0.99, pixel_quantile=0.999)


def frames(n: int, size: int = SIZE) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(100, 156, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def run(source, engine, tmp_path, policy="block", **cfg):
    log = JsonlLog(tmp_path / "log.jsonl")
    pipe = Pipeline(source, engine, Postprocessor(dataclasses.replace(CAL, sigma=1.0)), [], log, PipelineConfig(policy=policy, **cfg))
    result = pipe.run()
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    return result, [x for x in lines if "frame" in x and "event" not in x], [x for x in lines if "event" in x]


def assert_balanced(summary):
    f = summary["frames"]
    assert f["captured"] == f["inspected"] + f["dropped"] + f["errored"], f
    assert summary["balanced"]


def test_block_policy_inspects_every_frame_in_order(tmp_path):
    result, lines, _ = run(ListSource(frames(30)), FakeEngine(), tmp_path)
    f = result.summary["frames"]
    assert (f["captured"], f["inspected"], f["dropped"], f["errored"]) == (30, 30, 0, 0)
    assert [x["frame"] for x in lines] == list(range(30))
    assert result.stop_reason == "end of stream" and result.fatal is None
    for x in lines:
        assert x["verdict"] in ("OK", "NG") and set(x["latency_ms"]) == {"preprocess", "infer", "postprocess", "sink"}
        assert x["age_ms"] <= x["e2e_ms"]


@pytest.mark.parametrize("policy", ["latest", "block"])
def test_accounting_under_overload(tmp_path, policy):
    # A live source at ~400 fps into a ~100 fps engine.
    source = ListSource(frames(80), live=True, rate=400)
    result, lines, _ = run(source, FakeEngine(delay=0.01), tmp_path, policy=policy)
    s = result.summary
    assert_balanced(s)
    assert s["frames"]["captured"] == 80
    assert len(lines) == s["frames"]["inspected"] + s["frames"]["errored"]
    if policy == "block":
        assert s["frames"]["dropped"] == 0 and s["frames"]["inspected"] == 80
    # That "latest" drops is shown without timing in test_accounting_source.py.


def test_frame_limit_stops_capture(tmp_path):
    result, lines, _ = run(ListSource(frames(50)), FakeEngine(), tmp_path, max_frames=7)
    assert result.summary["frames"]["captured"] == 7 and len(lines) == 7
    assert result.stop_reason == "frame limit"


@pytest.mark.parametrize("output", ["anomaly_map", "score"])
def test_nan_in_any_output_is_error_and_loop_goes_on(tmp_path, output):
    result, lines, events = run(ListSource(frames(10)), FakeEngine(nan_on={3, 6}, nan_output=output), tmp_path)
    s = result.summary
    assert_balanced(s)
    assert s["frames"]["errored"] == 2 and s["frames"]["inspected"] == 8
    by_id = {x["frame"]: x for x in lines}
    assert by_id[3]["verdict"] == "ERROR" and by_id[6]["verdict"] == "ERROR"
    assert "NaN" in by_id[3]["error"] and by_id[3]["score"] is None
    assert all(by_id[i]["verdict"] != "ERROR" for i in set(range(10)) - {3, 6})
    assert [e["frame"] for e in events if e["event"] == "frame_error"] == [3, 6]


def test_engine_exception_is_error_and_loop_goes_on(tmp_path):
    result, lines, _ = run(ListSource(frames(10)), FakeEngine(raise_on={0, 5}), tmp_path)
    assert_balanced(result.summary)
    verdicts = [x["verdict"] for x in lines]
    assert verdicts[0] == "ERROR" and verdicts[5] == "ERROR" and verdicts.count("ERROR") == 2
    assert "CUDA went away" in lines[5]["error"]
    assert result.fatal is None


def test_unconvertible_frame_is_error_not_crash(tmp_path):
    bad = np.zeros((SIZE, SIZE, 7), np.uint8)  # 7 channels: no conversion exists
    result, lines, _ = run(ListSource([*frames(2), bad, *frames(2)]), FakeEngine(), tmp_path)
    assert [x["verdict"] == "ERROR" for x in lines] == [False, False, True, False, False]
    assert lines[2]["error"].startswith("preprocess")
    assert_balanced(result.summary)


def test_wrong_size_gray_bgra_16bit_frames_are_converted(tmp_path):
    base = np.full((48, 64, 3), (10, 120, 250), np.uint8)  # BGR, not the model's size
    variants = [
        base,
        np.ascontiguousarray(base[..., 0]),  # gray
        np.dstack([base, np.full(base.shape[:2], 255, np.uint8)]),  # BGRA, opaque
        base.astype(np.uint16) * 257,  # 16-bit
        base[..., :1],  # HxWx1
    ]
    engine = FakeEngine()
    result, lines, _ = run(ListSource(variants), engine, tmp_path)
    assert [x["verdict"] for x in lines].count("ERROR") == 0
    rgb = engine.seen[0][0]
    assert rgb.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(rgb[:, 5, 5], [250 / 255, 120 / 255, 10 / 255], atol=1e-6)  # BGR -> RGB
    np.testing.assert_allclose(engine.seen[2], engine.seen[0], atol=1e-6)  # opaque alpha dropped
    np.testing.assert_allclose(engine.seen[3], engine.seen[0], atol=1e-6)  # 16-bit scaled
    assert np.allclose(engine.seen[1][0, 0], engine.seen[1][0, 1])  # gray replicated
    # Maps come back at the frame's resolution for overlays.
    assert all(to_bgr8(v).shape == (48, 64, 3) for v in variants)


def test_preprocess_writes_into_the_slot_buffer():
    engine = FakeEngine()
    buffer = engine.host_inputs(1)["image"][0]
    out = Preprocessor.for_input_shape(engine.inputs[0].shape).into(frames(1, 100)[0], buffer)
    assert out is buffer and buffer.any()


class FlakySource(Source):
    """Live source that loses the camera after ``lose_after`` frames, then refuses to reopen
    ``fail_opens`` times before it works again."""

    live = reconnectable = True

    def __init__(self, total: int, lose_after: int, fail_opens: int) -> None:
        self.uri = "v4l2:///dev/video9"
        self.total, self.lose_after, self.fail_opens = total, lose_after, fail_opens
        self.sent = 0
        self.lost = False
        self.opens = 0

    def open(self):
        self.opens += 1
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise SourceError(f"{self.uri}: no such camera device")
        self.lost = False

    def read(self):
        if self.lost:
            raise SourceLost(f"{self.uri}: not open")
        if self.sent == self.lose_after:
            self.lost = True
            self.lose_after = -1
            raise SourceLost(f"{self.uri}: no frame (camera unplugged)")
        if self.sent >= self.total:
            raise EndOfStream
        self.sent += 1
        time.sleep(0.002)
        return frames(1)[0], None


def test_reconnect_with_backoff_after_camera_loss(tmp_path):
    source = FlakySource(total=12, lose_after=5, fail_opens=3)
    result, lines, events = run(source, FakeEngine(), tmp_path, policy="block",
                                backoff=Backoff(initial=0.01, cap=0.04))
    assert_balanced(result.summary)
    assert result.summary["frames"]["inspected"] == 12 and result.summary["reconnects"] == 1
    names = [e["event"] for e in events]
    assert names.count("disconnect") == 1 and names.count("reconnect_failed") == 3
    assert names.count("reconnected") == 1
    delays = [e["delay_s"] for e in events if e["event"] == "reconnect"]
    assert delays == [0.01, 0.02, 0.04, 0.04]  # doubling, capped
    assert result.fatal is None


def test_gives_up_after_max_attempts(tmp_path):
    source = FlakySource(total=12, lose_after=2, fail_opens=100)
    result, lines, events = run(source, FakeEngine(), tmp_path, backoff=Backoff(initial=0.001, cap=0.002,
                                                                               max_attempts=3))
    assert result.stop_reason == "source lost" and "gave up after 3" in result.fatal
    assert len(lines) == 2 and [e["event"] for e in events].count("gave_up") == 1
    assert_balanced(result.summary)


def test_stop_drains_and_balances(tmp_path):
    endless = ListSource(frames(1) * 100000, live=True, rate=500)
    log = JsonlLog(tmp_path / "log.jsonl")
    pipe = Pipeline(endless, FakeEngine(delay=0.005), Postprocessor(CAL), [], log, PipelineConfig(policy="latest"))
    threading.Timer(0.3, pipe.stop, args=("test",)).start()
    result = pipe.run()
    log.close()
    assert result.stop_reason == "test"
    assert_balanced(result.summary)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    frame_lines = [x for x in lines if "frame" in x and "event" not in x]
    assert len(frame_lines) == result.summary["frames"]["inspected"] + result.summary["frames"]["errored"] > 0


def test_crashing_sink_does_not_stop_inspection(tmp_path):
    class Broken:
        def write(self, frame, inspection, fps):
            raise OSError("disk full")

        def close(self):
            pass

    log = JsonlLog(tmp_path / "log.jsonl")
    pipe = Pipeline(ListSource(frames(5)), FakeEngine(), Postprocessor(CAL), [Broken()], log, PipelineConfig())
    result = pipe.run()
    log.close()
    assert result.summary["frames"]["inspected"] == 5
    assert "sink_error" in (tmp_path / "log.jsonl").read_text()


def test_ground_truth_summary(tmp_path):
    imgs = frames(6)
    defect = imgs[3].copy()
    defect[8:16, 8:16] = 255  # far from 0.5: high score
    imgs[3] = defect
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:16, 8:16] = 255
    truth = [Truth(None, np.zeros((SIZE, SIZE), np.uint8))] * 6
    truth[3] = Truth("stain", mask)
    result, lines, _ = run(ListSource(imgs, truth=truth), FakeEngine(), tmp_path)
    gt = result.summary["ground_truth"]
    assert gt["tp"] == 1 and gt["fn"] == 0 and gt["tn"] == 5 and gt["accuracy"] == 1.0
    assert gt["localized"] == 1.0
    assert lines[3]["truth"] == "stain" and lines[3]["regions"]


def test_stage_queue_drop_oldest_and_close():
    q = StageQueue(1, drop_oldest=True)
    assert q.put(1) is None and q.put(2) == 1  # 1 evicted
    assert q.close() == [2]
    assert q.put(3) == 3  # refused after close
    assert q.get() == 2 and q.get() is CLOSED


def test_stage_queue_blocks_when_full():
    q = StageQueue(1)
    q.put("a")
    done = threading.Event()
    threading.Thread(target=lambda: (q.put("b"), done.set()), daemon=True).start()
    assert not done.wait(0.1)
    assert q.get() == "a" and done.wait(1.0) and q.get() == "b"


def test_async_engine_keeps_two_slots_in_flight(tmp_path):
    class AsyncEngine(FakeEngine):
        """Looks asynchronous: records how many slots were enqueued but not yet synchronised."""

        def __init__(self):
            super().__init__()
            self.pending: set[int] = set()
            self.max_pending = 0

        def enqueue(self, slot):
            self.pending.add(slot)
            self.max_pending = max(self.max_pending, len(self.pending))
            super().enqueue(slot)

        def synchronize(self, slot):
            self.pending.discard(slot)
            return super().synchronize(slot)

    engine = AsyncEngine()
    log = JsonlLog(None)
    pipe = Pipeline(ListSource(frames(40)), engine, Postprocessor(CAL), [], log)
    pipe.sync_engine = False
    result = pipe.run()
    assert result.summary["frames"]["inspected"] == 40
    assert engine.max_pending <= engine.num_slots


# Overlap is tested without a clock in test_accounting_source.py (two frames in flight, in order);
# its speed-up is measured by benchmarks/pipeline.py.
