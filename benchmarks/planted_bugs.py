"""Replay the planted bugs of issue 9: each is planted alone in a scratch copy of the tree, and the
tests it names are run there; a bug is caught when they fail.

    python benchmarks/planted_bugs.py [--only NAME ...] [--out results/planted_bugs.json]

First the named tests run on the clean copy (they must pass, or nothing below means anything).
Then per bug: apply the text patch of tests/planted_bugs.py, run ``pytest -x`` on its tests with
``PYTHONPATH`` at the copy, restore the file. Prints a table and writes the JSON with the
machine. One pytest process per bug, so nothing leaks from one bug into the next.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "results", "__pycache__", "*.egg-info", ".venv", "mutants", "build",
                                ".pytest_cache", ".hypothesis")


def load_bugs() -> tuple[list, list]:
    spec = importlib.util.spec_from_file_location("planted_bugs", ROOT / "tests" / "planted_bugs.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["planted_bugs"] = module
    spec.loader.exec_module(module)
    return list(module.BUGS), list(module.EXTRA)


def pytest_run(tree: Path, tests: list[str], timeout: float) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--timeout", "300", *tests]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, time.monotonic() - started, "timeout"
    tail = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, time.monotonic() - started, tail[-1] if tail else ""


def replay(bug, tree: Path, timeout: float) -> dict:
    target = tree / bug.file
    original = target.read_text()
    if original.count(bug.old) != 1:
        return {"name": bug.name, "caught": False, "status": f"old text occurs {original.count(bug.old)} times"}
    target.write_text(original.replace(bug.old, bug.new))
    try:
        rc, seconds, last = pytest_run(tree, list(bug.tests), timeout)
    finally:
        target.write_text(original)
    status = {0: "NOT CAUGHT", 1: "caught"}.get(rc, f"error (pytest exit {rc})")
    return {"name": bug.name, "issue": bug.issue, "file": bug.file, "tests": list(bug.tests), "caught": rc == 1,
            "status": status, "pytest_exit": rc, "seconds": round(seconds, 1), "last_line": last}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="bug names to replay (default: all)")
    parser.add_argument("--out", default=str(ROOT / "results" / "planted_bugs.json"))
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edgead.core.machine import describe

    bugs, extra = load_bugs()
    chosen = [b for b in bugs + extra if not args.only or b.name in args.only]
    with tempfile.TemporaryDirectory(prefix="planted-") as scratch:
        tree = Path(scratch) / "tree"
        shutil.copytree(ROOT, tree, ignore=IGNORE, symlinks=True)
        all_tests = sorted({t for b in chosen for t in b.tests})
        rc, seconds, last = pytest_run(tree, all_tests, args.timeout)
        baseline = {"tests": all_tests, "pytest_exit": rc, "seconds": round(seconds, 1), "last_line": last}
        print(f"clean tree: {len(all_tests)} tests, pytest exit {rc} in {seconds:.0f} s ({last})")
        if rc != 0:
            print("the named tests fail on the clean tree: nothing to replay")
            return 2
        rows = []
        for bug in chosen:
            rows.append(row := replay(bug, tree, args.timeout))
            print(f"{row['name']:<30}{row['status']:<14}{row.get('seconds', 0):>6.1f} s  {bug.file}", flush=True)
    issue_rows = [r for r in rows if r["name"] in {b.name for b in bugs}]
    caught = sum(r["caught"] for r in issue_rows)
    print(f"caught {caught}/{len(issue_rows)} of the issue's bugs"
          + (f"; extra {sum(r['caught'] for r in rows) - caught}/{len(rows) - len(issue_rows)}" if extra else ""))
    report = {"caught": caught, "of": len(issue_rows), "baseline": baseline, "bugs": rows, "machine": describe(),
              "command": "python benchmarks/planted_bugs.py (through /work/wt/heavy: 1 thread, nice 5)"}
    if not args.only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0 if caught == len(issue_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
