"""What idempotency and the outbox cost, as ratios measured in the same run.

1. **The cost per message of each idempotency store**: the same queue is filled
   with N persistent messages (unique message_ids, published with confirms), and an
   App on trio drains it with a handler that does nothing, at prefetch 100: without
   idempotency, then with ``Idempotency(SQLiteStore)``, ``PostgresStore`` and
   ``RedisStore`` (each a fresh table or key prefix). Reported: seconds per message,
   and the ratio to the run without idempotency (rounds interleaved, median).
2. **The relay's throughput against publishing directly**: N messages published
   one at a time with confirms and mandatory through ``app.publisher()`` (what a
   service would do without an outbox), against the relay publishing N committed
   outbox rows (SQLite, PostgreSQL) from the moment it starts until every row is
   marked sent. Reported: messages per second and the ratio to direct publishing.

usage: .venv/bin/python -m benchmarks.idempotency_outbox [--messages N] [--repeat R]
       [--json PATH]

The broker is STRICTCONSUME_URL (else scripts/dev-broker's node, started if
needed); PostgreSQL and Redis come from scripts/dev-services (or
STRICTCONSUME_POSTGRES_URL / STRICTCONSUME_REDIS_URL). Figures depend on the
machine: quote the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pika

import strictconsume as sc
from strictconsume.idempotency import IdempotencyStore, SQLiteStore
from strictconsume.outbox import OutboxTable, PostgresOutbox, Relay, SQLiteOutbox

REPO = Path(__file__).resolve().parent.parent
PREFETCH = 100


def script_url(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0]


def fill(url: str, queue: str, n: int) -> None:
    """Declare ``queue`` as the App will, and publish ``n`` messages with confirms."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(n):
        ch.basic_publish(
            "",
            queue,
            b"x" * 128,
            pika.BasicProperties(message_id=f"{queue}-{i}", delivery_mode=2),
            mandatory=True,
        )
    conn.close()


def delete(url: str, *queues: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    for queue in queues:
        ch.queue_delete(queue)
    conn.close()


async def drain(url: str, queue: str, n: int, idem: sc.Idempotency | None) -> float:
    """Seconds for an App to handle ``n`` messages of ``queue``."""
    app = sc.App(url=url, grace_period=5.0)
    done = anyio.Event()
    handled = 0

    @app.consumer(queue, prefetch=PREFETCH, timeout=60.0, idempotency=idem)
    async def handle(msg: sc.Message) -> None:
        nonlocal handled
        handled += 1
        if handled == n:
            done.set()

    # declare the queues first (the App's topology), then fill, then time the drain
    async with app.running():
        pass
    await anyio.to_thread.run_sync(fill, url, queue, n)
    async with app.running():
        began = time.perf_counter()
        await done.wait()
        return time.perf_counter() - began


def stores(pg: str | None, redis_url: str | None, tmp: Path) -> dict[str, Callable[[], Any]]:
    def sqlite() -> IdempotencyStore:
        return SQLiteStore(tmp / f"keys-{uuid.uuid4().hex[:8]}.db")

    made: dict[str, Callable[[], Any]] = {"none": lambda: None, "sqlite": sqlite}
    if pg:
        from strictconsume.idempotency import PostgresStore

        made["postgres"] = lambda: PostgresStore(pg, table=f"bench_{uuid.uuid4().hex[:10]}")
    if redis_url:
        from strictconsume.idempotency import RedisStore

        made["redis"] = lambda: RedisStore(redis_url, prefix=f"bench:{uuid.uuid4().hex}:")
    return made


async def consumer_costs(
    url: str, n: int, repeat: int, makers: dict[str, Callable[[], Any]]
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in makers}
    for round_ in range(repeat):
        for name, make in makers.items():
            queue = f"bench-idem-{uuid.uuid4().hex[:10]}"
            store = make()
            idem = None if store is None else sc.Idempotency(store)
            try:
                seconds = await drain(url, queue, n, idem)
            finally:
                delete(
                    url,
                    queue,
                    f"{queue}.dlq",
                    *(f"{queue}.retry.{ms}" for ms in (1000, 10000, 60000)),
                )
            results[name].append(seconds / n)
            print(
                f"  round {round_ + 1} {name:>9}: {seconds / n * 1e6:8.1f} us/message", flush=True
            )
    return results


async def direct(url: str, queue: str, n: int) -> float:
    app = sc.App(url=url)
    async with app.publisher() as pub:
        began = time.perf_counter()
        for i in range(n):
            await pub.publish(b"x" * 128, routing_key=queue, message_id=f"d-{i}")
        return time.perf_counter() - began


def add_rows(outbox: OutboxTable, queue: str, n: int) -> None:
    conn = outbox.connect()
    outbox.create(conn)
    for start in range(0, n, 100):
        for _ in range(start, min(n, start + 100)):
            outbox.add(conn, routing_key=queue, body=b"x" * 128)
        conn.commit()
    conn.close()


async def relayed(url: str, outbox: OutboxTable, queue: str, n: int) -> float:
    await anyio.to_thread.run_sync(add_rows, outbox, queue, n)
    relay = Relay(outbox, batch=100, poll_interval=0.05)
    app = sc.App(url=url)
    stop = anyio.Event()
    all_sent = anyio.Event()
    async with app.publisher() as pub:
        published = 0

        async def publish(row: Any) -> None:
            nonlocal published
            await pub.publish(row.body, routing_key=row.routing_key, message_id=row.message_id)
            published += 1
            if published >= n:  # the last one: its round is marked before run() returns
                all_sent.set()

        async with anyio.create_task_group() as tg:
            began = time.perf_counter()
            tg.start_soon(lambda: relay.run(publish, stopped=stop.wait))
            await all_sent.wait()
            stop.set()  # the relay marks the round's rows before it returns
        return time.perf_counter() - began


async def relay_throughput(
    url: str, n: int, repeat: int, pg: str | None, tmp: Path
) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"direct": [], "relay-sqlite": []}
    if pg:
        results["relay-postgres"] = []
    for round_ in range(repeat):
        for name in results:
            queue = f"bench-outbox-{uuid.uuid4().hex[:10]}"
            conn = pika.BlockingConnection(pika.URLParameters(url))
            conn.channel().queue_declare(queue, durable=True)
            conn.close()
            try:
                if name == "direct":
                    seconds = await direct(url, queue, n)
                elif name == "relay-sqlite":
                    seconds = await relayed(url, SQLiteOutbox(tmp / f"{queue}.db"), queue, n)
                else:
                    assert pg is not None
                    outbox = PostgresOutbox(pg, table=f"bench_{uuid.uuid4().hex[:10]}")
                    try:
                        seconds = await relayed(url, outbox, queue, n)
                    finally:
                        import psycopg

                        with psycopg.connect(pg, autocommit=True) as c:
                            c.execute(f"DROP TABLE {outbox.table}")
            finally:
                delete(url, queue)
            results[name].append(n / seconds)
            print(f"  round {round_ + 1} {name:>14}: {n / seconds:8.0f} messages/s", flush=True)
    return results


def ratios(
    results: dict[str, list[float]], baseline: str, what: str, unit: str, scale: float
) -> dict[str, dict[str, float]]:
    """Print the medians of ``results`` as a markdown table, with their ratio to
    ``baseline``'s median; return them."""
    base = statistics.median(results[baseline])
    print(f"\n| {what} | {unit} (median) | ratio to {baseline} |")
    print("|---|--:|--:|")
    out = {}
    for name, values in results.items():
        median = statistics.median(values)
        out[name] = {"median": median, "ratio": median / base}
        print(f"| {name} | {median * scale:.1f} | {median / base:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-services", action="store_true", help="SQLite only")
    args = parser.parse_args()
    url = os.environ.get("STRICTCONSUME_URL") or script_url("dev-broker", "start")
    pg = redis_url = None
    if not args.no_services:
        pg = os.environ.get("STRICTCONSUME_POSTGRES_URL") or script_url(
            "dev-services", "start", "postgres"
        )
        redis_url = os.environ.get("STRICTCONSUME_REDIS_URL") or script_url(
            "dev-services", "start", "redis"
        )
    with tempfile.TemporaryDirectory() as tmp:
        print(f"consumer cost per message, N={args.messages}, prefetch {PREFETCH}, trio:")
        costs = anyio.run(
            consumer_costs, url, args.messages, args.repeat, stores(pg, redis_url, Path(tmp))
        )
        print(f"relay throughput against direct confirmed publishing, N={args.messages}:")
        rates = anyio.run(relay_throughput, url, args.messages, args.repeat, pg, Path(tmp))
    summary: dict[str, Any] = {
        "messages": args.messages,
        "repeat": args.repeat,
        "cost": ratios(costs, "none", "consumer", "us per message", 1e6),
        "rate": ratios(rates, "direct", "publisher", "messages/s", 1.0),
    }
    if args.json:
        args.json.write_text(
            json.dumps({**summary, "raw": {"cost": costs, "rate": rates}}, indent=2)
        )


if __name__ == "__main__":
    main()
