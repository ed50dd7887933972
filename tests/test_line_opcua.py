"""opc.tcp://: the station's own OPC UA server, read and subscribed to by asyncua's client during and
after a real pipeline run; with security on, anonymous and unknown clients are refused."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

asyncua = pytest.importorskip("asyncua")

from asyncua import Client, ua  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402
from line_support import LOOPBACK, HeldSource, free_port, pipeline_for, read_log, run_context, line_bundle  # noqa: E402

from edgead.runtime.line import opcua_security as sec  # noqa: E402
from edgead.runtime.line.opcua import NAMESPACE  # noqa: E402
from edgead.runtime.sinks import SinkError, open_sink  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return line_bundle(tmp_path_factory)


async def station_nodes(client: Client, station: str) -> dict[str, object]:
    ns = await client.get_namespace_index(NAMESPACE)
    obj = await client.nodes.objects.get_child(f"{ns}:{station}")
    return {(await n.read_browse_name()).Name: n for n in await obj.get_children()}


async def read_all(nodes: dict[str, object]) -> dict[str, object]:
    return {name: await node.read_value() for name, node in nodes.items()}


async def until(condition, what: str, timeout: float = 30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await condition()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Changes:
    def __init__(self) -> None:
        self.values: dict[str, list] = {}

    def datachange_notification(self, node, value, data) -> None:
        self.values.setdefault(str(node.nodeid), []).append(value)


def test_values_and_subscriptions_equal_the_run_summary(bundle, tmp_path):
    port = free_port()
    context, _ = run_context(bundle)
    sink = open_sink(f"opc.tcp://{LOOPBACK}:{port}/edgead?station=st1&heartbeat_ms=50", context)
    pipeline, engine, log = pipeline_for(bundle, HeldSource(80), [sink], tmp_path / "log.jsonl")

    async def scenario():
        async with Client(f"opc.tcp://{LOOPBACK}:{port}/edgead") as client:
            nodes = await station_nodes(client, "st1")
            changes = Changes()
            sub = await client.create_subscription(10, changes)
            await sub.subscribe_data_change([nodes["Frame"], nodes["Heartbeat"]])
            before = await read_all(nodes)
            result = await asyncio.get_running_loop().run_in_executor(None, pipeline.run)
            frame_id = str(nodes["Frame"].nodeid)
            await until(lambda: _last_is(changes, frame_id, 79), "the subscription to see the last frame")
            beat = await nodes["Heartbeat"].read_value()
            await until(lambda: _greater(nodes["Heartbeat"], beat), "a heartbeat")
            return before, await read_all(nodes), result, changes.values[str(nodes["Heartbeat"].nodeid)]

    try:
        before, after, result, beats = asyncio.run(scenario())
    finally:
        sink.close()
        engine.close()
        log.close()
    f = result.summary["frames"]
    rows = read_log(tmp_path / "log.jsonl")
    last = rows[-1]
    assert before["Frame"] == -1 and before["Running"] is True and before["Threshold"] == context.run["threshold"]
    assert (after["Inspected"], after["NG"], after["Errored"], after["Dropped"]) == \
        (f["inspected"], f["ng"], f["errored"], f["dropped"]) and f["inspected"] + f["errored"] == 80
    assert 0 < after["NG"] < 80
    assert after["Frame"] == last["frame"] == 79 and after["Verdict"] == last["verdict"]
    assert after["Score"] == pytest.approx(last["score"]) and after["ScoreNorm"] == pytest.approx(last["score_norm"])
    assert after["Regions"] == len(last["regions"]) and json.loads(after["LastRecord"])["frame"] == 79
    assert after["CaptureTime"].timestamp() == pytest.approx(last["t_capture"], abs=1e-3)
    assert after["Model"] == str(bundle) and after["Detector"] == "ssim_ae" and after["Certified"] is True
    assert after["CertificateStatus"].startswith("certified") and beats == sorted(beats)
    s = sink.summary()
    assert s["sent"] == s["offered"] == 80 and s["unsent"] == 0 and s["latency_ms"]["n"] == 80


async def _last_is(changes: Changes, node_id: str, value: int) -> bool:
    seen = changes.values.get(node_id)
    return bool(seen) and seen[-1] == value


async def _greater(node, value) -> bool:
    return await node.read_value() > value


def client_identity(tmp_path: Path, name: str) -> tuple[Path, Path, str]:
    app_uri = f"urn:edgead:test:{name}"
    cert, key = sec.ensure_certificate(tmp_path / name, name, app_uri, socket.gethostname(), lambda m: None,
                                       server=False)
    return cert, key, app_uri


async def try_login(url: str, identity: tuple[Path, Path, str] | None, user: str | None = None,
                    password: str | None = None, user_cert: tuple[Path, Path, str] | None = None) -> str:
    client = Client(url, timeout=10)
    if identity is not None:
        client.application_uri = identity[2]
        await client.set_security(SecurityPolicyBasic256Sha256, str(identity[0]), str(identity[1]))
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    if user_cert is not None:
        await client.load_client_certificate(str(user_cert[0]))
        await client.load_private_key(user_cert[1])
    try:
        async with client:
            nodes = await station_nodes(client, "secure")
            return str(await nodes["Model"].read_value())
    except (ua.UaError, OSError, asyncio.TimeoutError, TimeoutError) as err:
        return f"refused: {type(err).__name__}"


def test_security_on_refuses_anonymous_and_untrusted_clients(bundle, tmp_path):
    trusted, stranger = client_identity(tmp_path, "scada"), client_identity(tmp_path, "stranger")
    (tmp_path / "trust").mkdir()
    (tmp_path / "trust" / "scada.der").write_bytes(trusted[0].read_bytes())
    creds = tmp_path / "opcua.json"
    creds.write_text(json.dumps({"username": "plc", "password": "pw1"}))
    creds.chmod(0o600)
    port = free_port()
    url = f"opc.tcp://{LOOPBACK}:{port}/edgead"
    context, notes = run_context(bundle)
    sink = open_sink(f"{url}?station=secure&security=basic256sha256&pki={tmp_path / 'pki'}&credentials={creds}"
                     f"&trust={tmp_path / 'trust'}", context)
    try:
        outcomes = asyncio.run(_logins(url, trusted, stranger))
    finally:
        sink.close()
    assert outcomes["no security"].startswith("refused")  # no None endpoint at all
    assert outcomes["anonymous"] == "refused: BadIdentityTokenRejected"
    assert outcomes["wrong password"] == "refused: BadUserAccessDenied"
    assert outcomes["untrusted client certificate"] == "refused: BadCertificateUntrusted"
    assert outcomes["password"] == outcomes["user certificate"] == str(bundle)
    made = list((tmp_path / "pki").iterdir())
    assert sorted(p.name for p in made) == ["edgead-secure_cert.der", "edgead-secure_key.pem"]
    assert any("self-signed certificate" in n for n in notes)
    # Kept, never overwritten: the clients trust this exact certificate.
    before = {p: p.read_bytes() for p in made}
    sec.ensure_certificate(tmp_path / "pki", "edgead-secure", "urn:edgead:secure", LOOPBACK, lambda m: None)
    assert {p: p.read_bytes() for p in made} == before


async def _logins(url, trusted, stranger) -> dict[str, str]:
    return {
        "no security": await try_login(url, None),
        "anonymous": await try_login(url, trusted),
        "wrong password": await try_login(url, trusted, "plc", "nope"),
        "untrusted client certificate": await try_login(url, stranger, "plc", "pw1"),
        "password": await try_login(url, trusted, "plc", "pw1"),
        "user certificate": await try_login(url, trusted, user_cert=trusted),
    }


def test_no_insecure_server_off_loopback(bundle, monkeypatch):
    monkeypatch.delenv("EDGEAD_OPCUA_USERNAME", raising=False)
    monkeypatch.delenv("EDGEAD_OPCUA_CREDENTIALS", raising=False)
    context, _ = run_context(bundle)
    with pytest.raises(SinkError, match="only on a loopback address"):
        open_sink("opc.tcp://0.0.0.0:4840?security=none", context)
    with pytest.raises(SinkError, match="nobody could log in"):
        open_sink("opc.tcp://0.0.0.0:4840", context)  # security on by default off loopback
