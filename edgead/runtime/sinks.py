"""Stage 5: where results go, chosen by URI as sources are (:func:`open_sink` mirrors
:func:`edgead.runtime.sources.open_source`).

    display://0            a window (needs an OpenCV with GUI and a display)
    file://out.mp4, out.avi an annotated video
    http://HOST:PORT        the station view in a browser       (extra ``view``)
    mqtt://HOST:PORT/TOPIC  one message per frame or per NG     (extra ``line``)
    opc.tcp://HOST:PORT     an OPC UA server the PLC reads       (extra ``line``)
    modbus://HOST:PORT      a coil/register pulse per NG         (extra ``line``)

Every sink has ``write(frame, inspection, fps, record)``, where ``record`` is the frame's JSONL
record, and ``close()``; a sink may also have ``finish()`` (called when the run ends, before the
summary: complete and check the output) and ``summary() -> dict`` (its own counters, reported per
sink in ``summary.json``). ``frame.image`` is None for a frame that could not be read (its verdict
is ERROR); :func:`edgead.runtime.annotate.annotate` draws a placeholder for it. Sinks run in the sink stage's thread: a network sink queues and sends
from its own thread, so a slow link never slows inspection.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import cv2
import numpy as np

from edgead.core.contract import NG
from edgead.runtime.annotate import PLACEHOLDER_HW, annotate, has_gui
from edgead.runtime.postprocess_stage import Inspection
from edgead.runtime.preprocess import to_bgr8
from edgead.runtime.results import ng_stem


class SinkError(RuntimeError):
    """A sink cannot be opened (no GUI, unwritable file, unknown scheme); the message says which
    and why."""


class Sink(Protocol):
    def write(self, frame: Any, inspection: Inspection, fps: float, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass
class SinkContext:
    """What a sink may need besides its URI."""

    vrange: tuple[float, float] = (0.0, 1.0)  # calibration map range: heat-map colours
    rate: float = 30.0  # frames per second of an output video
    on_quit: Callable[[], Any] = lambda: None  # a window's q/Esc stops the run
    say: Callable[[str], Any] = lambda message: None  # start-up notes for the terminal
    run: dict[str, Any] = field(default_factory=dict)  # bundle, detector, engine, certificate status
    results: Path | None = None  # the run's results folder
    stats: Callable[[], dict[str, Any]] | None = None  # the run's live RunStats.summary() (the station view)
    view_token: str | None = None  # --view-token: the station view's access token


# scheme -> "module:factory"; each factory is (uri, SinkContext) -> Sink. Imported on use, so a
# station without an extra's packages still runs every other sink.
SCHEMES: dict[str, str] = {
    "display": "edgead.runtime.sinks:DisplaySink.from_uri",
    "file": "edgead.runtime.sinks:VideoSink.from_uri",
    "http": "edgead.runtime.view:open_view_sink",
    "mqtt": "edgead.runtime.line.mqtt:open_mqtt_sink",
    "opc.tcp": "edgead.runtime.line.opcua:open_opcua_sink",
    "modbus": "edgead.runtime.line.modbus:open_modbus_sink",
}


def sink_scheme(uri: str) -> str:
    """The scheme of an output URI; a bare path is a ``file``."""
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep else "file"


def open_sink(uri: str, context: SinkContext) -> Sink:
    """The sink for output ``uri`` (see the module docstring)."""
    scheme = sink_scheme(uri)
    if scheme not in SCHEMES:
        raise SinkError(f"{uri}: unknown output scheme {scheme!r}; use one of "
                        f"{', '.join(s + '://' for s in SCHEMES)} or a video file path")
    module, _, attr = SCHEMES[scheme].partition(":")
    try:
        factory: Any = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise SinkError(f"{uri}: the {scheme}:// output needs {err.name!r}, which is not installed "
                        "(see the extras in the README: pip install 'edgead[view]' or 'edgead[line]')") from err
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(uri, context)


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

    @classmethod
    def from_uri(cls, uri: str, context: SinkContext) -> "DisplaySink":
        return cls(uri, context.vrange, context.on_quit)

    def write(self, frame: Any, inspection: Inspection, fps: float, record: dict[str, Any] | None = None) -> None:
        cv2.imshow(self.window, annotate(frame.image, inspection, fps, *self.vrange))
        key = cv2.waitKey(1) & 0xFF
        visible = cv2.getWindowProperty(self.window, cv2.WND_PROP_VISIBLE) >= 1
        if key in (ord("q"), 27) or (self.shown and not visible):  # q/Esc, or the window was closed
            self.on_quit()
        self.shown = self.shown or visible

    def close(self) -> None:
        cv2.destroyAllWindows()


MIN_VIDEO_SIDE = 16  # px
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}


class VideoSink:
    """Annotated frames to a video file (``file://out.mp4``, ``out.avi``), opened on the first
    frame, whose size becomes the video's.

    What it checks, since ``cv2.VideoWriter.write`` returns nothing: a frame of another size is
    letterboxed into the video's size (aspect kept, black borders; counted as ``resized``), so no
    frame is dropped by OpenCV; after every write the writer must still be open and the file must
    still exist, else :class:`SinkError` (the sink stops, the run goes on and reports it). At the
    end (``finish``) the file is released and reopened, and the frame count its container declares
    must equal the frames written, else :class:`SinkError`.
    """

    def __init__(self, path: str, rate: float, vrange: tuple[float, float]) -> None:
        self.path, self.rate, self.vrange = Path(path), rate, vrange
        self.uri = str(path)
        ext = self.path.suffix.lower()
        if ext not in FOURCC:
            raise SinkError(f"{path}: unsupported output video type {ext!r}; use one of {sorted(FOURCC)}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None  # (width, height) of the video
        self.written = self.resized = 0
        self.verified: int | None = None  # frames the finished file declares

    @classmethod
    def from_uri(cls, uri: str, context: SinkContext) -> "VideoSink":
        return cls(uri[len("file://"):] if uri.startswith("file://") else uri, context.rate, context.vrange)

    def write(self, frame: Any, inspection: Inspection, fps: float, record: dict[str, Any] | None = None) -> None:
        view = annotate(frame.image, inspection, fps, *self.vrange)
        if self.writer is None:  # a degenerate first frame (an ERROR) does not set a 1x1 video
            small = min(view.shape[:2]) < MIN_VIDEO_SIDE
            self._open(*(PLACEHOLDER_HW[::-1] if small else view.shape[1::-1]))
        assert self.writer is not None and self.size is not None
        if view.shape[1::-1] != self.size:
            view = letterbox(view, self.size)
            self.resized += 1
        self.writer.write(view)
        self.written += 1
        if not self.writer.isOpened():
            raise SinkError(f"{self.path}: the video writer closed after {self.written} frames")
        if not self.path.exists():
            raise SinkError(f"{self.path}: the output file disappeared after {self.written} frames")

    def _open(self, width: int, height: int) -> None:
        fourcc = cv2.VideoWriter_fourcc(*FOURCC[self.path.suffix.lower()])
        self.writer = cv2.VideoWriter(str(self.path), fourcc, self.rate, (width, height))
        self.size = (width, height)
        if not self.writer.isOpened():
            raise SinkError(f"{self.path}: cannot open a video writer for it (is the folder writable?)")

    def finish(self) -> None:
        """Release the file and check that it holds every frame written."""
        if self.writer is None:
            return
        self.writer.release()
        self.writer = None
        cap = cv2.VideoCapture(str(self.path))
        try:
            declared = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if cap.isOpened() else -1
        finally:
            cap.release()
        self.verified = declared
        if declared != self.written:
            raise SinkError(f"{self.path}: the finished video holds {max(declared, 0)} frames, "
                            f"{self.written} were written (disk full or file replaced?)")

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "written": self.written, "resized": self.resized,
                "verified_frames": self.verified}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None


def letterbox(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` scaled to fit ``size`` (width, height) with its aspect ratio, on black."""
    width, height = size
    scale = min(width / image.shape[1], height / image.shape[0])
    w, h = max(1, int(round(image.shape[1] * scale))), max(1, int(round(image.shape[0] * scale)))
    out = np.zeros((height, width, 3), np.uint8)
    x, y = (width - w) // 2, (height - h) // 2
    out[y:y + h, x:x + w] = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    return out


class NgSaver:
    """``--save-ng DIR``: each NG frame as ``<stem>_frame.png`` (as captured, 8-bit), its map as
    ``<stem>_map.png`` (16-bit gray, calibration map range -> 0..65535) and ``<stem>_overlay.png``;
    the stem is the frame id and its source (:func:`edgead.runtime.results.ng_stem`). A file that
    cannot be written is a :class:`SinkError`."""

    def __init__(self, folder: str, vrange: tuple[float, float]) -> None:
        self.folder, self.vrange = Path(folder), vrange
        self.uri = f"--save-ng {folder}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SinkError(f"--save-ng {folder}: cannot create ({err.strerror or err})") from err
        self.saved = 0

    def write(self, frame: Any, inspection: Inspection, fps: float, record: dict[str, Any] | None = None) -> None:
        if inspection.verdict != NG or frame.image is None:
            return
        stem = self.folder / ng_stem(frame.id, record)
        vmin, vmax = self.vrange
        self._save(f"{stem}_frame.png", to_bgr8(frame.image))
        if inspection.frame_map is not None:
            scaled = np.clip((inspection.frame_map - vmin) / max(vmax - vmin, 1e-12), 0, 1) * 65535.0
            self._save(f"{stem}_map.png", scaled.astype(np.uint16))
        self._save(f"{stem}_overlay.png", annotate(frame.image, inspection, fps, vmin, vmax))
        self.saved += 1

    @staticmethod
    def _save(path: str, image: np.ndarray) -> None:
        if not cv2.imwrite(path, image):
            raise SinkError(f"{path}: cannot write the NG image (disk full or folder gone?)")

    def summary(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "saved": self.saved}

    def close(self) -> None:
        pass
