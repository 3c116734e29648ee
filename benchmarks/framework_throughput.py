"""Consume throughput of the strictconsume framework (an App) against aio-pika.

usage: .venv/bin/python benchmarks/framework_throughput.py [--messages N] [--repeat R]
                                                           [--prefetch 1,10,100,1000]
                                                           [--quick] [--json PATH]

For every prefetch value and repetition, interleaved (every library once per
repetition, in an order that rotates from one repetition to the next, so that a noisy
neighbour or the broker's housekeeping hurts every library alike): fill one durable
queue with N persistent messages of 128 bytes (strictconsume.amqp, publisher
confirms, then check that the broker counts exactly N), then drain it with a no-op
handler and one manual ack per message, with each of:

- ``strictconsume-trio`` / ``strictconsume-asyncio``: an :class:`strictconsume.App`
  with one ``@app.consumer`` whose handler counts messages and sets an event at N;
  the block of ``app.running()`` waits for the event and leaves, which stops the App
  gracefully (intake cancelled, the last acks flushed, connection closed).
- ``aio-pika``: ``channel.set_qos(prefetch_count)``, ``queue.consume(callback)``
  (aio-pika runs each callback as a task of its own, so handlers run concurrently,
  as the framework's do) and ``async with message.process()``, which acks.
- ``aio-pika-iterator``: the same with ``async with queue.iterator()`` (the pattern
  of aio-pika's README; messages are handled one after the other).

The queue is declared once, the framework's way (an App starts on it and stops), so
it carries the framework's dead-letter arguments and has its ``.retry.*`` and
``.dlq`` queues; aio-pika declares it passively.

The clock starts when the consumer is subscribed (strictconsume: when the block of
``app.running()`` is entered, or at the first handler call if that came first;
aio-pika: just before ``basic.consume``) and stops once the consumer's connection is
closed, which the broker answers only after it has processed every ack sent before.
After every run the queue is checked: no consumer left, no message ready, none
unacknowledged (``rabbitmqctl list_queues`` on the private broker), nothing
dead-lettered or retried. A run that fails a check stops the benchmark; a run whose
connection an operator closed (320 CONNECTION_FORCED, as a test suite sharing the
broker does with ``rabbitmqctl close_all_connections``) is done again, twice at most,
and said so.

Besides messages per second it reports the consumer process's CPU time per message
over the same interval, which a busy neighbour on a shared machine disturbs less than
the wall clock. ``--quick`` (2000 messages, one repetition, no JSON unless --json is
given) checks that everything works. The JSON is a list of rows: library, workload,
prefetch, msgs_per_s (median), min, max, and the runs, CPU time, the time from the
last handler to the stopped consumer, and peak memory.

Each consumer runs in its own process. The broker is the one in STRICTCONSUME_URL /
AMQP_URL, or the private node of scripts/dev-broker (started if needed). Figures are
machine-dependent: compare the libraries of one run as ratios, never absolute numbers
across machines.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from _broker import DEV_BROKER, REPO, broker_url

T = TypeVar("T")

RESULTS = REPO / "benchmarks" / "results" / "framework_throughput.json"
LIBRARIES = ("strictconsume-trio", "strictconsume-asyncio", "aio-pika", "aio-pika-iterator")
OURS = ("strictconsume-trio", "strictconsume-asyncio")
PEERS = ("aio-pika", "aio-pika-iterator")
WORKLOAD = "noop"
BODY = b"x" * 128
#: Publishes in flight at once while filling (each awaits its confirm).
FILL_BATCH = 500
#: Seconds a consumer may take to drain the queue: this plus one per 200 messages.
CHILD_TIMEOUT = 60.0
#: The exit code of a consumer whose connection was closed by an operator.
DISTURBED_EXIT = 3
#: Attempts at one run (or one setup step) whose connection an operator closed.
MAX_ATTEMPTS = 3
#: The handler timeout the App is given (the design asks every consumer to set one).
HANDLER_TIMEOUT = 60.0


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
        if "CONNECTION_FORCED" in str(error):  # aiormq's errors
            return True
        if isinstance(error, BaseExceptionGroup):
            stack.extend(error.exceptions)
        stack.extend(e for e in (error.__cause__, error.__context__) if e is not None)
    return False


def retried(what: str, action: Callable[[], T], notes: list[str]) -> T:
    """``action()``, again (at most :data:`MAX_ATTEMPTS` in all) when an operator
    closed its connection; any other error propagates at once."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == MAX_ATTEMPTS or not forced_close(exc):
                raise
            notes.append(f"{what}: a connection was closed by an operator; done again")
            print(f"  {notes[-1]}", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def private_broker() -> bool:
    """True when the broker is scripts/dev-broker's node, which rabbitmqctl reaches."""
    return not (os.environ.get("STRICTCONSUME_URL") or os.environ.get("AMQP_URL"))


def now() -> tuple[float, float]:
    """Wall-clock and CPU time of this process (every thread), in seconds."""
    return time.perf_counter(), time.process_time()


def measured(start: tuple[float, float], last_done: float) -> dict[str, float]:
    wall, cpu = now()
    return {"elapsed": wall - start[0], "handlers": last_done - start[0], "cpu": cpu - start[1]}


def side_queues(queue: str) -> list[str]:
    """The retry and dead-letter queues the framework declares beside ``queue``."""
    from strictconsume import Retry
    from strictconsume._retry import dead_letter_queue_name, retry_queue_name

    return [retry_queue_name(queue, d) for d in sorted(set(Retry().delays))] + [
        dead_letter_queue_name(queue)
    ]


# -- the consumers (each runs in a child process) -----------------------------------


def consume_strictconsume(
    url: str, queue: str, prefetch: int, n: int, backend: str
) -> dict[str, float]:
    import anyio

    import strictconsume as sc

    app = sc.App(url)
    count = 0
    first_call = (math.inf, math.inf)
    last_done = math.inf
    done: anyio.Event | None = None

    @app.consumer(queue, prefetch=prefetch, timeout=HANDLER_TIMEOUT)
    async def handle(msg: sc.Message) -> None:
        nonlocal count, first_call, last_done
        if count == 0:
            first_call = now()
        count += 1
        if count == n:
            last_done = time.perf_counter()
            assert done is not None
            done.set()

    async def main() -> dict[str, float]:
        nonlocal done
        done = anyio.Event()
        async with app.running():
            entered = now()
            await done.wait()
            if app.reconnects:  # read while running: a stopped App reports 0
                raise Disturbed(f"the App reconnected {app.reconnects} time(s)")
        return measured(min(entered, first_call), last_done)

    result = anyio.run(main, backend=backend)
    acked = app.outcomes[queue, "ack"]
    if count != n or acked != n or sum(app.outcomes.values()) != n:
        raise BenchmarkError(
            f"handled {count}, acked {acked} of {n} (outcomes: {dict(app.outcomes)})"
        )
    return result


def consume_aio_pika(
    url: str, queue_name: str, prefetch: int, n: int, iterator: bool
) -> dict[str, float]:
    import asyncio

    import aio_pika
    import aio_pika.abc

    async def main() -> dict[str, float]:
        connection = await aio_pika.connect_robust(url)
        reconnects = 0

        def on_reconnect(*_: object) -> None:
            nonlocal reconnects
            reconnects += 1

        connection.reconnect_callbacks.add(on_reconnect)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(queue_name, passive=True)
        count = 0
        if iterator:
            start = now()
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        pass
                    count += 1
                    if count == n:
                        break
            last_done = time.perf_counter()
        else:
            done = asyncio.Event()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal count
                async with message.process():
                    pass
                count += 1
                if count == n:
                    done.set()

            start = now()
            tag = await queue.consume(on_message)
            await done.wait()
            last_done = time.perf_counter()
            await queue.cancel(tag)
        await connection.close()
        result = measured(start, last_done)
        if reconnects:
            raise Disturbed(f"aio-pika reconnected {reconnects} time(s)")
        if count != n:
            raise BenchmarkError(f"handled {count} of {n}")
        return result

    return asyncio.run(main())


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over an exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(library: str, url: str, queue: str, prefetch: int, n: int) -> None:
    try:
        if library == "strictconsume-trio":
            result = consume_strictconsume(url, queue, prefetch, n, "trio")
        elif library == "strictconsume-asyncio":
            result = consume_strictconsume(url, queue, prefetch, n, "asyncio")
        elif library == "aio-pika":
            result = consume_aio_pika(url, queue, prefetch, n, iterator=False)
        elif library == "aio-pika-iterator":
            result = consume_aio_pika(url, queue, prefetch, n, iterator=True)
        else:
            raise SystemExit(f"unknown library {library!r}")
    except Exception as exc:
        if not forced_close(exc):
            raise
        print(f"disturbed: {exc}", file=sys.stderr)
        raise SystemExit(DISTURBED_EXIT) from exc
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# -- the parent: declare, fill, run, check ----------------------------------------------


def declare(url: str, queue: str) -> None:
    """Declare the queue, its retry queues and its dead-letter queue as the App does:
    by starting an App on it (the queue is empty then) and stopping it."""
    import anyio

    import strictconsume as sc

    app = sc.App(url)

    @app.consumer(queue, timeout=HANDLER_TIMEOUT)
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("the queue was to be empty")

    async def main() -> None:
        async with app.running():
            pass

    anyio.run(main, backend="trio")


def fill(url: str, queue: str, n: int) -> None:
    """Publish ``n`` persistent 128-byte messages with confirms; check the count."""
    import anyio

    from strictconsume.amqp import Properties, connect

    async def main() -> None:
        async with connect(url) as conn:
            async with conn.channel() as ch:
                ok = await ch.queue_declare(queue, passive=True)
                if ok.message_count or ok.consumer_count:
                    await ch.queue_purge(queue)  # left over by an aborted run
            async with conn.channel(confirms=True) as ch:
                publish = functools.partial(
                    ch.publish, BODY, routing_key=queue, properties=Properties(delivery_mode=2)
                )
                sent = 0
                while sent < n:
                    batch = min(FILL_BATCH, n - sent)
                    async with anyio.create_task_group() as tg:
                        for _ in range(batch):
                            tg.start_soon(publish)
                    sent += batch
                ok = await ch.queue_declare(queue, passive=True)
                if ok.message_count != n:
                    raise BenchmarkError(
                        f"filled {n} messages (all confirmed) but the broker counts "
                        f"{ok.message_count} in {queue!r}"
                    )

    anyio.run(main, backend="trio")


def check_drained(url: str, queue: str) -> None:
    """Fail unless every message of ``queue`` was acked: no consumer, none ready, none
    unacknowledged, nothing in the retry and dead-letter queues."""
    import anyio

    from strictconsume.amqp import connect

    async def main() -> None:
        async with connect(url) as conn, conn.channel() as ch:
            deadline = time.monotonic() + 10
            while True:
                ok = await ch.queue_declare(queue, passive=True)
                if ok.consumer_count == 0:
                    break
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"{queue!r} still has {ok.consumer_count} consumer(s)")
                await anyio.sleep(0.02)
            # Once the consumer is gone the broker has requeued whatever it had left
            # unacked, so a message ready now is an ack that never reached the broker.
            if ok.message_count:
                raise BenchmarkError(
                    f"{ok.message_count} message(s) back in {queue!r} after the consumer "
                    "stopped: acks that did not reach the broker"
                )
            for name in side_queues(queue):
                side = await ch.queue_declare(name, passive=True)
                if side.message_count:
                    raise BenchmarkError(f"{side.message_count} message(s) in {name!r}")

    anyio.run(main, backend="trio")
    if not private_broker():
        return  # rabbitmqctl does not reach an outside broker: the above must do
    out = subprocess.run(
        [
            sys.executable,
            str(DEV_BROKER),
            "ctl",
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    for line in out.stdout.splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            if fields[1:] != ["0", "0", "0"]:
                raise BenchmarkError(
                    f"rabbitmqctl: {queue!r} has ready/unacked/consumers {fields[1:]}, "
                    "expected 0/0/0"
                )
            return
    raise BenchmarkError(f"rabbitmqctl list_queues did not list {queue!r}:\n{out.stdout}")


def delete(url: str, queue: str) -> None:
    import anyio

    from strictconsume.amqp import connect

    async def main() -> None:
        async with connect(url) as conn, conn.channel() as ch:
            for name in [queue, *side_queues(queue)]:
                await ch.queue_delete(name)

    anyio.run(main, backend="trio")


def run_child(library: str, queue: str, prefetch: int, n: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", library, queue, str(prefetch), str(n)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT + n / 200,
    )
    if out.returncode == DISTURBED_EXIT:
        raise Disturbed(out.stderr.strip().splitlines()[-1])
    if out.returncode != 0:
        raise BenchmarkError(
            f"{library} at prefetch {prefetch} failed (exit {out.returncode}):\n{out.stderr}"
        )
    data: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return data


def one_run(url: str, queue: str, library: str, prefetch: int, n: int) -> dict[str, float]:
    """Fill the queue, drain it with ``library`` in a child process, check it."""
    fill(url, queue, n)
    data = run_child(library, queue, prefetch, n)
    check_drained(url, queue)
    return data


def ratio_table(
    results: dict[tuple[str, int], list[float]], libraries: list[str], prefetches: list[int]
) -> list[str]:
    pairs = [
        (ours, peer) for ours in OURS for peer in PEERS if ours in libraries and peer in libraries
    ]
    if not pairs:
        return []
    lines = [
        "| prefetch | " + " | ".join(f"{ours} / {peer}" for ours, peer in pairs) + " |",
        "|" + "---|" * (len(pairs) + 1),
    ]
    for prefetch in prefetches:
        med = {lib: statistics.median(results[lib, prefetch]) for lib in libraries}
        cells = [f"{med[ours] / med[peer]:.2f}x" for ours, peer in pairs]
        lines.append(f"| {prefetch} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, help="messages per run (default 10000)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 3)")
    parser.add_argument("--prefetch", default="1,10,100,1000")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2000 messages, 1 repetition"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help=f"write the results here (default {RESULTS.relative_to(REPO)}; "
        "not written by --quick unless given)",
    )
    parser.add_argument("--child", nargs=4, metavar=("LIB", "QUEUE", "PREFETCH", "N"))
    ns = parser.parse_args()
    url = broker_url()
    if ns.child:
        lib, queue, prefetch, n = ns.child
        child(lib, url, queue, int(prefetch), int(n))
        return

    messages: int = ns.messages or (2000 if ns.quick else 10000)
    repeat: int = ns.repeat or (1 if ns.quick else 3)
    json_path: Path | None = ns.json or (None if ns.quick else RESULTS)
    prefetches = [int(p) for p in ns.prefetch.split(",")]
    libraries = ns.libraries.split(",")
    for lib in libraries:
        if lib not in LIBRARIES:
            parser.error(f"unknown library {lib!r} (known: {', '.join(LIBRARIES)})")
    queue = f"bench-framework-{uuid.uuid4().hex[:8]}"
    results: dict[tuple[str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    rss: dict[tuple[str, int], float] = {}
    teardown: dict[tuple[str, int], list[float]] = {}
    total = len(prefetches) * repeat * len(libraries)
    done = 0
    began = time.monotonic()
    notes: list[str] = []
    retried("declaring the queue", functools.partial(declare, url, queue), notes)
    try:
        for prefetch in prefetches:
            for rep in range(repeat):
                shift = rep % len(libraries)
                for lib in libraries[shift:] + libraries[:shift]:
                    data = retried(
                        f"{lib} at prefetch {prefetch}",
                        functools.partial(one_run, url, queue, lib, prefetch, messages),
                        notes,
                    )
                    rate = messages / data["elapsed"]
                    results.setdefault((lib, prefetch), []).append(rate)
                    teardown.setdefault((lib, prefetch), []).append(
                        data["elapsed"] - data["handlers"]
                    )
                    cpu.setdefault((lib, prefetch), []).append(1e6 * data["cpu"] / messages)
                    rss[lib, prefetch] = max(rss.get((lib, prefetch), 0.0), data["peak_rss_mb"])
                    done += 1
                    print(
                        f"[{done}/{total}] {lib:22} prefetch {prefetch:5}: {rate:9.0f} msg/s "
                        f"{cpu[lib, prefetch][-1]:5.0f} us CPU/msg "
                        f"(last handler to stopped: {1000 * teardown[lib, prefetch][-1]:.1f} ms)",
                        file=sys.stderr,
                        flush=True,
                    )
    except BenchmarkError as exc:
        raise SystemExit(f"benchmark failed: {exc}") from exc
    finally:
        retried("deleting the queue", functools.partial(delete, url, queue), notes)
    wall = time.monotonic() - began

    rows = []
    print(
        f"\n{WORKLOAD} handler, manual acks, {messages} messages of 128 bytes, "
        f"median of {repeat} (min-max), msg/s"
    )
    print("| prefetch | " + " | ".join(libraries) + " |")
    print("|" + "---|" * (len(libraries) + 1))
    for prefetch in prefetches:
        cells = []
        for lib in libraries:
            rates = results[lib, prefetch]
            med = statistics.median(rates)
            cells.append(f"{med:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})")
            rows.append(
                {
                    "library": lib,
                    "workload": WORKLOAD,
                    "prefetch": prefetch,
                    "msgs_per_s": med,
                    "min": min(rates),
                    "max": max(rates),
                    "runs": rates,
                    "messages": messages,
                    "cpu_us_per_msg": statistics.median(cpu[lib, prefetch]),
                    "teardown_ms": 1000 * statistics.median(teardown[lib, prefetch]),
                    "peak_rss_mb": rss[lib, prefetch],
                }
            )
        print(f"| {prefetch} | " + " | ".join(cells) + " |")
    ratios = ratio_table(results, libraries, prefetches)
    if ratios:
        print("\nratios of medians, measured in this run:")
        print("\n".join(ratios))
    print("\nCPU time of the consumer process per message (us, median; lower is better)")
    print("| prefetch | " + " | ".join(libraries) + " |")
    print("|" + "---|" * (len(libraries) + 1))
    for prefetch in prefetches:
        cells = [f"{statistics.median(cpu[lib, prefetch]):.0f}" for lib in libraries]
        print(f"| {prefetch} | " + " | ".join(cells) + " |")
    print(f"\n{total} runs in {wall:.0f} s (fill and checks included)")
    if notes:
        print(f"{len(notes)} step(s) done again after an operator closed a connection:")
        print("\n".join(f"  {note}" for note in notes))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
