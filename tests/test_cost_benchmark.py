"""benchmarks/cost.py: the README's cost table comes from real exports, with the bank sized as training sizes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")


def test_cost_rows_time_fp32_and_int8_graphs_and_size_the_bank(tmp_path: Path) -> None:
    from benchmarks import cost

    out = tmp_path / "cost.json"
    assert cost.main(["--models", "patchcore", "--sizes", "32", "--repeats", "3", "--calib", "2",
                      "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and "avx2" in report["machine"]["isa"] or report["machine"]["machine"] != "x86_64"
    (row,) = report["rows"]
    bank = row["memory_bank"]
    assert bank["rows"] == math.ceil(0.01 * cost.TRAIN_IMAGES * 8 * 8) and bank["mb"] > 0
    assert row["first_component"] == "encoder" and 0 < row["first_gflops"] <= row["gflops"]
    for precision in ("fp32", "int8"):
        assert row[f"ort_{precision}_ms"] > 0 and row[f"first_ort_{precision}_ms"] > 0
        assert row[f"first_share_{precision}"] == pytest.approx(row[f"first_ort_{precision}_ms"] / row[f"ort_{precision}_ms"])


def test_interleaved_timing_takes_the_median_of_rounds() -> None:
    from benchmarks.cost import interleaved_ms

    calls = {"a": 0, "b": 0}

    def bump(key: str):
        return lambda: calls.__setitem__(key, calls[key] + 1)

    result = interleaved_ms({"a": bump("a"), "b": bump("b")}, repeats=6, rounds=3)
    assert set(result) == {"a", "b"} and all(np.isfinite(v) and v >= 0 for v in result.values())
    assert calls == {"a": 1 + 6, "b": 1 + 6}  # one warm-up each, then 3 rounds of 2
