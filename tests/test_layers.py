"""The package's import layers (pyproject.toml [tool.importlinter]) hold, and the check bites."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("import-linter is not installed (it is part of the test extra)")
    return subprocess.run([str(lint), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_layers_hold() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("edgead/runtime/stats.py", "import torch", "edgead.runtime is not allowed to import torch"),
    ("edgead/engines/ort_engine.py", "from edgead.training import trainer",
     "edgead.engines is not allowed to import edgead.training"),
    ("edgead/models/base.py", "from edgead.runtime import pipeline", "edgead is layered"),
    ("edgead/core/contract.py", "import benchmarks.quality", "edgead is not allowed to import benchmarks"),
])
def test_a_forbidden_import_breaks_the_build(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """A scratch copy of the package with one bad import fails the check, naming the contract."""
    for name in ("edgead", "export"):
        shutil.copytree(ROOT / name, tmp_path / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # planted by the test\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert broken in done.stdout, done.stdout[-3000:]
