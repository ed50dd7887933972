"""Accounting tested where the counting happens, and overlap tested without a clock.

The summary's balance check alone cannot catch an under-count: ``Pipeline._settle_lost`` books
any shortfall as errored before the summary is made. So the tests here check each count against
the frames the stage saw (the NaN frames are the ERROR records, one latency sample per frame that
reached the sink), and that nothing was settled when nothing crashed. A crashed stage must still
balance, through a ``lost_frames`` event, and exit with the internal-error code.

Overlap: an engine that completes asynchronously (its work runs at ``synchronize``) holds its
first frame until the pipeline has the next one ready, so a pipeline that keeps two frames in
flight is seen doing so, with no timing in the assertion. The latest-frame policy's drops are
made certain the same way: the engine holds its first frame until the source has delivered more
frames than the queues can hold.
"""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest

from edgead.core.contract import ERROR, NG, OK
from edgead.core.engine import EngineError, TensorSpec
from edgead.runtime.cli import EXIT_INTERNAL, EXIT_SOURCE, _exit_code
from edgead.runtime.log import JsonlLog
from edgead.runtime.pipeline import Pipeline, PipelineConfig
from edgead.runtime.postprocess_stage import Postprocessor
from edgead.runtime.stats import RunStats
from test_runtime_pipeline import CAL, SIZE, FakeEngine, ListSource, frames

WAIT_S = 30.0  # a bound for a condition that always comes true; never part of an assertion


def _pipeline(source, engine, tmp_path, post=None, policy="block", **cfg):
    log = JsonlLog(tmp_path / "log.jsonl")
    pipe = Pipeline(source, engine, post or Postprocessor(dataclasses.replace(CAL, sigma=1.0)), [], log,
                    PipelineConfig(policy=policy, **cfg))
    return pipe, log


def _finish(pipe, log, tmp_path):
    result = pipe.run()
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    return result, [x for x in lines if "frame" in x and "event" not in x], [x for x in lines if "event" in x]


def _expected_score(image: np.ndarray) -> float:
    x = image.astype(np.float32).transpose(2, 0, 1)[::-1] / 255.0  # BGR frame -> RGB [0, 1]
    return float(np.abs(x - 0.5).mean(axis=0).max())


# ------------------------------------------------------------------ counting at the source
def test_record_counts_each_verdict_where_it_lands():
    stats = RunStats()
    for verdict in (OK, NG, ERROR, ERROR, OK):
        stats.count_captured(0.0)
        stats.record(verdict, {"infer": 1.0}, 2.0)
    assert (stats.captured, stats.inspected, stats.ng, stats.errored, stats.dropped) == (5, 3, 1, 2, 0)
    assert stats.balanced and stats.end_to_end.summary()["n"] == 5
    stats.count_captured(0.0)
    assert not stats.balanced  # a frame not yet accounted for is not silently balanced


def test_error_frames_are_counted_as_errored_and_nothing_is_settled(tmp_path):
    nan_on = {2, 5, 7}
    pipe, log = _pipeline(ListSource(frames(20)), FakeEngine(nan_on=nan_on), tmp_path)
    result, lines, events = _finish(pipe, log, tmp_path)
    f = result.summary["frames"]
    assert (f["captured"], f["inspected"], f["errored"], f["dropped"]) == (20, 17, 3, 0)
    assert sorted(x["frame"] for x in lines if x["verdict"] == ERROR) == sorted(nan_on)
    assert not [e for e in events if e["event"] == "lost_frames"], "frames were settled, not counted"
    latency = result.summary["latency_ms"]
    assert latency["end_to_end"]["n"] == latency["sink"]["n"] == len(lines) == 20
    assert f["ng"] == sum(x["verdict"] == NG for x in lines)


class _Crash(BaseException):
    """Not an Exception: the stage's own error handling does not catch it, the guard does."""


class _CrashingPost(Postprocessor):
    def __init__(self, calibration, at: int) -> None:
        super().__init__(calibration)
        self.at, self.calls = at, 0

    def __call__(self, score, anomaly_map, frame_hw):
        self.calls += 1
        if self.calls == self.at:
            raise _Crash("post-processing went away")
        return super().__call__(score, anomaly_map, frame_hw)


def test_a_crashed_stage_still_balances_through_a_lost_frames_event(tmp_path):
    post = _CrashingPost(dataclasses.replace(CAL, sigma=1.0), at=4)
    pipe, log = _pipeline(ListSource(frames(30)), FakeEngine(), tmp_path, post=post)
    result, lines, events = _finish(pipe, log, tmp_path)
    s, f = result.summary, result.summary["frames"]
    assert result.fatal and "postprocess stage crashed" in result.fatal
    assert [e["stage"] for e in events if e["event"] == "crash"] == ["postprocess"]
    (lost,) = [e for e in events if e["event"] == "lost_frames"]
    reported = len(lines)  # frames 0-2 may reach the sink before the crash aborts its queue
    assert 1 <= reported <= 3 and f["inspected"] + f["errored"] - lost["count"] == reported
    assert lost["count"] == f["captured"] - f["dropped"] - reported >= 1
    assert "postprocess stage crashed" in lost["reason"]
    assert s["balanced"] and f["captured"] == f["inspected"] + f["dropped"] + f["errored"]
    assert _exit_code(result, None, s) == EXIT_INTERNAL


def test_exit_codes_of_a_crash_and_of_a_lost_source():
    from edgead.runtime.jobs import RunResult

    summary = {"frames": {"captured": 1, "inspected": 1, "dropped": 0, "errored": 0}}
    assert _exit_code(RunResult(summary, "infer stage crashed", "infer stage crashed: boom"), None, summary) \
        == EXIT_INTERNAL
    assert _exit_code(RunResult(summary, "source lost", "camera gone"), None, summary) == EXIT_SOURCE
    assert _exit_code(RunResult(summary, "end of stream", None), None, summary) == 0


# ------------------------------------------------------------------ overlap, deterministically
class AsyncEngine:
    """An engine that completes asynchronously: ``enqueue`` only queues the slot; the work (the
    FakeEngine's map) runs at ``synchronize``, from the slot's host buffer, as a GPU reads pinned
    memory. Its first frame waits in ``enqueue`` until ``ready()`` says the next one is ready."""

    backend, precision, num_slots, synchronous = "async-double", "fp32", 2, False

    def __init__(self) -> None:
        self.inputs = [TensorSpec("image", (1, 3, SIZE, SIZE))]
        self.outputs = [TensorSpec("score", (1,)), TensorSpec("anomaly_map", (1, 1, SIZE, SIZE))]
        self._host = [{"image": s.empty() for s in self.inputs} for _ in range(self.num_slots)]
        self.pending: list[int] = []
        self.max_in_flight = 0
        self.ready = lambda: True
        self.first = True

    def host_inputs(self, slot):
        return self._host[slot]

    def enqueue(self, slot):
        if slot in self.pending:
            raise EngineError(f"slot {slot} enqueued twice without synchronize")
        if self.first:
            self.first = False
            deadline = threading.Event()
            for _ in range(int(WAIT_S / 0.01)):
                if self.ready():
                    break
                deadline.wait(0.01)
        self.pending.append(slot)
        self.max_in_flight = max(self.max_in_flight, len(self.pending))

    def synchronize(self, slot):
        if slot not in self.pending:
            raise EngineError(f"slot {slot} was synchronised without enqueue")
        self.pending.remove(slot)
        x = self._host[slot]["image"]
        amap = np.abs(x - 0.5).mean(axis=1, keepdims=True).astype(np.float32)
        return {"score": amap.max().reshape(1), "anomaly_map": amap}

    def run(self, feeds):  # pragma: no cover - the pipeline uses slots
        raise NotImplementedError

    def close(self):
        pass


def test_an_asynchronous_engine_gets_two_frames_in_flight(tmp_path):
    images = frames(12)
    engine = AsyncEngine()
    pipe, log = _pipeline(ListSource(images), engine, tmp_path)
    assert not pipe.sync_engine and pipe.num_slots == 2
    engine.ready = lambda: not pipe.q_ready.empty()  # frame 1 is preprocessed into the other slot
    result, lines, _ = _finish(pipe, log, tmp_path)
    assert result.summary["frames"]["inspected"] == 12 and result.fatal is None
    assert engine.max_in_flight == 2, "the infer stage never kept two frames in flight"
    assert [x["frame"] for x in lines] == list(range(12))  # in order, despite the overlap
    for x in lines:  # and each result is its own frame's, though slots were reused while busy
        assert x["score"] == pytest.approx(_expected_score(images[x["frame"]]), abs=1e-6)


class _HoldingEngine(FakeEngine):
    """Holds its first frame until ``release()`` is true (the source has run ahead)."""

    def __init__(self, release) -> None:
        super().__init__()
        self.release = release

    def run(self, feeds):
        if self.calls == 0:
            gate = threading.Event()
            for _ in range(int(WAIT_S / 0.01)):
                if self.release():
                    break
                gate.wait(0.01)
        return super().run(feeds)


def test_latest_policy_drops_what_the_engine_cannot_take(tmp_path):
    """Engine busy with frame 0 while a live source delivers 8 frames: at most 3 fit in the
    pipeline (engine, ready queue, capture queue), so at least 5 are overwritten."""
    source = ListSource(frames(20), live=True)
    engine = _HoldingEngine(lambda: source.i >= 8)
    pipe, log = _pipeline(source, engine, tmp_path, policy="latest")
    result, lines, _ = _finish(pipe, log, tmp_path)
    f = result.summary["frames"]
    assert f["captured"] == 20 and f["dropped"] >= 5 and result.summary["balanced"]
    assert len(lines) == f["inspected"] + f["errored"] == 20 - f["dropped"]
    seen = [x["frame"] for x in lines]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_block_policy_drops_nothing_from_a_live_source(tmp_path):
    source = ListSource(frames(20), live=True)
    engine = _HoldingEngine(lambda: source.i >= 3)  # all capture can read before the queues fill
    pipe, log = _pipeline(source, engine, tmp_path, policy="block")
    result, lines, _ = _finish(pipe, log, tmp_path)
    f = result.summary["frames"]
    assert (f["captured"], f["inspected"], f["dropped"]) == (20, 20, 0)
    assert [x["frame"] for x in lines] == list(range(20))


def test_ground_truth_is_recorded_with_the_localisation():
    stats = RunStats()
    stats.record(NG, {}, 1.0, defective=True, localized=True)
    stats.record(NG, {}, 1.0, defective=True, localized=False)
    stats.record(OK, {}, 1.0, defective=False)
    stats.record(ERROR, {}, 1.0, defective=True)  # not inspected: not in the confusion
    t = stats.truth
    assert (t.tp, t.fp, t.tn, t.fn, t.localized) == (2, 0, 1, 0, 1)
    assert stats.first_capture is None
    stats.count_captured(5.0)
    stats.count_captured(7.0)
    assert stats.first_capture == 5.0 and stats.captured == 2
