"""Line integration: verdicts to the PLC and the plant (extra ``line``).

    mqtt://HOST:PORT/TOPIC[?on=all|ng&qos=1&station=NAME&tls=1&ca=FILE&credentials=FILE]
    opc.tcp://HOST:PORT[/PATH][?security=auto|none|basic256sha256&cert=FILE&key=FILE&trust=DIR]
    modbus://HOST:PORT[?unit=1&coil=0|register=N&pulse_ms=50&gap_ms=50&stale_ms=1000]

Options every line sink takes: ``queue=N`` (bound of undelivered verdicts; beyond it the oldest
is counted unsent), ``stale_ms=MS`` (a verdict older than that is not sent, counted unsent;
default 0 = never, Modbus 1000), ``reconnect_max=S`` (cap of the reconnect backoff, from 0.1 s
doubling; default 5), ``flush_s=S`` (how long the end of a run waits for the queue to drain;
default 2), ``wait_s=S`` (how long opening waits for the first connection; default 2),
``probe_s=S`` (idle link check; default 1), ``fail_safe=1|0`` (override ``--fail-safe-output``
for this sink). Unknown options are refused. Credentials never go in the URI.

Each sink is one :class:`edgead.runtime.line.outbox.LineSink` around a transport: the pipeline's
sink thread only enqueues; the outbox's own thread connects, sends, reconnects with backoff and
counts. Nothing here is imported unless an output URI uses one of these schemes.
"""
