"""Shared by the station-view tests: a real small bundle (built once per session, on disk) and a
way to run ``edgead-run`` in a subprocess and find its view's URL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bundles import tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the model's input; frames are larger and resized by the pipeline
CATEGORY = "metal"
URL = re.compile(r"station view on (http://\S+/)")


def view_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' small certified bundle (tests/bundles.py) on metal, shared through the session's
    base temp folder, so both view test modules build it once."""
    return tiny_bundle(tmp_path_factory.getbasetemp() / "view_bundle", CATEGORY)


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, **extra)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("DISPLAY", None)
    if "EDGEAD_VIEW_TOKEN" not in extra:  # a token in the tester's shell must not leak into a test
        e.pop("EDGEAD_VIEW_TOKEN", None)
    return e


class Station:
    """``edgead-run`` in a subprocess, its stderr in a file that is read for the view's URL."""

    def __init__(self, tmp: Path, *args: str, **environ: str) -> None:
        self.results = tmp / "results"
        self.stderr_path = tmp / "stderr.txt"
        self._stderr = open(self.stderr_path, "w")
        cmd = [sys.executable, "-m", "edgead.runtime.cli", *args, "--results", str(self.results)]
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env(**environ), stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def url(self, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout  # a loaded 2-core machine starts slowly
        while time.monotonic() < deadline:
            if match := URL.search(self.stderr()):
                return match.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no station view URL; stderr:\n{self.stderr()[-3000:]}")

    def wait(self, timeout: float = 60.0) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=timeout)
        self._stderr.close()
        return self.proc.returncode, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)
        self._stderr.close()
