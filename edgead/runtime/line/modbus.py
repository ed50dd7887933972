"""``modbus://HOST:PORT``: a reject pulse per frame that is not OK, on a coil or a holding register
of a Modbus TCP server (a PLC), with pymodbus: what a simple reject gate reads.

    modbus://plc:502?unit=1&coil=0&pulse_ms=50

Options (besides the common ones in :mod:`edgead.runtime.line`):
    unit=N          Modbus unit (device) id, default 1
    coil=N          the coil to pulse (default 0), or
    register=N      a holding register instead: ``value`` (default 1) during the pulse, 0 otherwise
    pulse_ms=MS     how long the output stays raised (default 50)
    gap_ms=MS       how long it stays low before the next pulse (default: pulse_ms), so the PLC
                    sees every rising edge
    stale_ms=MS     a reject not raised within MS of its frame's verdict is not raised at all and
                    counted unsent/stale (default 1000; 0: never stale): after an outage, a pulse for
                    a part long past the gate would reject the wrong part
    timeout_s=S     per request (default 1)

Every frame that is not OK pulses: NG, and ERROR too (a part that was not inspected is never
passed). ``sent`` counts pulses whose rising write the server acknowledged; the latency is to that
acknowledgement. One pulse takes pulse_ms + gap_ms, so a faster run of rejects queues (bounded).
After a (re)connect the output is first written low, so a pulse cut by a lost link never stays up.
While idle the link is checked every probe_s by reading the output back.
"""

from __future__ import annotations

import time

from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from edgead.runtime.line.outbox import LineSink, LinkError, Message, Outbox, OutboxOptions, not_ok
from edgead.runtime.line.uri import LineURI
from edgead.runtime.sinks import SinkContext, SinkError


def open_modbus_sink(uri: str, context: SinkContext) -> LineSink:
    u = LineURI.parse(uri, default_port=502)
    if "coil" in u.query and "register" in u.query:
        raise SinkError(f"{uri}: give coil=N or register=N, not both")
    register = u.integer("register", None, 0, 65535)
    coil = u.integer("coil", 0, 0, 65535)
    pulse_ms = u.number("pulse_ms", 50.0, minimum=0.1)
    transport = ModbusTransport(
        u.host, u.port, unit=int(u.integer("unit", 1, 0, 255)), coil=None if register is not None else coil,
        register=register, value=int(u.integer("value", 1, 1, 65535)), pulse_s=pulse_ms / 1000.0,
        gap_s=u.number("gap_ms", pulse_ms) / 1000.0, timeout_s=u.number("timeout_s", 1.0, minimum=0.01))
    options = OutboxOptions.from_uri(u, capacity=64, max_age_ms=1000.0)
    u.check_unknown()
    return LineSink(uri, transport, options, context.say, select=not_ok)


class ModbusTransport:
    name = "modbus"

    def __init__(self, host: str, port: int, unit: int, coil: int | None, register: int | None, value: int,
                 pulse_s: float, gap_s: float, timeout_s: float) -> None:
        self.host, self.port, self.unit = host, port, unit
        self.coil, self.register, self.value = coil, register, value
        self.pulse_s, self.gap_s = pulse_s, gap_s
        self.client = ModbusTcpClient(host, port=port, timeout=timeout_s, retries=0)
        self._up = False
        self._low_until = 0.0  # monotonic time the output may rise again

    @property
    def target(self) -> str:
        return f"coil {self.coil}" if self.coil is not None else f"holding register {self.register}"

    def bind(self, outbox: Outbox) -> None:
        pass

    def _write(self, high: bool) -> None:
        try:
            if self.coil is not None:
                reply = self.client.write_coil(self.coil, high, device_id=self.unit)
            else:
                reply = self.client.write_register(self.register, self.value if high else 0, device_id=self.unit)
        except (ModbusException, OSError) as err:
            self._up = False
            raise LinkError(f"{self.host}:{self.port} unit {self.unit}: {err}") from err
        if reply.isError():  # the server answered with an exception: wrong address, unit...
            self._up = False
            raise LinkError(f"{self.host}:{self.port} unit {self.unit} refused the write to {self.target}: {reply}")

    def connect(self) -> None:
        self.client.close()
        if not self.client.connect():
            raise LinkError(f"{self.host}:{self.port}: cannot connect")
        self._up = True
        self._write(False)  # a pulse cut by the last loss must not stay raised

    def send(self, message: Message) -> float | None:
        wait = self._low_until - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self._write(True)
        raised = time.monotonic()
        time.sleep(self.pulse_s)
        try:
            self._write(False)
        except LinkError:
            pass  # the pulse was delivered; the link is down now, and the reconnect writes it low
        self._low_until = time.monotonic() + self.gap_s
        return raised

    def probe(self) -> None:
        try:
            if self.coil is not None:
                reply = self.client.read_coils(self.coil, count=1, device_id=self.unit)
            else:
                reply = self.client.read_holding_registers(self.register, count=1, device_id=self.unit)
        except (ModbusException, OSError) as err:
            self._up = False
            raise LinkError(f"{self.host}:{self.port}: {err}") from err
        if reply.isError():
            self._up = False
            raise LinkError(f"{self.host}:{self.port}: reading {self.target} back failed: {reply}")

    def is_up(self) -> bool:
        return self._up

    def disconnect(self) -> None:
        self._up = False
        self.client.close()
