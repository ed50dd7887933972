"""``edgead train --out DIR``: never train over an earlier run by accident.

An existing, non-empty DIR is refused unless ``--resume`` (continue the run in it) or
``--overwrite`` (replace it: its run files are removed first, so a crash cannot leave the old
weights beside the new history). Other files in DIR are left alone.
"""

from __future__ import annotations

from pathlib import Path

from edgead.core.cli_support import UsageError
from edgead.training.checkpoint import CALIBRATION, CONFIG, HISTORY, RESUME, WEIGHTS

RUN_FILES = (CONFIG, WEIGHTS, CALIBRATION, HISTORY, RESUME)


class RunExistsError(UsageError):
    """The --out folder already holds something; the message names it and the choices."""


def prepare_run_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Check ``out`` before training (see the module docstring); returns it as a Path."""
    path = Path(out)
    if resume and overwrite:
        raise UsageError("give --resume (continue the run) or --overwrite (replace it), not both")
    if path.exists() and not path.is_dir():
        raise RunExistsError(f"--out {path}: exists and is not a folder; give another --out")
    if not path.is_dir() or not any(path.iterdir()):
        return path
    if resume:
        if not any((path / name).is_file() for name in RUN_FILES):
            raise RunExistsError(f"--out {path}: holds no run to resume (no {RESUME} or {CONFIG}); "
                                 "give an empty or new --out")
        return path
    if not overwrite:
        held = sorted(p.name for p in path.iterdir())
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise RunExistsError(f"--out {path}: the folder is not empty ({shown}); give --resume to continue "
                             "the run, --overwrite to replace it, or another --out")
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    return path
