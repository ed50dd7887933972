"""modbus://: every frame that is not OK pulses a coil (or a holding register) of pymodbus's own
TCP server on 127.0.0.1, and the pulses counted by the server match the run's verdicts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymodbus")

from line_support import LOOPBACK, SIZE, ModbusServer, read_log, run_context, line_bundle  # noqa: E402

from edgead.runtime.cli import main  # noqa: E402
from edgead.runtime.pipeline import Frame  # noqa: E402
from edgead.runtime.postprocess_stage import Inspection  # noqa: E402
from edgead.runtime.sinks import SinkError, open_sink  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return line_bundle(tmp_path_factory)


@pytest.fixture
def plc():
    server = ModbusServer(unit=2).start()
    yield server
    server.stop()


def rising_edges(values: list[int]) -> int:
    return sum(1 for before, now in zip([0] + values, values) if now and not before)


def test_each_reject_of_a_run_pulses_the_coil(bundle, plc, tmp_path):
    uri = f"modbus://{LOOPBACK}:{plc.port}?unit=2&coil=3&pulse_ms=2&gap_ms=2&stale_ms=0"
    results = tmp_path / "r"
    rc = main([f"synthetic://metal?size={SIZE}", "--model", str(bundle), "--frames", "120", "--results", str(results),
               "--output", uri, "--quiet", "--headless"])
    summary = json.loads((results / "summary.json").read_text())
    f, sink = summary["frames"], summary["sinks"][uri]
    rejects = [r["frame"] for r in read_log(results / "log.jsonl") if r["verdict"] != "OK"]
    values = plc.pulses("coil", 3)
    assert rc == 0 and 0 < len(rejects) == f["ng"] + f["errored"] < 120
    assert values[0] == 0  # written low on connect: a pulse cut by a lost link never stays up
    assert rising_edges(values) == len(rejects) == sink["sent"] == sink["offered"] and sink["unsent"] == 0
    assert values[1:] == [1, 0] * len(rejects) and sink["latency_ms"]["n"] == len(rejects)
    assert not plc.pulses("register", 3)


def test_holding_register_pulses_for_ng_and_error(bundle, plc):
    context, _ = run_context(bundle)
    sink = open_sink(f"modbus://{LOOPBACK}:{plc.port}?unit=2&register=5&value=7&pulse_ms=1", context)
    verdicts = ["OK", "NG", "OK", "ERROR", "NG", "OK", "NG", "OK"]
    try:
        for i, verdict in enumerate(verdicts):
            frame = Frame(i, np.zeros((4, 4), np.uint8), time.monotonic(), time.time())
            sink.write(frame, Inspection(verdict), 0.0, {"frame": i, "verdict": verdict, "age_ms": 0.0})
        sink.finish()
        s = sink.summary()
    finally:
        sink.close()
    assert s["sent"] == s["offered"] == 4 and s["unsent"] == 0  # an ERROR part is rejected too
    assert plc.pulses("register", 5) == [0] + [7, 0] * 4 and not plc.pulses("coil", 0)


def test_bad_modbus_options(bundle):
    context, _ = run_context(bundle)
    with pytest.raises(SinkError, match="not both"):
        open_sink(f"modbus://{LOOPBACK}:1?coil=1&register=2", context)
    with pytest.raises(SinkError, match="unknown option"):
        open_sink(f"modbus://{LOOPBACK}:1?pulse=50", context)
    with pytest.raises(SinkError, match="unit"):
        open_sink(f"modbus://{LOOPBACK}:1?unit=300", context)
