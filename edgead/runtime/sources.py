"""Frame sources, addressed by jetson-inference style URIs (see :data:`URI_HELP`).

A source opens, yields raw frames (any size, 1-4 channels, 8- or 16-bit: preprocessing converts
them) and says whether it is *live* (frames arrive on their own clock, so a slow consumer must
drop) or *pulled* (a file: read on demand, nothing is lost by waiting). Timestamps and frame ids
are given by the capture stage, not here.

Errors: :class:`SourceError` names the source (missing device/file, no GStreamer...). A camera
or stream raises :class:`SourceLost` when it stops delivering (the capture stage reconnects);
a file, folder or synthetic source raises :class:`EndOfStream` when done. A frame that exists but
cannot be used (an unreadable image file, the last frame of a truncated video) raises
:class:`FrameError`: the capture stage makes it a captured frame with an ERROR verdict.

Traceability: after each ``read`` (or :class:`FrameError`), ``origin()`` says where that frame came
from: ``{"source": file path | device | URI, "source_kind": "image" | "video" | "camera" |
"stream" | "synthetic", "source_frame": index in the video / frame number of the camera}``.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import cv2
import numpy as np

from edgead.runtime.uri_help import URI_HELP  # noqa: F401 - kept importable from here

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}
VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpg", ".mjpeg", ".h264", ".h265", ".ts"}

CSI_PIPELINE = ("nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={width},height={height},"
                "framerate={rate}/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! "
                "video/x-raw,format=BGR ! appsink drop=true max-buffers=1")
NO_GSTREAMER = ("{uri}: this OpenCV ({version}) was built without GStreamer, so it cannot open CSI "
                "cameras (the pip opencv-python(-headless) wheels have no GStreamer). On a Jetson use "
                "JetPack's system OpenCV: `pip uninstall opencv-python opencv-python-headless` in this "
                "environment and `sudo apt install python3-opencv` (or create the venv with "
                "--system-site-packages).")


class SourceError(RuntimeError):
    """A source cannot be opened or used; the message names it and the fix."""


class SourceLost(SourceError):
    """A live source stopped delivering frames (unplugged camera, dropped stream)."""


class EndOfStream(Exception):
    """A pulled source has no more frames."""


class FrameError(Exception):
    """This frame cannot be inspected (unreadable file, half-decoded video frame): it still counts
    as captured, with an ERROR verdict and this message as its reason. ``image`` holds whatever
    pixels there are (or None)."""

    def __init__(self, message: str, origin: dict[str, Any], image: np.ndarray | None = None) -> None:
        super().__init__(message)
        self.origin, self.image = origin, image


@dataclass(frozen=True)
class Truth:
    """Ground truth the synthetic conveyor knows about a frame."""

    defect: str | None
    mask: np.ndarray  # uint8 HxW, >0 = defect

    @property
    def defective(self) -> bool:
        return self.defect is not None


@dataclass
class InputOptions:
    """The shared input flags (jetson-inference names)."""

    width: int | None = None  # --input-width
    height: int | None = None  # --input-height
    rate: float | None = None  # --input-rate (fps); paces file/folder/synthetic sources
    loop: int = 0  # --input-loop: extra passes over a file/folder, -1 = forever
    default_size: int = 256  # synthetic frames when neither size= nor --input-width is given


class Source:
    """Base class: ``open`` / ``read`` / ``close``; ``read`` returns (image, truth or None).

    ``live``: frames arrive on the source's own clock (a camera, or a file/folder/synthetic source
    paced by a rate), so a slow pipeline must drop. ``reconnectable``: a device or stream that can
    be lost and reopened (the capture stage retries it with backoff).
    """

    uri: str = ""
    live: bool = False
    reconnectable: bool = False

    def open(self) -> None:
        """Acquire the device/file; raise :class:`SourceError` naming it on failure."""

    def read(self) -> tuple[np.ndarray, Truth | None]:
        raise NotImplementedError

    def origin(self) -> dict[str, Any]:
        """Where the frame last read came from (see the module docstring)."""
        return {"source": self.uri}

    def close(self) -> None:
        """Release the device; safe to call twice."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r}, live={self.live})"


class Pacer:
    """Sleeps so that ``wait`` returns at most ``rate`` times per second. Late ticks are not made
    up with a burst: a camera that missed a frame does not deliver two at once."""

    def __init__(self, rate: float | None) -> None:
        self.period = 1.0 / rate if rate and rate > 0 else 0.0
        self.next = time.monotonic()

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self.next > now:
            time.sleep(self.next - now)
            now = self.next
        self.next = max(self.next + self.period, now)


def _resize_to(image: np.ndarray, opts: InputOptions) -> np.ndarray:
    if not (opts.width and opts.height) or image.shape[1::-1] == (opts.width, opts.height):
        return image
    return cv2.resize(image, (opts.width, opts.height), interpolation=cv2.INTER_AREA)


# -- OpenCV VideoCapture sources (V4L2, CSI, RTSP, video files) ---------------------------------

CaptureFactory = Callable[[Any, int], Any]  # (filename or index, apiPreference) -> cv2.VideoCapture-like


def has_gstreamer(build_info: str | None = None) -> bool:
    info = build_info if build_info is not None else cv2.getBuildInformation()
    for line in info.splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def csi_pipeline(sensor: int, width: int = 1920, height: int = 1080, rate: float = 30) -> str:
    return CSI_PIPELINE.format(sensor=sensor, width=width, height=height, rate=int(round(rate)))


class CaptureSource(Source):
    """A ``cv2.VideoCapture``: live (camera/stream, reconnectable) or a pulled video file.

    A video file is read one frame ahead, so that its last frame is known as the last. When the
    file ends before the frame count its header declares (a cut or half-written file, or a decode
    error), that last decoded frame is a :class:`FrameError` ("truncated video"): it may be
    half-decoded. ``truncated`` then describes the file for the summary.
    """

    def __init__(self, uri: str, target: Any, api: int, device: bool, opts: InputOptions,
                 must_exist: str | None = None, factory: CaptureFactory | None = None) -> None:
        self.uri, self.target, self.api, self.device, self.opts = uri, target, api, device, opts
        self.reconnectable = device
        self.live = device or bool(opts.rate)  # a paced video file stands in for a camera
        self.must_exist = must_exist  # a path checked before opening: a clear error beats OpenCV's warning
        self.factory = factory or (lambda target, api: cv2.VideoCapture(target, api))
        self.cap: Any = None
        self.loops_done = 0
        self.pacer = Pacer(None if device else opts.rate)
        self.delivered = 0  # frames read from a device since the start (across reconnects)
        self.position = 0  # index in the video file of the next frame
        self.ahead: np.ndarray | None = None  # the next frame of a video file, read ahead
        self.declared: int | None = None  # frame count in the file's header, when it has one
        self.truncated: dict[str, Any] | None = None
        kind = "video" if not device else ("camera" if api in (cv2.CAP_V4L2, cv2.CAP_GSTREAMER) else "stream")
        self._origin: dict[str, Any] = {"source": self._name(), "source_kind": kind}

    def _name(self) -> str:
        """The file, the /dev/videoN device, or the URI (a stream's without its credentials)."""
        if not self.device or self.api == cv2.CAP_V4L2:
            return str(self.target)
        parts = urlsplit(self.uri)
        if not parts.hostname:
            return self.uri
        return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl()

    def open(self) -> None:
        if self.must_exist is not None and not os.path.exists(self.must_exist):
            what = "camera device" if self.device else "video file"
            hint = " (list cameras with `v4l2-ctl --list-devices`)" if self.device else ""
            raise SourceError(f"{self.uri}: no such {what}: {self.must_exist}{hint}")
        cap = self.factory(self.target, self.api)
        if cap is None or not cap.isOpened():
            why = "device busy, unplugged or unsupported" if self.device else "unreadable or unsupported video"
            raise SourceError(f"{self.uri}: cannot open ({why})")
        if self.device:
            self._configure(cap)
            self.cap = cap
            return
        self.cap = cap
        count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.declared = int(count) if count and count > 0 else None
        self.position, self.ahead = 0, self._grab()
        if self.ahead is None:
            self.close()
            raise SourceError(f"{self.uri}: no frame could be decoded (corrupt or empty video)")

    def _configure(self, cap: Any) -> None:
        o = self.opts
        if o.width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, o.width)
        if o.height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, o.height)
        if o.rate:
            cap.set(cv2.CAP_PROP_FPS, o.rate)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # honoured by V4L2 only; the reader thread does the rest

    def _grab(self) -> np.ndarray | None:
        ok, image = self.cap.read()
        return image if ok and image is not None and image.size else None

    def read(self) -> tuple[np.ndarray, Truth | None]:
        self.pacer.wait()
        if self.device:
            if self.cap is None:
                raise SourceLost(f"{self.uri}: not open")
            image = self._grab()
            if image is None:
                raise SourceLost(f"{self.uri}: no frame (camera unplugged or stream dropped)")
            self._origin = {**self._origin, "source_frame": self.delivered}
            self.delivered += 1
            return image, None
        while self.ahead is None:  # this pass is over
            if not self._next_pass():
                raise EndOfStream
        image, index = self.ahead, self.position
        self.ahead, self.position = self._grab(), self.position + 1
        self._origin = {**self._origin, "source_frame": index}
        if self.loops_done:
            self._origin["pass"] = self.loops_done
        if self.ahead is None and self.declared is not None and self.position < self.declared:
            self.truncated = {"source": str(self.target), "declared_frames": self.declared,
                              "decoded_frames": self.position, "passes": self.loops_done + 1}
            raise FrameError(f"{self.target}: truncated video: it ends at frame {self.position} of the "
                             f"{self.declared} its header declares; its last frame may be half-decoded",
                             dict(self._origin), _resize_to(image, self.opts))
        return _resize_to(image, self.opts), None

    def _next_pass(self) -> bool:
        """Reopen the file for another pass (``--input-loop``); False when no pass is left."""
        if not (self.opts.loop < 0 or self.loops_done < self.opts.loop):
            return False
        self.loops_done += 1
        self.close()
        try:
            self.open()
        except SourceError:
            return False
        return True

    def origin(self) -> dict[str, Any]:
        return dict(self._origin)

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


# -- image folders and globs ---------------------------------------------------------------------

class ImageListSource(Source):
    """Images of a folder or a glob, sorted by name. An unreadable file (0 bytes, corrupt,
    truncated) is a :class:`FrameError`: a captured frame with an ERROR verdict, never skipped."""

    def __init__(self, uri: str, pattern: str, is_dir: bool, opts: InputOptions,
                 on_skip: Callable[[str, str], None] | None = None) -> None:
        self.uri, self.pattern, self.is_dir, self.opts = uri, pattern, is_dir, opts
        self.live = bool(opts.rate)
        self.on_skip = on_skip  # also told of each unreadable file (path, reason)
        self.files: list[str] = []
        self.index = 0
        self.loops_done = 0
        self.pacer = Pacer(opts.rate)
        self._origin: dict[str, Any] = {"source": uri, "source_kind": "image"}

    def open(self) -> None:
        if self.is_dir:
            if not os.path.isdir(self.pattern):
                raise SourceError(f"{self.uri}: no such folder")
            names = sorted(p for p in Path(self.pattern).iterdir() if p.suffix.lower() in IMAGE_EXTS)
            self.files = [str(p) for p in names]
        else:
            self.files = sorted(f for f in glob.glob(self.pattern) if Path(f).suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise SourceError(f"{self.uri}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
        self.index = 0

    def read(self) -> tuple[np.ndarray, Truth | None]:
        from edgead.data.images import ImageError, read_image

        if self.index >= len(self.files):
            if not (self.opts.loop < 0 or self.loops_done < self.opts.loop):
                raise EndOfStream
            self.loops_done += 1
            self.index = 0
        path = self.files[self.index]
        self.index += 1
        self._origin = {"source": path, "source_kind": "image", **({"pass": self.loops_done} if self.loops_done else {})}
        self.pacer.wait()
        try:
            image = read_image(path)
        except ImageError as err:
            if self.on_skip:
                self.on_skip(path, str(err))
            raise FrameError(str(err), dict(self._origin)) from err
        return _resize_to(image, self.opts), None

    def origin(self) -> dict[str, Any]:
        return dict(self._origin)


# -- the synthetic conveyor ----------------------------------------------------------------------

class SyntheticSource(Source):
    """``synthetic://CATEGORY``: the deterministic conveyor of :mod:`edgead.data.synth` with
    ground truth. Live (paced, drops under overload) when a rate is given, else pulled."""

    def __init__(self, uri: str, category: str, size: int, seed: int, defect_rate: float,
                 rate: float | None) -> None:
        self.uri, self.category, self.size, self.seed = uri, category, size, seed
        self.defect_rate, self.rate = defect_rate, rate
        self.live = bool(rate)
        self.pacer = Pacer(rate)
        self.index = 0
        self.conveyor: Any = None

    def open(self) -> None:
        from edgead.data.synth import CATEGORIES, Conveyor

        if self.category not in CATEGORIES:
            raise SourceError(f"{self.uri}: unknown category {self.category!r}; choose from {sorted(CATEGORIES)}")
        try:
            self.conveyor = Conveyor(self.category, size=self.size, seed=self.seed, defect_rate=self.defect_rate)
        except ValueError as err:
            raise SourceError(f"{self.uri}: {err}") from err

    def read(self) -> tuple[np.ndarray, Truth | None]:
        self.pacer.wait()
        image, mask, defect = self.conveyor[self.index]
        self.index += 1
        return image, Truth(defect, mask)

    def origin(self) -> dict[str, Any]:
        return {"source": self.uri, "source_kind": "synthetic", "source_frame": self.index - 1}


# -- URI parsing ---------------------------------------------------------------------------------

def _query(uri: str, text: str, allowed: dict[str, type]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, items in parse_qs(text, keep_blank_values=True).items():
        if key not in allowed:
            raise SourceError(f"{uri}: unknown option {key!r}; allowed: {', '.join(allowed)}")
        try:
            values[key] = allowed[key](items[-1])
        except ValueError as err:
            raise SourceError(f"{uri}: bad value for {key}: {items[-1]!r}") from err
    return values


def camera_uri(index: int) -> str:
    """``--camera N`` means /dev/videoN (not CSI, unlike jetson-utils' bare ``0``)."""
    return f"v4l2:///dev/video{index}"


def open_source(uri: str, opts: InputOptions | None = None, factory: CaptureFactory | None = None,
                on_skip: Callable[[str, str], None] | None = None) -> Source:
    """Build (not yet open) the source for ``uri``; raise :class:`SourceError` on a bad URI."""
    opts = opts or InputOptions()
    parts = urlsplit(uri)
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""  # "C:\\x" is a path, not a scheme
    if scheme == "v4l2":
        device = parts.path or parts.netloc
        if not device.startswith("/dev/"):
            raise SourceError(f"{uri}: expected v4l2:///dev/videoN")
        return CaptureSource(uri, device, cv2.CAP_V4L2, True, opts, must_exist=device, factory=factory)
    if scheme == "csi":
        try:
            sensor = int(parts.netloc or parts.path.strip("/") or 0)
        except ValueError as err:
            raise SourceError(f"{uri}: expected csi://N with a sensor number") from err
        if factory is None and not has_gstreamer():
            raise SourceError(NO_GSTREAMER.format(uri=uri, version=cv2.__version__))
        pipeline = csi_pipeline(sensor, opts.width or 1920, opts.height or 1080, opts.rate or 30)
        return CaptureSource(uri, pipeline, cv2.CAP_GSTREAMER, True, opts, factory=factory)
    if scheme in ("rtsp", "rtsps", "rtmp", "http", "https", "udp"):
        return CaptureSource(uri, uri, cv2.CAP_FFMPEG, True, opts, factory=factory)
    if scheme == "synthetic":
        q = _query(uri, parts.query, {"size": int, "seed": int, "defect_rate": float, "rate": float})
        size = q.get("size", opts.width or opts.default_size)
        rate = q.get("rate", opts.rate)
        return SyntheticSource(uri, parts.netloc or parts.path.strip("/"), size, q.get("seed", 0),
                               q.get("defect_rate", 0.3), rate)
    if scheme == "file":
        path = parts.netloc + parts.path if parts.netloc else parts.path
        return _path_source(uri, path, opts, factory, on_skip)
    if scheme:
        raise SourceError(f"{uri}: unknown input scheme {scheme!r}\n{URI_HELP}")
    if uri.isdigit():
        raise SourceError(f"{uri}: a bare number is ambiguous (jetson-utils reads it as CSI); "
                          f"use --camera {uri} for /dev/video{uri} or csi://{uri}")
    return _path_source(uri, uri, opts, factory, on_skip)


def _path_source(uri: str, path: str, opts: InputOptions, factory: CaptureFactory | None,
                 on_skip: Callable[[str, str], None] | None) -> Source:
    if any(ch in path for ch in "*?["):
        return ImageListSource(uri, path, False, opts, on_skip)
    if os.path.isdir(path):
        return ImageListSource(uri, path, True, opts, on_skip)
    if Path(path).suffix.lower() in IMAGE_EXTS:  # one image: a one-file list
        return ImageListSource(uri, glob.escape(path), False, opts, on_skip) if os.path.exists(path) \
            else _missing(uri, path)
    return CaptureSource(uri, path, cv2.CAP_ANY, False, opts, must_exist=path, factory=factory)


def _missing(uri: str, path: str) -> Source:
    raise SourceError(f"{uri}: no such file: {path}")
