"""Mutation testing with mutmut over the core (configuration: ``[tool.mutmut]`` in pyproject.toml).

    python benchmarks/mutation.py [--sample PATTERN ...] [--out results/mutation.json]

Runs in a scratch copy of the tree (mutmut writes its ``mutants/`` folder there), one child at a
time; ``--sample`` restricts the run to mutant-name patterns (fnmatch, e.g.
``'edgead.core.calibration*'``), the fixed sample CI can afford. Writes the score
(killed + timeout) / (tested) per module and every surviving mutant with its diff.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", "results", "__pycache__", "*.egg-info", ".venv", "mutants", "build",
                                ".pytest_cache", ".hypothesis")
MUTMUT = [sys.executable, "-m", "mutmut"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", nargs="*", default=[], help="mutant-name patterns (default: every mutant)")
    parser.add_argument("--out", default=str(ROOT / "results" / "mutation.json"))
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument("--budget", type=float, default=540, help="seconds for mutmut run; then report what is done")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from edgead.core.machine import describe

    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        tree = Path(scratch) / "tree"
        shutil.copytree(ROOT, tree, ignore=IGNORE, symlinks=True)
        link = tree / "edgead" / "export"
        if link.is_symlink():  # mutmut does not copy the symlink into mutants/: make it a folder
            link.unlink()
            shutil.copytree(tree / "export", link)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("PYTHONPATH", None)  # mutmut puts its mutants/ first; the tree itself must not shadow it
        started = time.monotonic()
        proc = subprocess.Popen([*MUTMUT, "run", "--max-children", str(args.children), *args.sample], cwd=tree,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=args.budget)
            finished = True
        except subprocess.TimeoutExpired:  # the mutants done so far are on disk: report them
            os.killpg(proc.pid, 9)  # mutmut and its forked workers
            out, err = proc.communicate()
            finished = False
        run = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        seconds = time.monotonic() - started
        listing = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=tree, env=env, capture_output=True,
                                 text=True).stdout
        status = {}
        for line in listing.splitlines():
            m = re.match(r"\s*([\w.ǁ]+__mutmut_\d+): (.+)$", line)
            if m and (not args.sample or any(_match(m.group(1), p) for p in args.sample)):
                status[m.group(1)] = m.group(2).strip()
        survivors = {name: subprocess.run([*MUTMUT, "show", name], cwd=tree, env=env, capture_output=True,
                                          text=True).stdout for name, s in status.items() if s == "survived"}
    per_module: dict[str, Counter] = defaultdict(Counter)
    for name, s in status.items():
        per_module[name.split(".x")[0].split("__mutmut")[0].rsplit(".", 1)[0] if ".x" not in name
                   else name.split(".x")[0]][s] += 1
    counts = Counter(status.values())
    tested = sum(counts.values()) - counts.get("skipped", 0) - counts.get("not checked", 0)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    score = killed / tested if tested else float("nan")
    print(str(run.stdout)[-300:], str(run.stderr)[-1500:], sep="\n")
    print(f"mutants: {dict(counts)}; score {score:.1%} ({killed}/{tested}) in {seconds:.0f} s")
    for module, c in sorted(per_module.items()):
        t = sum(c.values()) - c.get("skipped", 0) - c.get("not checked", 0)
        print(f"  {module:<40}{dict(c)}  {((c['killed'] + c['timeout']) / t if t else float('nan')):.1%}")
    report = {"score": score, "killed": killed, "tested": tested, "counts": dict(counts), "seconds": round(seconds),
              "sample": args.sample or "all", "per_module": {k: dict(v) for k, v in per_module.items()},
              "survivors": survivors, "mutmut_exit": run.returncode, "finished": finished, "machine": describe(),
              "command": "python benchmarks/mutation.py " + " ".join(args.sample)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 0


def _match(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatch(name, pattern)


if __name__ == "__main__":
    sys.exit(main())
