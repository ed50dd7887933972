"""Faults on real links, injected at exact frames of a real pipeline run (the source holds there
until the fault is in place): a broker killed and restarted mid-run, a PLC that goes away under
--fail-safe-output, and a link that is dead from the start."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("paho.mqtt")
pytest.importorskip("pymodbus")

from line_support import (LOOPBACK, SIZE, HeldSource, ModbusServer, Mosquitto, Subscriber, free_port,  # noqa: E402
                          link_events, pipeline_for, read_log, run_context, line_bundle, wait_until)

from edgead.runtime.cli import main  # noqa: E402
from edgead.runtime.sinks import open_sink  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return line_bundle(tmp_path_factory)


def settled(pipeline, frames: int):
    """Every frame before ``frames`` has been through the sinks."""
    return lambda: pipeline.stats.inspected + pipeline.stats.errored == frames


def test_broker_killed_mid_run_then_restarted(bundle, tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    # A persistent session: the broker keeps the subscription (saved just before the SIGKILL) and
    # queues what arrives before this client is back.
    sub = Subscriber(broker.port, "f/st", client_id="plant-mes", persistent=True)
    context, notes = run_context(bundle)
    sink = open_sink(f"mqtt://{LOOPBACK}:{broker.port}/f/st?queue=32&reconnect_max=0.2", context)
    holder: list = []

    def kill_broker() -> None:  # before frame 60: 0..59 are delivered, then the broker dies
        wait_until(settled(holder[0], 60), "frames 0..59 through the sinks")
        wait_until(lambda: sink.summary()["sent"] == 60 and len(sub.on("f/st")) == 60, "60 verdicts delivered")
        broker.kill(save_first=True)
        wait_until(lambda: not sink.link_up, "the sink to see the link down")

    def restart_broker() -> None:  # before frame 120: 60..119 were offered while it was down
        wait_until(settled(holder[0], 120), "frames 60..119 through the sinks")
        assert sink.summary()["queued"] == 32 and sink.summary()["unsent_reasons"] == {"overflow": 28}
        broker.start()
        wait_until(lambda: sink.link_up, "the sink to reconnect")

    def caught_up() -> None:  # with the link up, the line waits for the sink now and then: no overflow
        wait_until(lambda: sink.summary()["queued"] == 0, "the sink to catch up")

    holds = {**{i: caught_up for i in (20, 40, 140, 160, 180)}, 60: kill_broker, 120: restart_broker}
    pipeline, engine, log = pipeline_for(bundle, HeldSource(200, holds), [sink], tmp_path / "log.jsonl")
    holder.append(pipeline)
    try:
        result = pipeline.run()
        s = sink.summary()
        expected = list(range(60)) + list(range(88, 200))  # the 32 newest of the outage, then the rest
        got = wait_until(lambda: len(sub.on("f/st")) >= len(expected) and sub.on("f/st"), "the backlog and the rest")
    finally:
        sink.close()
        sub.close()
        broker.stop()
        engine.close()
        log.close()
    assert result.summary["frames"]["inspected"] + result.summary["frames"]["errored"] == 200
    assert s["offered"] == 200 and s["sent"] + s["unsent"] == 200 and s["queued"] == 0
    assert s["sent"] == 172 and s["unsent_reasons"] == {"overflow": 28} and s["reconnects"] == 1
    assert s["downtime_s"] > 0 and s["link_up"]
    rows = {r["frame"]: r for r in read_log(tmp_path / "log.jsonl")}
    assert [m["frame"] for m in got] == expected  # in order, nothing extra, nothing silently lost
    assert all(m["verdict"] == rows[m["frame"]]["verdict"] and m["score"] == rows[m["frame"]]["score"] for m in got)
    assert any("link lost" in n for n in notes)
    assert link_events(tmp_path / "log.jsonl") == [(60, [sink.uri]), (120, [])]


def test_fail_safe_output_turns_frames_ng_while_the_plc_link_is_down(bundle, tmp_path):
    plc = ModbusServer().start()
    context, _ = run_context(bundle)
    stale_ms = 300
    sink = open_sink(f"modbus://{LOOPBACK}:{plc.port}?coil=0&pulse_ms=1&gap_ms=1&probe_s=0.02&reconnect_max=0.1"
                     f"&stale_ms={stale_ms}", context)
    holder: list = []
    offered_at: dict[str, int] = {}

    def plc_goes_away() -> None:
        wait_until(settled(holder[0], 40), "frames 0..39 through the sinks")
        wait_until(lambda: sink.summary()["queued"] == 0, "the pulses of frames 0..39")
        offered_at["down"] = sink.summary()["offered"]
        plc.stop()
        wait_until(lambda: not sink.link_up, "the sink to see the PLC gone")

    def plc_comes_back() -> None:
        wait_until(settled(holder[0], 80), "frames 40..79 through the sinks")
        # All 40 were NG (forced or not) and wait in the queue; let them grow older than stale_ms so
        # that none of these pulses fires after the reconnect (those parts are long past the gate).
        assert sink.summary()["offered"] == offered_at["down"] + 40
        time.sleep(stale_ms / 1000.0 + 0.1)
        plc.start()
        wait_until(lambda: sink.link_up, "the sink to reconnect")

    pipeline, engine, log = pipeline_for(bundle, HeldSource(120, {40: plc_goes_away, 80: plc_comes_back}), [sink],
                                         tmp_path / "log.jsonl", fail_safe=True)
    holder.append(pipeline)
    try:
        result = pipeline.run()
        s = sink.summary()
    finally:
        sink.close()
        plc.stop()
        engine.close()
        log.close()
    rows = read_log(tmp_path / "log.jsonl")
    forced = [r for r in rows if "fail-safe" in (r.get("error") or "")]
    f = result.summary["frames"]
    assert f["captured"] == f["inspected"] + f["dropped"] + f["errored"] == 120 and result.summary["balanced"]
    assert all(r["verdict"] == "NG" for r in rows[40:80])  # the line stops: every frame rejected
    assert {r["frame"] for r in forced} <= set(range(40, 80)) and len(forced) > 0
    assert all("the model said OK" in r["error"] for r in forced)
    assert any(r["verdict"] == "OK" for r in rows[80:]) and any(r["verdict"] == "OK" for r in rows[:40])
    assert result.summary["fail_safe"]["forced_ng"] == len(forced)
    assert s["offered"] == f["ng"] + f["errored"] and s["sent"] + s["unsent"] == s["offered"]
    assert s["unsent_reasons"] == {"stale": 40} and s["reconnects"] == 1
    assert plc.pulses("coil", 0)[-1] == 0
    assert link_events(tmp_path / "log.jsonl") == [(40, [sink.uri]), (80, [])]


def test_cli_fail_safe_output_with_a_dead_link(bundle, tmp_path):
    port = free_port()  # nothing listens there
    uri = f"modbus://{LOOPBACK}:{port}?wait_s=0.2&flush_s=0.2&reconnect_max=0.1"
    results = tmp_path / "r"
    rc = main([f"synthetic://metal?size={SIZE}", "--model", str(bundle), "--frames", "12", "--results", str(results),
               "--output", uri, "--fail-safe-output", "--quiet", "--headless"])
    summary = json.loads((results / "summary.json").read_text())
    rows = read_log(results / "log.jsonl")
    sink = summary["sinks"][uri]
    assert rc == 0 and [r["verdict"] for r in rows] == ["NG"] * 12
    assert summary["fail_safe"]["forced_ng"] == sum("fail-safe" in (r.get("error") or "") for r in rows) > 0
    assert sink["offered"] == sink["unsent"] == 12 and sink["sent"] == 0 and not sink["ever_connected"]
    assert "cannot connect" in sink["last_error"]
    # Without the flag the same dead link changes no verdict.
    rc = main([f"synthetic://metal?size={SIZE}", "--model", str(bundle), "--frames", "12", "--results",
               str(tmp_path / "r2"), "--output", uri, "--quiet", "--headless"])
    assert rc == 0 and "OK" in [r["verdict"] for r in read_log(tmp_path / "r2" / "log.jsonl")]
