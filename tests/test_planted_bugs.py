"""The planted-bug list stays replayable: every old text is still in the code, exactly once, and
every test it names exists. (The replay itself, 17 pytest runs, is benchmarks/planted_bugs.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from planted_bugs import BUGS, EXTRA

ROOT = Path(__file__).resolve().parents[1]


def test_seventeen_bugs_of_the_issue():
    assert len(BUGS) == 17 and len({b.name for b in BUGS + EXTRA}) == len(BUGS) + len(EXTRA)


@pytest.mark.parametrize("bug", BUGS + EXTRA, ids=lambda b: b.name)
def test_old_text_occurs_once_and_the_named_tests_exist(bug):
    text = (ROOT / bug.file).read_text()
    assert text.count(bug.old) == 1, f"{bug.file}: the text to replace occurs {text.count(bug.old)} times"
    assert bug.new != bug.old and bug.tests
    for node in bug.tests:
        path, _, name = node.partition("::")
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name.split("[")[0] in names, f"{node}: no such test"
