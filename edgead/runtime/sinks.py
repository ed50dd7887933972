"""Stage 5: where results go. A JSONL log, a window, an annotated video, saved NG frames.

Every sink has ``write(frame, inspection, fps)`` and ``close()``. The log also takes event lines
(``{"event": ...}``) from any thread; each line is flushed so a killed station loses nothing.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Protocol

import cv2
import numpy as np

from edgead.core.calibration import NG, OK
from edgead.runtime.postprocess_stage import Inspection
from edgead.runtime.preprocess import to_bgr8

QUIET_EVENTS = {"start", "stop", "summary"}  # logged, not echoed: the terminal gets the summary table
COLORS = {OK: (0, 200, 0), NG: (0, 0, 255), "ERROR": (0, 200, 255)}  # BGR


class SinkError(RuntimeError):
    """A sink cannot be opened (no GUI, unwritable file); the message says which and why."""


class Sink(Protocol):
    def write(self, frame: Any, inspection: Inspection, fps: float) -> None: ...

    def close(self) -> None: ...


# -- the log -------------------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


class JsonlLog:
    """One JSON object per line: frame lines (``"frame": id``) and event lines (``"event": name``).
    Thread-safe and flushed per line."""

    def __init__(self, path: str | os.PathLike | None, echo_events: IO[str] | None = None) -> None:
        self.path = Path(path) if path else None
        self.echo = echo_events
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "w", encoding="utf-8", buffering=1)
            except OSError as err:
                raise SinkError(f"--log {self.path}: cannot write ({err.strerror or err})") from err

    def _line(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, default=_json_default, allow_nan=False)
        with self._lock:
            if self._fh is not None:
                self._fh.write(text + "\n")
                self._fh.flush()

    def event(self, name: str, **fields: Any) -> None:
        record = {"event": name, "t_wall": round(time.time(), 6), **fields}
        self._line(_finite(record))
        if self.echo is not None and name not in QUIET_EVENTS:
            print(json.dumps(_finite(record), default=_json_default), file=self.echo, flush=True)

    def frame(self, record: dict[str, Any]) -> None:
        self._line(_finite(record))

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _finite(value: Any) -> Any:
    """NaN/Inf are not JSON: write them as null."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- drawing -------------------------------------------------------------------------------------

def _heatmap(image_bgr: np.ndarray, frame_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    try:  # the figures' own overlay, so the station and the report look alike
        from edgead.evaluation.figures import heatmap_overlay

        return heatmap_overlay(image_bgr, frame_map, vmin, vmax)
    except ImportError:
        span = max(vmax - vmin, 1e-12)
        scaled = np.clip((frame_map - vmin) / span * 255.0, 0, 255).astype(np.uint8)
        return cv2.addWeighted(image_bgr, 0.6, cv2.applyColorMap(scaled, cv2.COLORMAP_JET), 0.4, 0.0)


def annotate(image: np.ndarray, inspection: Inspection, fps: float, vmin: float, vmax: float) -> np.ndarray:
    """The operator's view: heat-map overlay, region boxes, verdict, score and FPS."""
    view = to_bgr8(image)
    if inspection.frame_map is not None:
        view = _heatmap(view, inspection.frame_map, vmin, vmax)
    else:
        view = view.copy()
    color = COLORS.get(inspection.verdict, (255, 255, 255))
    for r in inspection.regions:
        cv2.rectangle(view, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), color, 1)
    scale = max(0.35, view.shape[0] / 480.0)
    text = inspection.verdict
    if np.isfinite(inspection.score):
        text += f" {inspection.score_norm:.2f}"
    cv2.putText(view, text, (4, int(18 * scale)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, color, max(1, int(scale)))
    cv2.putText(view, f"{fps:.1f} fps", (4, view.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45 * scale,
                (255, 255, 255), 1)
    return view


# -- visual sinks --------------------------------------------------------------------------------

def has_gui(build_info: str | None = None) -> bool:
    info = build_info if build_info is not None else cv2.getBuildInformation()
    for line in info.splitlines():
        if line.strip().startswith("GUI:"):
            return "NONE" not in line.split(":", 1)[1].upper()
    return False


class DisplaySink:
    """``display://0``: a cv2 window. ``q``/Esc or closing the window asks the run to stop."""

    def __init__(self, name: str, vrange: tuple[float, float], on_quit: Callable[[], Any]) -> None:
        if not has_gui():
            raise SinkError(f"{name}: this OpenCV ({cv2.__version__}) has no GUI (the opencv-python-headless "
                            "wheel); install opencv-python or JetPack's system OpenCV, or run with --headless")
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY") and os.name != "nt":
            raise SinkError(f"{name}: no DISPLAY to open a window on; run with --headless")
        self.name, self.vrange, self.on_quit = name, vrange, on_quit
        self.window = "edgead"
        self.shown = False  # a window reads as not visible until the GUI has mapped it
        cv2.namedWindow(self.window, cv2.WINDOW_NORMAL)

    def write(self, frame: Any, inspection: Inspection, fps: float) -> None:
        cv2.imshow(self.window, annotate(frame.image, inspection, fps, *self.vrange))
        key = cv2.waitKey(1) & 0xFF
        visible = cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) >= 1
        if key in (ord("q"), 27) or (self.shown and not visible):  # q/Esc, or the window was closed
            self.on_quit()
        self.shown = self.shown or visible

    def close(self) -> None:
        cv2.destroyAllWindows()


FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class VideoSink:
    """Annotated frames to a video file (``file://out.mp4``, ``out.avi``); opened on the first
    frame, when its size is known."""

    def __init__(self, path: str, rate: float, vrange: tuple[float, float]) -> None:
        self.path, self.rate, self.vrange = Path(path), rate, vrange
        ext = self.path.suffix.lower()
        if ext not in FOURCC:
            raise SinkError(f"{path}: unsupported output video type {ext!r}; use one of {sorted(FOURCC)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer: cv2.VideoWriter | None = None

    def write(self, frame: Any, inspection: Inspection, fps: float) -> None:
        view = annotate(frame.image, inspection, fps, *self.vrange)
        if self.writer is None:
            h, w = view.shape[:2]
            self.writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*FOURCC[self.path.suffix.lower()]),
                                          self.rate, (w, h))
            if not self.writer.isOpened():
                raise SinkError(f"{self.path}: cannot open a video writer for it")
        self.writer.write(view)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None


class NgSaver:
    """``--save-ng DIR``: each NG frame as ``<id>_frame.png`` (as captured, 8-bit), its map as
    ``<id>_map.png`` (16-bit gray, calibration map range -> 0..65535) and ``<id>_overlay.png``."""

    def __init__(self, folder: str, vrange: tuple[float, float]) -> None:
        self.folder, self.vrange = Path(folder), vrange
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SinkError(f"--save-ng {folder}: cannot create ({err.strerror or err})") from err
        self.saved = 0

    def write(self, frame: Any, inspection: Inspection, fps: float) -> None:
        if inspection.verdict != NG:
            return
        stem = self.folder / f"{frame.id:08d}"
        vmin, vmax = self.vrange
        cv2.imwrite(f"{stem}_frame.png", to_bgr8(frame.image))
        if inspection.frame_map is not None:
            scaled = np.clip((inspection.frame_map - vmin) / max(vmax - vmin, 1e-12), 0, 1) * 65535.0
            cv2.imwrite(f"{stem}_map.png", scaled.astype(np.uint16))
        cv2.imwrite(f"{stem}_overlay.png", annotate(frame.image, inspection, fps, vmin, vmax))
        self.saved += 1

    def close(self) -> None:
        pass
