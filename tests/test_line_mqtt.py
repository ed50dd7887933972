"""mqtt:// against a real mosquitto on 127.0.0.1 (started and stopped by the test), checked by a
second paho client: every verdict of an edgead-run arrives, in order, with the JSONL's fields."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("paho.mqtt")

from line_support import (LOOPBACK, SIZE, Mosquitto, Subscriber, make_ca_and_server_cert, mosquitto_binary,  # noqa: E402
                          read_log, run_context, line_bundle, wait_until)

from edgead.runtime.cli import main  # noqa: E402
from edgead.runtime.pipeline import Frame  # noqa: E402
from edgead.runtime.postprocess_stage import Inspection  # noqa: E402
from edgead.runtime.sinks import SinkError, open_sink  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return line_bundle(tmp_path_factory)


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def same_fields(message: dict, row: dict, threshold: float) -> None:
    """A message is the frame's log line (the log adds the sink stage's own time) + station, threshold."""
    assert message["threshold"] == pytest.approx(threshold) and message["station"] == "s1"
    for key, value in row.items():
        if key == "e2e_ms":
            continue
        if key == "latency_ms":
            assert message[key] == {k: v for k, v in value.items() if k != "sink"}
        else:
            assert message[key] == value, key


def test_every_verdict_of_a_200_frame_run_arrives_in_order(bundle, broker, tmp_path):
    from edgead.core.bundle import load_bundle

    sub = Subscriber(broker.port, "edgead/#")
    base = f"mqtt://{LOOPBACK}:{broker.port}/edgead"
    every, rejects = f"{base}/all?station=s1", f"{base}/ng?on=ng&qos=1&station=s1"
    results = tmp_path / "r"
    rc = main([f"synthetic://metal?size={SIZE}", "--model", str(bundle), "--frames", "200", "--results", str(results),
               "--output", every, "--output", rejects, "--quiet", "--headless"])
    sub_messages = wait_until(lambda: len(sub.on("edgead/all")) >= 200 and sub, "200 messages")
    summary = json.loads((results / "summary.json").read_text())
    rows = read_log(results / "log.jsonl")
    f = summary["frames"]
    assert rc == 0 and f["captured"] == f["inspected"] + f["errored"] == 200 == len(rows)

    sinks = summary["sinks"]
    assert sinks[every]["sent"] == sinks[every]["offered"] == 200
    assert sinks[every]["queued"] == sinks[every]["unsent"] == 0 and sinks[every]["latency_ms"]["n"] == 200
    not_ok = [r for r in rows if r["verdict"] != "OK"]
    assert 0 < len(not_ok) < 200 and sinks[rejects]["sent"] == len(not_ok) == f["ng"] + f["errored"]

    threshold = load_bundle(str(bundle)).calibration.image_threshold
    got = sub_messages.on("edgead/all")
    assert [m["frame"] for m in got] == [r["frame"] for r in rows] == list(range(200))  # in order, no gap
    for message, row in zip(got, rows):
        same_fields(message, row, threshold)
    got_ng = wait_until(lambda: len(sub.on("edgead/ng")) >= len(not_ok) and sub.on("edgead/ng"), "reject messages")
    assert [m["frame"] for m in got_ng] == [r["frame"] for r in not_ok]

    states = [m["state"] for m in sub.on("edgead/all/status")]
    assert states[0] == "online" and states[-1] == "offline"
    status = sub.on("edgead/all/status")[-1]
    assert status["reason"] == "stopped" and status["station"] == "s1" and status["detector"] == "ssim_ae"
    assert status["threshold"] == pytest.approx(threshold) and status["certified"] is True
    sub.close()
    late = Subscriber(broker.port, "edgead/all/status")  # the status is retained for whoever comes later
    retained = wait_until(lambda: late.messages, "the retained status")
    assert retained[0][2] and retained[0][1]["state"] == "offline"
    late.close()


def test_last_will_says_offline_when_the_station_dies(bundle, broker, tmp_path):
    sub = Subscriber(broker.port, "line/#")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DISPLAY", None)
    cmd = [sys.executable, "-m", "edgead.runtime.cli", f"synthetic://metal?size={SIZE}&rate=50", "--model",
           str(bundle), "--results", str(tmp_path / "r"), "--quiet",
           "--output", f"mqtt://{LOOPBACK}:{broker.port}/line/st?station=s1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(sub.on("line/st")) >= 5, "verdicts from the station", timeout=90)
        assert sub.on("line/st/status")[-1]["state"] == "online"
        proc.send_signal(signal.SIGKILL)  # no clean stop: only the broker can tell
        proc.wait(10)
        last = wait_until(lambda: sub.on("line/st/status")[-1]["state"] == "offline" and sub.on("line/st/status")[-1],
                          "the last will")
        assert last["reason"] == "connection lost" and last["station"] == "s1"
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()


def test_tls_and_a_password_from_a_file_or_the_environment(bundle, tmp_path, monkeypatch):
    ca, cert, key = make_ca_and_server_cert(tmp_path / "pki")
    passwd = tmp_path / "passwd"
    subprocess.run([mosquitto_binary("mosquitto_passwd"), "-b", "-c", str(passwd), "station", "s3cret"],
                   check=True, capture_output=True)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    for path, password in ((good, "s3cret"), (bad, "wrong")):
        path.write_text(json.dumps({"username": "station", "password": password}))
        path.chmod(0o600)
    broker = Mosquitto(tmp_path / "broker", anonymous=False, extra=(
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\npassword_file {passwd}\n")).start()
    sinks = []
    try:
        sub = Subscriber(broker.port, "tls/#", username="station", password="s3cret", ca_certs=str(ca))
        base = f"mqtt://{LOOPBACK}:{broker.port}/tls/st?ca={ca}&station=s1&flush_s=1"
        context, notes = run_context(bundle)
        sinks = [open_sink(base + f"&credentials={good}", context),
                 open_sink(base + f"&credentials={bad}&wait_s=1", context)]
        assert sinks[0].link_up and not sinks[1].link_up
        monkeypatch.setenv("EDGEAD_MQTT_USERNAME", "station")
        monkeypatch.setenv("EDGEAD_MQTT_PASSWORD", "s3cret")
        from_env = open_sink(base, context)
        assert from_env.link_up
        from_env.close()
        for i in range(20):
            frame = Frame(i, np.zeros((4, 4), np.uint8), time.monotonic(), time.time())
            for s in sinks:
                s.write(frame, Inspection("OK", 0.1, 0.1), 0.0, {"frame": i, "verdict": "OK", "age_ms": 0.0})
        for s in sinks:
            s.finish()
        ok, no = sinks[0].summary(), sinks[1].summary()
        assert ok["sent"] == ok["offered"] == 20 and ok["unsent"] == 0
        assert no["sent"] == 0 and no["unsent"] == no["offered"] == 20 and not no["ever_connected"]
        assert "refused" in no["last_error"] and any("refused" in n for n in notes)
        got = wait_until(lambda: len(sub.on("tls/st")) >= 20 and sub.on("tls/st"), "the messages over TLS")
        assert [m["frame"] for m in got] == list(range(20))
        sub.close()
    finally:
        for s in sinks:
            s.close()
        broker.stop()


def test_credentials_never_in_the_uri_and_options_are_checked(bundle):
    context, _ = run_context(bundle)
    with pytest.raises(SinkError, match="no credentials in the URI"):
        open_sink(f"mqtt://user:pw@{LOOPBACK}:1/t", context)
    with pytest.raises(SinkError, match="unknown option"):
        open_sink(f"mqtt://{LOOPBACK}:1/t?qso=1", context)
    with pytest.raises(SinkError, match="qos=3"):
        open_sink(f"mqtt://{LOOPBACK}:1/t?qos=3", context)
    with pytest.raises(SinkError, match="wildcard"):
        open_sink(f"mqtt://{LOOPBACK}:1/a/#", context)
    with pytest.raises(SinkError, match="topic"):
        open_sink(f"mqtt://{LOOPBACK}:1/a/+/b", context)
    with pytest.raises(SinkError, match="topic"):
        open_sink(f"mqtt://{LOOPBACK}:1", context)


def test_the_runtime_imports_no_line_package_unless_a_line_output_is_used():
    code = ("import sys, edgead.runtime.cli, edgead.runtime.pipeline, edgead.runtime.sinks\n"
            "from edgead.runtime.sinks import open_sink, SinkContext\n"
            "open_sink('out.avi', SinkContext())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('paho', 'asyncua', 'pymodbus')\n"
            "             or m.startswith('edgead.runtime.line')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
