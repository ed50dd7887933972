"""Where a run writes, so that no run ever overwrites another's results.

- Without ``--results`` each run gets a fresh folder ``edgead-results/<YYYYmmdd-HHMMSS>/`` (a
  ``-2``, ``-3``... suffix when two runs start within the same second); ``--demo`` does the same
  under ``edgead-demo/``.
- ``--results DIR`` writes exactly there: DIR must be absent or empty, unless ``--overwrite``.
- ``--log FILE`` must not exist, ``--save-ng DIR`` must be absent or empty, and an output video
  given with ``--output`` must not exist, each unless ``--overwrite``.
- With ``--overwrite`` the earlier run's files are removed first (``summary.json``, the log, the NG
  images named as edgead names them); nothing else in those folders is touched.
- The positional OUTPUT is never an existing file: ``edgead-run g3/*.mp4`` unquoted reaches the
  program as ``g3/a.mp4 g3/b.mp4``, and writing over ``b.mp4`` would destroy a recording. It is
  refused whatever the flags; ``--output FILE --overwrite`` writes over a file on purpose. An
  output that is the input itself is always refused.

NG images are named ``<frame id>_<source>_frame.png`` (and ``_map``, ``_overlay``): the frame id
of the JSONL record, then the image file's stem, or the video file's stem and frame index, so a
saved image maps back to its part.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
LOG = "log.jsonl"
NG_SUFFIXES = ("_frame.png", "_map.png", "_overlay.png")
_NG_NAME = re.compile(r"^\d{8}(_.*)?(" + "|".join(map(re.escape, NG_SUFFIXES)) + r")$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ResultsError(ValueError):
    """A results path that would overwrite something; the message says which and the fix."""


@dataclass
class ResultsPlan:
    folder: Path
    log_given: Path | None  # --log FILE, else the log is FOLDER/log.jsonl
    ng: Path | None
    overwrite: bool
    fresh: bool  # a timestamped folder of its own (the default)

    @property
    def log(self) -> Path:
        return self.log_given or self.folder / LOG

    def create(self) -> Path:
        """Make the folders (a fresh one race-free) and, with --overwrite, remove the earlier run's files."""
        if self.fresh:
            self.folder, self.fresh = _claim_fresh(self.folder), False
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            for stale in (self.folder / SUMMARY, self.log):
                if stale.is_file():
                    stale.unlink()
            if self.ng is not None and self.ng.is_dir():
                for p in self.ng.iterdir():
                    if p.is_file() and _NG_NAME.match(p.name):
                        p.unlink()
        return self.folder

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """``summary.json``, written whole or not at all (a temporary file renamed over it)."""
        path = self.folder / SUMMARY
        tmp = path.with_name(f".{SUMMARY}.tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path


def append_events(path: Path, events: list[dict[str, Any]]) -> None:
    """Event lines for the JSONL log with the standard library only: after an import cut short by
    a signal, numpy (and so the log module) may not load again in this process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for event in events:
            fh.write(json.dumps({**event, "t_wall": round(time.time(), 6)}, default=str) + "\n")


def plan(results: str | None, log: str | None, save_ng: str | None, overwrite: bool,
         default_root: str = "edgead-results", now: float | None = None) -> ResultsPlan:
    """Decide the run's paths; raise :class:`ResultsError` for any that would overwrite."""
    hint = " (give another folder, or --overwrite to replace the earlier run's files)"
    if results is None:
        folder, fresh = Path(default_root) / time.strftime("%Y%m%d-%H%M%S", time.localtime(now)), True
    else:
        folder, fresh = Path(results), False
        if folder.exists() and not folder.is_dir():
            raise ResultsError(f"--results {folder}: exists and is not a folder")
        if not overwrite and _non_empty(folder):
            raise ResultsError(f"--results {folder}: the folder is not empty{hint}")
    log_path = Path(log) if log else None
    if log_path is not None and log_path.exists() and not overwrite:
        raise ResultsError(f"--log {log_path}: the file exists{hint}")
    ng = Path(save_ng) if save_ng else None
    if ng is not None:
        if ng.exists() and not ng.is_dir():
            raise ResultsError(f"--save-ng {ng}: exists and is not a folder")
        if not overwrite and _non_empty(ng):
            raise ResultsError(f"--save-ng {ng}: the folder is not empty{hint}")
    return ResultsPlan(folder=folder, log_given=log_path, ng=ng, overwrite=overwrite, fresh=fresh)


def check_outputs(positional: str | None, options: list[str], input_uri: str | None, overwrite: bool,
                  is_file_output=lambda uri: "://" not in uri or uri.startswith("file://")) -> None:
    """Refuse outputs that would destroy a file (see the module docstring)."""
    inputs = {_real(_strip_file(input_uri))} if input_uri else set()
    for uri in ([positional] if positional else []) + list(options):
        if not is_file_output(uri):
            continue
        path = Path(_strip_file(uri))
        if _real(str(path)) in inputs:
            raise ResultsError(f"output {uri} is the input itself: give another output file")
        if not path.exists():
            continue
        if uri == positional:
            raise ResultsError(
                f"OUTPUT {uri} already exists: is it a second input? An unquoted glob such as g3/*.mp4 "
                f"expands to several files: quote it ('g3/*.mp4'). To write over {uri} on purpose, give "
                f"--output {uri} --overwrite")
        if not overwrite:
            raise ResultsError(f"--output {uri}: the file exists (give another file, or --overwrite to replace it)")


def fresh_root(demo: bool) -> str:
    return "edgead-demo" if demo else "edgead-results"


def ng_stem(frame_id: int, record: dict[str, Any] | None) -> str:
    """``<frame id>`` plus the source's name and position, safe as a file name."""
    stem = f"{int(frame_id):08d}"
    record = record or {}
    source, index = record.get("source"), record.get("source_frame")
    if source and record.get("source_kind") in ("image", "video"):
        tag = _UNSAFE.sub("_", Path(str(source)).stem).strip("_")[:80]
        if index is not None and record.get("source_kind") == "video":
            tag += f"-f{int(index):06d}"
        if tag:
            stem += f"_{tag}"
    return stem


def _claim_fresh(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``...: the first that this process creates itself."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = folder if n == 1 else folder.with_name(f"{folder.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ResultsError(f"{folder}: cannot find a fresh results folder name")


def _non_empty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _real(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return path
