"""The station loop: five stages in five threads joined by small bounded queues.

    capture ──frames──▶ preprocess ──ready──▶ infer ──outputs──▶ postprocess ──results──▶ sinks
                          ▲ fills a free engine slot ◀── slot released after synchronize ──┘

Stages overlap: while the engine computes frame N in slot A, frame N+1 is captured and
preprocessed into slot B, and frame N-1 is post-processed and written out. numpy, OpenCV and
ONNX Runtime release the GIL, so the threads really run side by side.

Drop policy (the first queue only; the rest always block, bounded by the engine's slots):
- ``latest``: the capture thread reads continuously and the capture queue keeps only the newest
  frame; older ones are overwritten and counted as dropped (the latest-frame reader a live camera
  needs: CAP_PROP_BUFFERSIZE is ignored by FFmpeg/GStreamer, so without it frames lag behind).
- ``block``: capture waits for the pipeline; every frame is inspected (backpressure). A pulled
  source (file, folder, unpaced synthetic) is then read on demand, when an engine slot is free,
  so frames don't age in queues: read-ahead would buy no throughput, only latency.

Accounting: every captured frame ends as inspected (OK/NG), dropped or errored (ERROR), so
``captured == inspected + dropped + errored`` always holds, also after a stop or a crash.
An engine exception, a NaN/Inf in any output or a failing stage gives ERROR and the loop goes on.
So does a frame the source could not read (an unreadable file, the last frame of a truncated video)
and a frame the guards refuse (too small, too upscaled: :mod:`edgead.runtime.guards`). Every JSONL
record names its source (``source``, ``source_kind``, ``source_frame``); a score far outside the
validation range is flagged ``out_of_range`` and reported as a warning.

Fail-safe outputs: a sink with a ``link_up`` attribute (the line sinks) guards the line when
``--fail-safe-output`` is given (or its own ``fail_safe`` says so). While a guarding sink's link is
down, every frame the model passed as OK is turned NG, with the reason in ``error``; NG stays NG
and ERROR stays ERROR, so the accounting is unchanged. At the end of the run each sink's
``finish()`` (if it has one) delivers what it still holds within its own time bound.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import traceback
from typing import Any


from edgead.core.contract import ERROR, NG, OK
from edgead.core.engine import Engine, SlottedEngine
from edgead.runtime.guards import ScoreRange, frame_problem
from edgead.runtime.infer import take_outputs
from edgead.runtime.jobs import CLOSED, POLICIES, Backoff, Frame, Job, PipelineConfig, RunResult, StageQueue
from edgead.runtime.log import JsonlLog
from edgead.runtime.native import status as native_status
from edgead.runtime.postprocess_stage import Postprocessor, error_inspection
from edgead.runtime.preprocess import Preprocessor
from edgead.runtime.sinks import Sink
from edgead.runtime.sources import EndOfStream, FrameError, Source, SourceError
from edgead.runtime.stats import RunStats

__all__ = ["Backoff", "Frame", "Job", "Pipeline", "PipelineConfig", "RunResult", "StageQueue"]


# -- the pipeline --------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, source: Source, engine: Engine, postprocessor: Postprocessor, sinks: list[Sink],
                 log: JsonlLog, config: PipelineConfig | None = None, stats: RunStats | None = None,
                 alerts: Any = None) -> None:
        self.config = config or PipelineConfig()
        if self.config.policy not in POLICIES:
            raise ValueError(f"drop policy must be one of {POLICIES}, got {self.config.policy!r}")
        self.source, self.engine, self.post, self.sinks, self.log = source, engine, postprocessor, sinks, log
        self.stats = stats or RunStats()
        self.pre = Preprocessor.for_input_shape(engine.inputs[0].shape)
        self.input_name = engine.inputs[0].name
        # A synchronous engine computes inside enqueue(): finish each frame at once so its
        # post-processing overlaps the next compute. An asynchronous one keeps its slots busy.
        self.sync_engine = isinstance(engine, SlottedEngine) or getattr(engine, "synchronous", False)
        self.num_slots = max(1, int(getattr(engine, "num_slots", 1)))
        latest = self.config.policy == "latest"
        self.q_frames = StageQueue(1, drop_oldest=latest)
        # A pulled source (file, folder, unpaced synthetic) under "block" is read on demand, when a
        # slot is free: read-ahead would only make frames older. Live sources run free.
        self.on_demand = not source.live and not latest
        self._demand = threading.Semaphore(0)
        self.q_ready = StageQueue(self.num_slots)
        self.q_post = StageQueue(2)
        self.q_sink = StageQueue(2)
        self.free_slots = StageQueue(self.num_slots)
        for slot in range(self.num_slots):
            self.free_slots.put(slot)
        self._stop = threading.Event()
        self.stop_reason = "end of stream"
        self.fatal: str | None = None
        self._fps = 0.0
        self._last_out: float | None = None
        self.linked = [s for s in sinks if hasattr(s, "link_up")]  # network outputs (line sinks)
        self.guards = [s for s in self.linked
                       if (self.config.fail_safe_output if getattr(s, "fail_safe", None) is None else s.fail_safe)]
        self.forced_ng = 0
        self._links_down: list[str] = []
        self.alerts = alerts  # edgead.runtime.alerts.Alerts: warnings that reach terminal, log and summary
        self.score_range = ScoreRange.from_calibration(postprocessor.calibration)
        self.out_of_range = {"below": 0, "above": 0}

    # -- control ---------------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """Stop capturing; frames already captured are drained and reported. Any thread may call."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def run(self) -> RunResult:
        stages = [("capture", self._capture), ("preprocess", self._preprocess), ("infer", self._infer),
                  ("postprocess", self._postprocess), ("sink", self._sink)]
        threads = [threading.Thread(target=self._guard, args=(name, fn), name=f"edgead-{name}", daemon=True)
                   for name, fn in stages]
        self.log.event("start", source=self.source.uri, live=self.source.live, policy=self.config.policy,
                       slots=self.num_slots, max_frames=self.config.max_frames)
        for t in threads:
            t.start()
        capture, sink = threads[0], threads[-1]
        stop_seen: float | None = None
        while sink.is_alive():
            sink.join(0.1)  # short joins keep the main thread free to take signals
            if self._stop.is_set() and capture.is_alive():
                stop_seen = stop_seen or time.monotonic()
                if time.monotonic() - stop_seen > self.config.stop_grace_s:
                    # The capture thread is stuck in the driver: close its queue so the rest drains.
                    self.q_frames.close()
        for t in threads[1:]:
            t.join(1.0)
        self._settle_lost()
        self._finish_sinks()
        saturated = not self.source.live
        summary = self.stats.summary(saturated=saturated)
        summary["native"] = native_status(self.pre, self.post)
        if self.guards:
            summary["fail_safe"] = {"outputs": [getattr(s, "uri", type(s).__name__) for s in self.guards],
                                    "forced_ng": self.forced_ng}
        summary["out_of_range"] = dict(self.out_of_range)
        truncated = getattr(self.source, "truncated", None)
        if truncated:
            summary["truncated"] = truncated
            self._warn(f"input truncated: {truncated['source']} ends at frame {truncated['decoded_frames']} of the "
                       f"{truncated['declared_frames']} its header declares", "truncated")
        return RunResult(summary, self.stop_reason, self.fatal)

    def _finish_sinks(self) -> None:
        """Sinks that have ``finish()`` complete their output now (the video sink closes and checks
        its file), so the summary's sink counters are final."""
        for sink in self.sinks:
            finish = getattr(sink, "finish", None)
            if callable(finish):
                try:
                    finish()
                except Exception as exc:  # noqa: BLE001
                    self._sink_failed(sink, exc)

    def _warn(self, message: str, kind: str, **fields: Any) -> None:
        if self.alerts is not None:
            self.alerts.warn(message, kind=kind, **fields)
        else:
            self.log.event("warning", kind=kind, message=message, **fields)

    def _sink_failed(self, sink: Any, exc: BaseException) -> None:
        name = getattr(sink, "uri", type(sink).__name__)
        self.log.event("sink_error", sink=type(sink).__name__, error=str(exc))
        if self.alerts is not None:
            self.alerts.warn(f"output {name} failed: {exc}", kind="sink_error")

    def _guard(self, name: str, body) -> None:
        """A crashing stage must not hang the others: record it, abort every queue, stop."""
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - reported as the run's fatal error
            self.fatal = self.fatal or f"{name} stage crashed: {exc!r}"
            self.log.event("crash", stage=name, error=repr(exc), traceback=traceback.format_exc(limit=5))
            self.stop(f"{name} stage crashed")
            for q in (self.q_frames, self.q_ready, self.q_post, self.q_sink, self.free_slots):
                q.abort()

    def _settle_lost(self) -> None:
        """Frames lost to a crashed stage still count (as errored), so the books balance."""
        s = self.stats
        lost = s.captured - (s.inspected + s.dropped + s.errored)
        if lost > 0:
            s.errored += lost
            self.log.event("lost_frames", count=lost, reason=self.fatal or self.stop_reason)

    # -- stage 1: capture ------------------------------------------------------------------------
    def _capture(self) -> None:
        next_id = 0
        try:
            while not self._stop.is_set():
                if self.on_demand and not self._wait_for_demand():
                    break
                error = None
                try:
                    image, truth = self.source.read()
                    origin = self.source.origin() if hasattr(self.source, "origin") else {}
                except FrameError as err:  # a frame that exists but cannot be used: ERROR, counted
                    image, truth, origin, error = err.image, None, err.origin, str(err)
                except EndOfStream:
                    self.stop("end of stream")
                    break
                except SourceError as err:
                    if not self.source.reconnectable or not self._reconnect(err):
                        self.fatal = self.fatal or str(err)
                        self.stop("source lost")
                        break
                    continue
                frame = Frame(next_id, image, time.monotonic(), time.time(), truth, origin)
                next_id += 1
                self.stats.count_captured(frame.t_mono)
                if self.q_frames.put(Job(frame, error=error)) is not None:  # overwritten (latest) or refused (closed)
                    self.stats.count_dropped()
                if self.config.max_frames is not None and next_id >= self.config.max_frames:
                    self.stop("frame limit")
                    break
        finally:
            self.q_frames.close()
            self.source.close()

    def _wait_for_demand(self) -> bool:
        while not self._demand.acquire(timeout=0.1):
            if self._stop.is_set() or self.q_frames.closed:
                return False
        return True

    def _reconnect(self, error: SourceError) -> bool:
        """Reopen a lost live source with exponential backoff; events go to the log."""
        lost_at = time.monotonic()
        self.log.event("disconnect", source=self.source.uri, error=str(error))
        self.source.close()
        for attempt, delay in self.config.backoff.delays():
            self.log.event("reconnect", source=self.source.uri, attempt=attempt, delay_s=round(delay, 3))
            if self._stop.wait(delay):
                return False
            try:
                self.source.open()
            except SourceError as err:
                self.log.event("reconnect_failed", source=self.source.uri, attempt=attempt, error=str(err))
                continue
            self.stats.count_reconnect()
            self.log.event("reconnected", source=self.source.uri, attempts=attempt,
                           downtime_s=round(time.monotonic() - lost_at, 3))
            return True
        self.log.event("gave_up", source=self.source.uri, attempts=self.config.backoff.max_attempts)
        error.args = (f"{error}; gave up after {self.config.backoff.max_attempts} reconnect attempts",)
        return False

    # -- stage 2: preprocess into a free engine slot ---------------------------------------------
    def _preprocess(self) -> None:
        try:
            while True:
                # Slot first, frame second: under "latest" the frame taken is the newest one.
                slot = self.free_slots.get()  # waits while every slot is busy: backpressure
                if slot is CLOSED:
                    break
                if self.on_demand:
                    self._demand.release()
                job = self.q_frames.get()
                if job is CLOSED:
                    break
                job.mark("preprocess_start")
                job.error = job.error or frame_problem(job.frame.image, self.pre.size)
                if job.error is not None:  # unreadable or degenerate: ERROR without using the slot
                    self.free_slots.put(slot)
                else:
                    try:
                        self.pre.into(job.frame.image, self.engine.host_inputs(slot)[self.input_name][0])
                        job.slot = slot
                    except Exception as exc:  # noqa: BLE001 - a bad frame is an ERROR, not a crash
                        job.error = f"preprocess: {exc}"
                        self.free_slots.put(slot)
                job.mark("preprocess_end")
                self.q_ready.put(job)
        finally:
            self.q_ready.close()

    # -- stage 3: infer --------------------------------------------------------------------------
    def _infer(self) -> None:
        inflight: collections.deque[Job] = collections.deque()
        try:
            while (job := self.q_ready.get()) is not CLOSED:
                if job.error is None:
                    job.mark("infer_start")
                    try:
                        self.engine.enqueue(job.slot)
                        inflight.append(job)
                    except Exception as exc:  # noqa: BLE001
                        self._release(job, f"engine: {exc}")
                if job.error is not None:  # keep frame order: finish earlier frames first
                    while inflight:
                        self._finish(inflight.popleft())
                    self.q_post.put(job)
                    continue
                if self.sync_engine or len(inflight) >= self.num_slots or self.q_ready.empty():
                    self._finish(inflight.popleft())
            while inflight:
                self._finish(inflight.popleft())
        finally:
            self.q_post.close()

    def _finish(self, job: Job) -> None:
        try:
            job.score, job.anomaly_map = take_outputs(self.engine.synchronize(job.slot), self.post.map_output)
            self._release(job, None)
        except Exception as exc:  # noqa: BLE001 - engine failure or NaN/Inf: ERROR verdict
            self._release(job, f"engine: {exc}")
        self.q_post.put(job)

    def _release(self, job: Job, error: str | None) -> None:
        job.mark("infer_end")
        job.error = error
        if job.slot is not None:
            self.free_slots.put(job.slot)
            job.slot = None

    # -- stage 4: postprocess --------------------------------------------------------------------
    def _postprocess(self) -> None:
        try:
            while (job := self.q_post.get()) is not CLOSED:
                job.mark("postprocess_start")
                if job.error is None:
                    try:
                        job.inspection = self.post(job.score, job.anomaly_map, job.frame.image.shape[:2])
                    except Exception as exc:  # noqa: BLE001
                        job.error = f"postprocess: {exc}"
                if job.inspection is None:
                    job.inspection = error_inspection(job.error or "no result")
                job.anomaly_map = None
                job.mark("postprocess_end")
                self.q_sink.put(job)
        finally:
            self.q_sink.close()

    # -- stage 5: sinks + log + accounting -------------------------------------------------------
    def _sink(self) -> None:
        broken: set[int] = set()
        while (job := self.q_sink.get()) is not CLOSED:
            job.mark("sink_start")
            if self.linked:
                job.inspection = self._watch_links(job.frame.id, job.inspection)
            flag = self._check_range(job)
            record = self._record(job)
            if flag:
                record["out_of_range"] = flag
            for i, sink in enumerate(self.sinks):
                if i in broken:
                    continue
                try:
                    sink.write(job.frame, job.inspection, self._fps, record)
                except Exception as exc:  # noqa: BLE001 - a broken window must not stop inspection
                    broken.add(i)
                    self._sink_failed(sink, exc)
            job.mark("sink_end")
            self._account(job, record)

    def _watch_links(self, frame_id: int, insp: Any) -> Any:
        """Log each change of the network outputs' links; while a guarding output's link is down,
        OK becomes NG (never the other way)."""
        down = [s for s in self.linked if not s.link_up]
        names = [getattr(s, "uri", type(s).__name__) for s in down]
        if names != self._links_down:
            self.log.event("output_links", frame=frame_id, down=names)
            self._links_down = names
        guards_down = [name for s, name in zip(down, names) if s in self.guards]
        if not guards_down or insp.verdict != OK:
            return insp
        self.forced_ng += 1
        return dataclasses.replace(insp, verdict=NG, error=f"fail-safe: output link down "
                                                           f"({', '.join(guards_down)}); the model said OK")

    def _check_range(self, job: Job) -> str | None:
        """Flag a score far outside the validation range (``--out-of-range error``: make it ERROR)."""
        insp = job.inspection
        flag = self.score_range.flag(insp.score) if insp.verdict != ERROR else None
        if flag is None:
            return None
        self.out_of_range[flag] += 1
        self._warn(self.score_range.describe(flag), "out_of_range", key=f"out_of_range:{flag}",
                   first_frame=job.frame.id, first_score=insp.score)
        if self.config.out_of_range == "error":
            job.inspection = error_inspection(f"score {insp.score:.6g} is far {flag} the validation range "
                                              f"[{self.score_range.score_min:.6g}, {self.score_range.score_max:.6g}]")
        return flag

    def _record(self, job: Job) -> dict[str, Any]:
        """The frame's JSONL record, as the sinks see it (the sink stage's own time is added after)."""
        frame, insp = job.frame, job.inspection
        record: dict[str, Any] = {"frame": frame.id, **frame.origin, "t_capture": round(frame.t_wall, 6),
                                  **insp.to_dict(),
                                  "latency_ms": job.latency_ms(),
                                  "age_ms": round(1000.0 * (job.marks["postprocess_end"] - frame.t_mono), 3)}
        if frame.truth is not None:
            record["truth"] = frame.truth.defect or "good"
        return record

    def _account(self, job: Job, record: dict[str, Any]) -> None:
        frame, insp = job.frame, job.inspection
        now = time.monotonic()
        if self._last_out is not None:
            dt = max(now - self._last_out, 1e-6)
            self._fps = 1.0 / dt if self._fps == 0.0 else 0.9 * self._fps + 0.1 / dt
        self._last_out = now
        latency = job.latency_ms()
        e2e = 1000.0 * (now - frame.t_mono)
        truth = frame.truth
        localized = bool(truth and insp.verdict == NG and self.post.localized(insp, truth.mask))
        self.stats.record(insp.verdict, latency, e2e, truth.defective if truth else None, localized)
        self.log.frame({**record, "latency_ms": latency, "e2e_ms": round(e2e, 3)})
        if insp.verdict == ERROR:
            self.log.event("frame_error", frame=frame.id, source=frame.origin.get("source"), error=insp.error)

    def sink_summaries(self) -> dict[str, Any]:
        """Each sink's own counters (network sinks: sent, queued, unsent, reconnects...)."""
        out: dict[str, Any] = {}
        for sink in self.sinks:
            summary = getattr(sink, "summary", None)
            if callable(summary):
                out[getattr(sink, "uri", type(sink).__name__)] = summary()
        return out
