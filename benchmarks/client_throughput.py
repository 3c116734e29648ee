"""Raw consume throughput of the AMQP client against its peers, with per-message acks.

usage: .venv/bin/python benchmarks/client_throughput.py [--messages N] [--repeat R]
                                                        [--prefetch 1,10,100,1000]

For every prefetch value and repetition, interleaved (so that a noisy neighbour hurts
every library alike): fill one queue with N messages of 128 bytes (pika, no confirms,
then wait until the broker counts them all), then consume them with manual acks, one
ack per message, with each of: strictconsume.amqp on trio, strictconsume.amqp on
asyncio, aiormq and pika (BlockingConnection). Each consumer runs in its own process
so that one library's imports and memory do not affect another. The clock runs from
the basic.consume call until the N-th message was acked.

Also measured, in this process and without a socket: the decode cost per delivered
message of the sans-IO core (basic.deliver + content header + a 128-byte body fed to
``ProtocolConnection.receive_data`` in 64 KiB reads).

The broker is the one in STRICTCONSUME_URL / AMQP_URL, or the private node of
scripts/dev-broker (started if needed). Figures are machine-dependent: compare the
libraries of one run as ratios, never absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from _broker import broker_url

LIBRARIES = ("strictconsume-trio", "strictconsume-asyncio", "aiormq", "pika")
BODY = b"x" * 128


# -- the consumers (each runs in a child process) -----------------------------------


def consume_strictconsume(url: str, queue: str, prefetch: int, n: int, backend: str) -> float:
    import anyio

    from strictconsume.amqp import connect

    async def main() -> float:
        async with connect(url) as conn, conn.channel() as ch:
            await ch.qos(prefetch)
            count = 0
            start = time.perf_counter()
            async with ch.consume(queue) as consumer:
                async for delivery in consumer:
                    await ch.ack(delivery.delivery_tag)
                    count += 1
                    if count == n:
                        break
            return time.perf_counter() - start

    return anyio.run(main, backend=backend)


def consume_aiormq(url: str, queue: str, prefetch: int, n: int) -> float:
    import asyncio

    import aiormq
    import aiormq.abc
    import pamqp.commands

    async def main() -> float:
        conn = await aiormq.connect(url)
        channel = await conn.channel()
        await channel.basic_qos(prefetch_count=prefetch)
        done = asyncio.Event()
        count = 0

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            nonlocal count
            deliver = message.delivery
            assert isinstance(deliver, pamqp.commands.Basic.Deliver)
            assert deliver.delivery_tag is not None
            await message.channel.basic_ack(deliver.delivery_tag)
            count += 1
            if count == n:
                done.set()

        start = time.perf_counter()
        await channel.basic_consume(queue, on_message, no_ack=False)
        await done.wait()
        elapsed = time.perf_counter() - start
        await conn.close()
        return elapsed

    return asyncio.run(main())


def consume_pika(url: str, queue: str, prefetch: int, n: int) -> float:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=prefetch)
    count = 0

    def on_message(ch: object, method: object, _props: object, _body: bytes) -> None:
        nonlocal count
        channel.basic_ack(method.delivery_tag)  # type: ignore[attr-defined]
        count += 1
        if count == n:
            channel.stop_consuming()

    start = time.perf_counter()
    channel.basic_consume(queue, on_message, auto_ack=False)
    channel.start_consuming()
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def child(library: str, url: str, queue: str, prefetch: int, n: int) -> None:
    import resource

    if library == "strictconsume-trio":
        elapsed = consume_strictconsume(url, queue, prefetch, n, "trio")
    elif library == "strictconsume-asyncio":
        elapsed = consume_strictconsume(url, queue, prefetch, n, "asyncio")
    elif library == "aiormq":
        elapsed = consume_aiormq(url, queue, prefetch, n)
    elif library == "pika":
        elapsed = consume_pika(url, queue, prefetch, n)
    else:
        raise SystemExit(f"unknown library {library!r}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"elapsed": elapsed, "peak_rss_mb": rss_mb}))


# -- the parent: fill, run, collect -----------------------------------------------------


def fill(
    url: str,
    queue: str,
    n: int,
    *,
    body: bytes = BODY,
    arguments: dict[str, Any] | None = None,
    content_type: str | None = None,
) -> None:
    """Declare ``queue`` (durable, with ``arguments``), purge it, and put ``n``
    persistent copies of ``body`` in it."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, arguments=arguments)
    channel.queue_purge(queue)
    props = pika.BasicProperties(delivery_mode=2, content_type=content_type)
    for _ in range(n):
        channel.basic_publish("", queue, body, props)
    deadline = time.monotonic() + 60
    while channel.queue_declare(queue, passive=True).method.message_count < n:
        if time.monotonic() > deadline:
            raise SystemExit("the broker did not count the filled messages within 60 s")
        time.sleep(0.05)
    conn.close()


def delete(url: str, queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    conn.channel().queue_delete(queue)
    conn.close()


def decode_cost_ns(
    messages: int = 20000,
    clock: Callable[[], int] = time.perf_counter_ns,
    protocol: ModuleType | None = None,
) -> float:
    """Nanoseconds of ProtocolConnection.receive_data per delivered 128-byte message,
    by ``clock`` (wall time by default), of the core in ``protocol`` (by default
    ``strictconsume.amqp._protocol``)."""
    from pamqp import body as pbody
    from pamqp import commands, frame, header

    if protocol is None:
        import strictconsume.amqp._protocol as default

        protocol = default
    delivery = protocol.Delivery

    core = protocol.ProtocolConnection(credentials=protocol.Credentials("guest", "guest"))
    core.initiate()
    core.data_to_send()
    setup = b"".join(
        [
            frame.marshal(
                commands.Connection.Start(
                    mechanisms="PLAIN", locales="en_US", server_properties={}
                ),
                0,
            ),
            frame.marshal(commands.Connection.Tune(2047, 131072, 60), 0),
            frame.marshal(commands.Connection.OpenOk(), 0),
        ]
    )
    core.receive_data(setup)
    channel = core.open_channel()
    core.receive_data(frame.marshal(commands.Channel.OpenOk(), channel))
    props = commands.Basic.Properties(delivery_mode=2, content_type="application/json")
    one = b"".join(
        [
            frame.marshal(commands.Basic.Deliver("ctag", 1, False, "", "q"), channel),
            frame.marshal(header.ContentHeader(0, len(BODY), props), channel),
            frame.marshal(pbody.ContentBody(BODY), channel),
        ]
    )
    stream = one * messages
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    start = clock()
    got = 0
    for chunk in chunks:
        got += sum(1 for e in core.receive_data(chunk) if isinstance(e, delivery))
    elapsed = clock() - start
    assert got == messages, got
    return elapsed / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--prefetch", default="1,10,100,1000")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=4, metavar=("LIB", "QUEUE", "PREFETCH", "N"))
    ns = parser.parse_args()
    url = broker_url()
    if ns.child:
        lib, queue, prefetch, n = ns.child
        child(lib, url, queue, int(prefetch), int(n))
        return

    prefetches = [int(p) for p in ns.prefetch.split(",")]
    libraries = ns.libraries.split(",")
    queue = f"bench-client-{uuid.uuid4().hex[:8]}"
    results: dict[tuple[str, int], list[float]] = {}
    rss: dict[tuple[str, int], float] = {}
    total = len(prefetches) * ns.repeat * len(libraries)
    done = 0
    try:
        for prefetch in prefetches:
            for _ in range(ns.repeat):
                for lib in libraries:
                    fill(url, queue, ns.messages)
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--child",
                            lib,
                            queue,
                            str(prefetch),
                            str(ns.messages),
                        ],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    data = json.loads(out.stdout.strip().splitlines()[-1])
                    rate = ns.messages / data["elapsed"]
                    results.setdefault((lib, prefetch), []).append(rate)
                    rss[(lib, prefetch)] = max(rss.get((lib, prefetch), 0.0), data["peak_rss_mb"])
                    done += 1
                    print(
                        f"[{done}/{total}] {lib:22} prefetch {prefetch:5}: {rate:9.0f} msg/s",
                        file=sys.stderr,
                    )
    finally:
        delete(url, queue)

    decode_ns = decode_cost_ns()
    rows = []
    print(
        f"\nconsume with per-message acks, {ns.messages} messages of 128 bytes, "
        f"median of {ns.repeat} (min-max), msg/s"
    )
    header_line = "| prefetch | " + " | ".join(libraries) + " |"
    print(header_line)
    print("|" + "---|" * (len(libraries) + 1))
    for prefetch in prefetches:
        cells = []
        for lib in libraries:
            rates = results[(lib, prefetch)]
            med = statistics.median(rates)
            cells.append(f"{med:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})")
            rows.append(
                {
                    "library": lib,
                    "prefetch": prefetch,
                    "msgs_per_s": med,
                    "min": min(rates),
                    "max": max(rates),
                    "peak_rss_mb": rss[(lib, prefetch)],
                }
            )
        print(f"| {prefetch} | " + " | ".join(cells) + " |")
    print("\nratios of strictconsume (trio) to each peer, by prefetch:")
    for prefetch in prefetches:
        ours = statistics.median(results[("strictconsume-trio", prefetch)])
        ratios = ", ".join(
            f"{lib} {ours / statistics.median(results[(lib, prefetch)]):.2f}x"
            for lib in libraries
            if lib != "strictconsume-trio"
        )
        print(f"  prefetch {prefetch}: {ratios}")
    print(f"\ndecode cost per delivered 128-byte message (sans-IO core): {decode_ns / 1000:.2f} us")
    if ns.json:
        ns.json.write_text(json.dumps({"rows": rows, "decode_ns_per_message": decode_ns}, indent=2))


if __name__ == "__main__":
    main()
