"""The consumers of the benchmark suite, one per library; each runs in a child process.

usage (by benchmarks/run.py): STRICTCONSUME_BENCH_URL=amqp://... \
    python benchmarks/_consumers.py LIBRARY WORKLOAD QUEUE PREFETCH N [--latency]

Every consumer drains N messages from an existing queue (declared passively, or not
at all), with manual acks (but ``broker-ceiling``), calling the same :class:`Probe` at
the start and at the end of every handler, and prints one JSON line: ``elapsed`` (s,
from subscribing until its connection is closed), ``handlers`` (s, until the N-th
handler ended), ``cpu`` (s of this process over ``elapsed``), ``peak_rss_mb`` (VmHWM)
and, with ``--latency``, ``delays_us`` (handler start minus the publish time that the
message carries in its body, one per message). With ``--latency`` the consumer prints
``ready`` on a line of its own once it is subscribed, and the parent starts publishing.

The workload is what a handler does between the probe's start and its ack: ``noop``
nothing; ``sleep10ms`` awaits a 10 ms sleep (``anyio.sleep``, ``asyncio.sleep``; pika's
blocking consumer can only ``time.sleep``, one message at a time).

Exit codes: 0 done, 3 an operator closed the connection (CONNECTION_FORCED: the run is
to be done again), anything else a failure.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

#: The exit code of a consumer whose connection was closed by an operator.
DISTURBED_EXIT = 3
#: The handler timeout the App is given (the design asks every consumer to set one).
HANDLER_TIMEOUT = 60.0
SLEEP = 0.01
#: The environment variable that carries the broker's URL to the child.
URL_VARIABLE = "STRICTCONSUME_BENCH_URL"
WORKLOADS = ("noop", "sleep10ms")


class BenchmarkError(Exception):
    """A run that did not do the job: the benchmark stops."""


class Disturbed(BenchmarkError):
    """An operator closed a connection of the run (CONNECTION_FORCED): a shared
    broker's test suite calling ``rabbitmqctl close_all_connections``, say."""


def forced_close(exc: BaseException) -> bool:
    """True when ``exc`` is, or was caused by, a connection.close 320 CONNECTION_FORCED."""
    from strictconsume.amqp import ConnectionClosed

    stack: list[BaseException] = [exc]
    seen: set[int] = set()
    while stack:
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, Disturbed):
            return True
        if isinstance(error, ConnectionClosed) and error.reply_code == 320:
            return True
        if "CONNECTION_FORCED" in str(error):  # aiormq's, aio-pika's and pika's errors
            return True
        if isinstance(error, BaseExceptionGroup):
            stack.extend(error.exceptions)
        stack.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return False


def now() -> tuple[float, float]:
    """Wall-clock and CPU time of this process (every thread), in seconds."""
    return time.perf_counter(), time.process_time()


def publish_stamp() -> bytes:
    """A 128-byte body carrying the time it is made (CLOCK_MONOTONIC, ns, which every
    process of the machine shares), for the latency runs."""
    return str(time.monotonic_ns()).encode().ljust(128, b"x")


class Probe:
    """What every handler does first and last, alike for every library: count, note
    the time of the N-th end, and (latency runs) the delay since the publish."""

    def __init__(self, n: int, latency: bool) -> None:
        self.n = n
        self.latency = latency
        self.started = 0
        self.finished = 0
        self.first_start = (math.inf, math.inf)
        self.last_done = math.inf
        self.delays_ns: list[int] = []

    def start(self, body: bytes) -> None:
        if self.started == 0:
            self.first_start = now()
        self.started += 1
        if self.latency:
            self.delays_ns.append(time.monotonic_ns() - int(body[:20].rstrip(b"x")))

    def finish(self) -> bool:
        """Count a handled message; True for the N-th."""
        self.finished += 1
        if self.finished == self.n:
            self.last_done = time.perf_counter()
            return True
        return False

    def result(self, start: tuple[float, float]) -> dict[str, Any]:
        if self.finished != self.n:
            raise BenchmarkError(f"handled {self.finished} of {self.n} messages")
        wall, cpu = now()
        result: dict[str, Any] = {
            "elapsed": wall - start[0],
            "handlers": self.last_done - start[0],
            "cpu": cpu - start[1],
        }
        if self.latency:
            result["delays_us"] = [d / 1000 for d in self.delays_ns]
        return result


def ready(probe: Probe) -> None:
    """Tell the parent, in a latency run, that the consumer is subscribed."""
    if probe.latency:
        print("ready", flush=True)


# -- the consumers ----------------------------------------------------------------------


def consume_strictconsume(
    url: str, queue: str, prefetch: int, workload: str, probe: Probe, backend: str
) -> dict[str, Any]:
    """strictconsume, on trio or asyncio: an :class:`strictconsume.App` with one
    ``@app.consumer(queue, prefetch=..., timeout=...)`` (the README's first example; the
    App acks when the handler returns). The block of ``app.running()`` waits for the
    N-th handler and leaves, which stops the App gracefully (intake cancelled, the last
    acks flushed, connection closed)."""
    import anyio

    import strictconsume as sc

    app = sc.App(url)
    done: anyio.Event | None = None
    sleep = workload == "sleep10ms"

    @app.consumer(queue, prefetch=prefetch, timeout=HANDLER_TIMEOUT)
    async def handle(msg: sc.Message) -> None:
        probe.start(msg.body)
        if sleep:
            await anyio.sleep(SLEEP)
        if probe.finish():
            assert done is not None
            done.set()

    # The App resolves annotations in the module's globals, where the local import
    # ``sc`` is not: give it the class itself.
    handle.__annotations__["msg"] = sc.Message

    async def main() -> dict[str, Any]:
        nonlocal done
        done = anyio.Event()
        async with app.running():
            entered = now()
            ready(probe)
            await done.wait()
            if app.reconnects:  # read while running: a stopped App reports 0
                raise Disturbed(f"the App reconnected {app.reconnects} time(s)")
        return probe.result(min(entered, probe.first_start))

    result = anyio.run(main, backend=backend)
    acked = app.outcomes[queue, "ack"]
    if acked != probe.n or sum(app.outcomes.values()) != probe.n:
        raise BenchmarkError(f"acked {acked} of {probe.n} (outcomes: {dict(app.outcomes)})")
    return result


def consume_aio_pika(
    url: str, queue_name: str, prefetch: int, workload: str, probe: Probe, iterator: bool
) -> dict[str, Any]:
    """aio-pika 9/10, its documentation's consumer with manual acks:
    ``connect_robust``, ``channel.set_qos(prefetch_count)`` and
    ``async with message.process()`` (acks on leaving). ``aio-pika``:
    ``queue.consume(callback)``, where aio-pika runs each callback as a task of its own,
    so that handlers run concurrently (up to the prefetch). ``aio-pika-iterator``:
    ``async with queue.iterator()`` (the README's consumer: one message after the
    other, so that a sleeping handler blocks the next)."""
    import asyncio

    import aio_pika
    import aio_pika.abc

    sleep = workload == "sleep10ms"

    async def main() -> dict[str, Any]:
        connection = await aio_pika.connect_robust(url)
        reconnects = 0

        def on_reconnect(*_: object) -> None:
            nonlocal reconnects
            reconnects += 1

        connection.reconnect_callbacks.add(on_reconnect)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        if iterator:
            start = now()
            async with queue.iterator() as messages:
                ready(probe)
                async for message in messages:
                    async with message.process():
                        probe.start(message.body)
                        if sleep:
                            await asyncio.sleep(SLEEP)
                    if probe.finish():
                        break
        else:
            done = asyncio.Event()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    probe.start(message.body)
                    if sleep:
                        await asyncio.sleep(SLEEP)
                if probe.finish():
                    done.set()

            start = now()
            tag = await queue.consume(on_message)
            ready(probe)
            await done.wait()
            await queue.cancel(tag)
        await connection.close()
        if reconnects:
            raise Disturbed(f"aio-pika reconnected {reconnects} time(s)")
        return probe.result(start)

    return asyncio.run(main())


def consume_aiormq(
    url: str, queue: str, prefetch: int, workload: str, probe: Probe
) -> dict[str, Any]:
    """aiormq 6/7, its README's work-queue worker: ``async with aiormq.connect(url)``,
    ``channel.basic_qos(prefetch_count=...)``, ``channel.basic_consume(queue,
    on_message)`` (``no_ack=False``, the default) and
    ``await message.channel.basic_ack(message.delivery.delivery_tag)`` at the end of the
    callback. aiormq runs each callback as a task of its own, so handlers run
    concurrently (up to the prefetch)."""
    import asyncio

    import aiormq
    import aiormq.abc
    import pamqp.commands

    sleep = workload == "sleep10ms"

    async def main() -> dict[str, Any]:
        done = asyncio.Event()
        async with aiormq.connect(url) as connection:
            channel = await connection.channel()
            await channel.basic_qos(prefetch_count=prefetch)

            async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
                probe.start(message.body)
                if sleep:
                    await asyncio.sleep(SLEEP)
                deliver = message.delivery
                assert isinstance(deliver, pamqp.commands.Basic.Deliver)
                tag = deliver.delivery_tag
                assert tag is not None
                await message.channel.basic_ack(tag)
                if probe.finish():
                    done.set()

            start = now()
            await channel.basic_consume(queue, on_message, no_ack=False)
            ready(probe)
            # A connection closed under us (by an operator, say) ends the wait too.
            waiter = asyncio.ensure_future(done.wait())
            closing = asyncio.ensure_future(connection.closing)
            await asyncio.wait([waiter, closing], return_when=asyncio.FIRST_COMPLETED)
            if not done.is_set():
                waiter.cancel()
                await closing  # raises the close reason
                raise BenchmarkError("aiormq's connection closed before the last message")
            closing.cancel()
        return probe.result(start)

    return asyncio.run(main())


def consume_pika(
    url: str, queue: str, prefetch: int, workload: str, probe: Probe, no_ack: bool = False
) -> dict[str, Any]:
    """pika 1.x, its documentation's blocking consumer (``BlockingConnection``,
    ``channel.basic_qos(prefetch_count=...)``, ``channel.basic_consume(queue,
    on_message_callback)``, ``channel.start_consuming()``, and
    ``ch.basic_ack(delivery_tag=method.delivery_tag)`` in the callback). Callbacks run
    one after the other on the connection's thread, so the 10 ms workload is a
    ``time.sleep(0.01)`` per message: at most 100 messages per second at any prefetch
    (pika's threaded example, which hands each message to a thread and acks through
    ``add_callback_threadsafe``, is not measured).

    ``no_ack=True`` is the broker's ceiling: the same consumer with ``auto_ack=True``
    and no handler work (the broker does not wait for acks, and ignores the qos)."""
    import pika

    sleep = workload == "sleep10ms"
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=prefetch)

    def on_message(ch: Any, method: Any, _properties: Any, body: bytes) -> None:
        probe.start(body)
        if sleep:
            time.sleep(SLEEP)
        if not no_ack:
            ch.basic_ack(delivery_tag=method.delivery_tag)
        if probe.finish():
            ch.stop_consuming()

    start = now()
    channel.basic_consume(queue, on_message, auto_ack=no_ack)
    ready(probe)
    channel.start_consuming()
    connection.close()
    return probe.result(start)


def consume_faststream(
    url: str, queue: str, prefetch: int, workload: str, probe: Probe
) -> dict[str, Any]:
    """FastStream (0.6/0.7, on aio-pika), its documentation's subscriber with manual
    acks: ``RabbitBroker(url)``, ``@broker.subscriber(RabbitQueue(queue, declare=False),
    channel=Channel(prefetch_count=...), ack_policy=AckPolicy.MANUAL)`` and
    ``await msg.ack()`` in the handler (``msg: RabbitMessage``, FastStream's annotated
    context parameter). FastStream consumes with aio-pika's ``queue.consume(callback)``,
    so handlers run concurrently (up to the prefetch). Run programmatically (``async
    with broker`` + ``await broker.start()``, as its docs' "running without the CLI"),
    not through ``faststream run``. ``logger=None``: by default FastStream logs two
    INFO lines per message (received, processed), which no other library here does.
    (FastDepends resolves the ``RabbitMessage`` context parameter, which the manual ack
    needs, in anyio's worker thread: one thread hand-off per message.)"""
    import asyncio

    from faststream import AckPolicy
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
    from faststream.rabbit.annotations import RabbitMessage

    sleep = workload == "sleep10ms"
    done = asyncio.Event()
    broker = RabbitBroker(url, logger=None)

    async def handle(body: bytes, msg: RabbitMessage) -> None:
        probe.start(body)
        if sleep:
            await asyncio.sleep(SLEEP)
        await msg.ack()
        if probe.finish():
            done.set()

    # The docs' ``@broker.subscriber(...)`` decorator, called as a function: mypy
    # refuses an untyped decorator where faststream is not installed (CI).
    broker.subscriber(
        RabbitQueue(queue, declare=False),
        channel=Channel(prefetch_count=prefetch),
        ack_policy=AckPolicy.MANUAL,
    )(handle)

    async def main() -> dict[str, Any]:
        async with broker:
            start = now()
            await broker.start()
            ready(probe)
            await done.wait()
        return probe.result(start)

    return asyncio.run(main())


# -- the child process ------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over an exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


Consumer = Callable[[str, str, int, str, Probe], dict[str, Any]]


def _strictconsume(backend: str) -> Consumer:
    return lambda u, q, p, w, probe: consume_strictconsume(u, q, p, w, probe, backend)


def _aio_pika(iterator: bool) -> Consumer:
    return lambda u, q, p, w, probe: consume_aio_pika(u, q, p, w, probe, iterator)


def _pika(no_ack: bool) -> Consumer:
    return lambda u, q, p, w, probe: consume_pika(u, q, p, w, probe, no_ack)


#: Every library the suite knows, by the name its rows carry.
CONSUMERS: dict[str, Consumer] = {
    "strictconsume-trio": _strictconsume("trio"),
    "strictconsume-asyncio": _strictconsume("asyncio"),
    "aio-pika": _aio_pika(iterator=False),
    "aio-pika-iterator": _aio_pika(iterator=True),
    "aiormq": consume_aiormq,
    "pika": _pika(no_ack=False),
    "faststream": consume_faststream,
    "broker-ceiling": _pika(no_ack=True),
}


def main(argv: list[str]) -> None:
    latency = "--latency" in argv
    args = [a for a in argv if a != "--latency"]
    if len(args) != 5 or args[0] not in CONSUMERS or args[1] not in WORKLOADS:
        raise SystemExit(__doc__.split("\n\n")[1])
    library, workload, queue, prefetch, n = args
    probe = Probe(int(n), latency)
    try:
        url = os.environ[URL_VARIABLE]
        result = CONSUMERS[library](url, queue, int(prefetch), workload, probe)
    except Exception as exc:
        if not forced_close(exc):
            raise
        print(f"disturbed: {exc}", file=sys.stderr)
        raise SystemExit(DISTURBED_EXIT) from exc
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
