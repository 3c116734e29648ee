"""Exactly-once effects over at-least-once delivery, under faults.

A producer (a thread of the test) commits orders, each with its outbox row, in
database transactions; ``python -m strictconsume relay`` publishes the rows; an
idempotent consumer (``python -m strictconsume``) applies each order's effect in the
database. Meanwhile the test SIGKILLs the relay and the consumer several times
(starting new ones), closes the broker's connections and restarts the broker.

At the end every order's effect is applied exactly once: one row per order in the
effects table, the totals exact, no order lost, nothing left in the queue or pending
in the outbox. The test reports how many duplicate deliveries the idempotency
absorbed (``STRICTCONSUME_FAULT_REPORT`` appends them as JSON lines).

Three set-ups: PostgreSQL for everything with the key marked in the handler's
transaction; SQLite for everything (one machine); Redis for the keys with the
effects in PostgreSQL. Redis cannot be part of the handler's transaction: a consumer
killed after its commit and before its mark leaves the key unmarked, and the order
runs again once the claim's lease ends. So with Redis the test asserts that no
order is lost, the totals match the effects applied, and every order applied twice
was applied just before a consumer's SIGKILL (and reports how many).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from ..conftest import REPO, dev_broker
from ..processes import Node, message_count

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.services]

ORDERS = 600
APP = "tests.faults.exactly_once_app"


@attrs.define
class Proc:
    """One relay or consumer process, its log kept after it is killed."""

    proc: subprocess.Popen[bytes]
    log: Path


@attrs.define
class Setup:
    store: str
    env: dict[str, str]
    tmp: Path
    prefix: str
    started: list[Proc] = attrs.Factory(list)

    def spawn(self, *args: str) -> Proc:
        log = self.tmp / f"{args[0] if args[0] == 'relay' else 'consumer'}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "strictconsume", *args],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        started = Proc(proc, log)
        self.started.append(started)
        return started

    def relay(self) -> Proc:
        return self.spawn("relay", f"{APP}:relay", "--backend", "asyncio")

    def consumer(self) -> Proc:
        return self.spawn(f"{APP}:app", "--backend", "trio")

    def logs(self) -> str:
        return "\n".join(p.log.read_text(errors="replace") for p in self.started)


def kill(p: Proc) -> None:
    p.proc.send_signal(signal.SIGKILL)
    p.proc.wait(timeout=10)


def stop(p: Proc) -> int:
    if p.proc.poll() is None:
        p.proc.send_signal(signal.SIGTERM)
    return p.proc.wait(timeout=30)


def wait_log(p: Proc, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in p.log.read_text(errors="replace"):
        assert p.proc.poll() is None, f"exited: {p.log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r}: {p.log.read_text()[-3000:]}"
        time.sleep(0.05)


# -- the database, as the test's producer and checker see it -----------------------------------


class Database:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.sqlite = setup.store == "sqlite"
        self.p = "?" if self.sqlite else "%s"

    def connect(self) -> Any:
        if self.sqlite:
            return sqlite3.connect(self.setup.env["EO_SQLITE"], timeout=30)
        import psycopg

        return psycopg.connect(self.setup.env["EO_PG_URL"])

    def create(self) -> None:
        prefix = self.setup.prefix
        conn = self.connect()
        conn.execute(f"CREATE TABLE {prefix}_orders (id TEXT PRIMARY KEY, amount INTEGER)")
        # applied_at: a time.time(); PostgreSQL's REAL (4 bytes) would round it to 128 s
        conn.execute(
            f"CREATE TABLE {prefix}_effects "
            "(order_id TEXT, amount INTEGER, applied_at DOUBLE PRECISION)"
        )
        conn.execute(f"CREATE TABLE {prefix}_totals (amount INTEGER, orders INTEGER)")
        conn.execute(f"INSERT INTO {prefix}_totals VALUES (0, 0)")
        conn.commit()
        conn.close()

    def produce(self, outbox: Any, count: int, stop: threading.Event) -> None:
        """Commit ``count`` orders, ten per transaction, each with its outbox row."""
        prefix, p = self.setup.prefix, self.p
        conn = self.connect()
        try:
            for start in range(0, count, 10):
                if stop.is_set():
                    return
                if self.sqlite:
                    conn.execute("BEGIN IMMEDIATE")
                for i in range(start, start + 10):
                    order = {"id": f"o-{i}", "amount": i % 7 + 1}
                    conn.execute(
                        f"INSERT INTO {prefix}_orders VALUES ({p}, {p})",
                        (order["id"], order["amount"]),
                    )
                    outbox.add(conn, routing_key=self.setup.env["EO_QUEUE"], body=json.dumps(order))
                conn.commit()
                time.sleep(0.05)
        finally:
            conn.close()

    def query(self, sql: str) -> list[Any]:
        conn = self.connect()
        try:
            return list(conn.execute(sql.format(prefix=self.setup.prefix)).fetchall())
        finally:
            conn.close()

    def drop(self) -> None:
        if self.sqlite:
            return
        conn = self.connect()
        conn.autocommit = True
        for table in ("orders", "effects", "totals", "outbox", "keys"):
            conn.execute(f"DROP TABLE IF EXISTS {self.setup.prefix}_{table}")
        conn.close()


@pytest.fixture(params=["postgres", "sqlite", "redis"])
def setup(request: pytest.FixtureRequest, own_node: Node, tmp_path: Path) -> Iterator[Setup]:
    store = str(request.param)
    prefix = f"eo_{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "STRICTCONSUME_URL": own_node.url,
        "EO_STORE": store,
        "EO_PREFIX": prefix,
        "EO_QUEUE": f"eo-{uuid.uuid4().hex[:10]}",
        "EO_SQLITE": str(tmp_path / "eo.db"),
        "STRICTCONSUME_LOG_LEVEL": "INFO",
    }
    if store != "sqlite":
        env["EO_PG_URL"] = request.getfixturevalue("postgres_url")
    if store == "redis":
        env["EO_REDIS_URL"] = request.getfixturevalue("redis_url")
    made = Setup(store, env, tmp_path, prefix)
    try:
        yield made
    finally:
        for p in made.started:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        Database(made).drop()


def test_every_order_is_applied_exactly_once_through_kills_and_broker_faults(
    setup: Setup, own_node: Node
) -> None:
    os.environ.update({k: v for k, v in setup.env.items() if k.startswith("EO_")})
    from strictconsume.outbox import PostgresOutbox, SQLiteOutbox

    db = Database(setup)
    db.create()
    outbox: Any = (
        SQLiteOutbox(setup.env["EO_SQLITE"], table=f"{setup.prefix}_outbox")
        if setup.store == "sqlite"
        else PostgresOutbox(setup.env["EO_PG_URL"], table=f"{setup.prefix}_outbox")
    )
    conn = db.connect()
    outbox.create(conn)
    conn.close()

    consumer = setup.consumer()
    wait_log(consumer, "ready: consuming")
    relay = setup.relay()
    wait_log(relay, "outbox relay for")
    stop_producing = threading.Event()
    producer = threading.Thread(
        target=db.produce, args=(outbox, ORDERS, stop_producing), daemon=True
    )
    began = time.monotonic()
    producer.start()

    faults: list[str] = []
    consumer_kills: list[float] = []  # time.time() of each SIGKILL of a consumer

    def applied() -> int:
        return int(db.query("SELECT COUNT(*) FROM {prefix}_effects")[0][0])

    def at_least(n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while applied() < n:
            assert time.monotonic() < deadline, (
                f"stuck at {applied()} of {n}: {setup.logs()[-4000:]}"
            )
            time.sleep(0.05)

    try:
        at_least(60)
        consumer_kills.append(time.time())
        kill(consumer)
        faults.append("SIGKILL consumer")
        consumer = setup.consumer()
        at_least(150)
        kill(relay)
        faults.append("SIGKILL relay")
        relay = setup.relay()
        at_least(220)
        dev_broker(*own_node.args, "ctl", "close_all_connections", "test")
        faults.append("close_all_connections")
        at_least(300)
        consumer_kills.append(time.time())
        kill(consumer)
        kill(relay)
        faults.append("SIGKILL consumer and relay")
        consumer, relay = setup.consumer(), setup.relay()
        at_least(380)
        dev_broker(*own_node.args, "stop")
        dev_broker(*own_node.args, "start")
        faults.append("broker restart")
        at_least(450)
        consumer_kills.append(time.time())
        kill(consumer)
        faults.append("SIGKILL consumer")
        consumer = setup.consumer()
        producer.join(timeout=120)
        at_least(ORDERS, timeout=120)
        time.sleep(2.0)  # late redeliveries, if any, would show now
    finally:
        stop_producing.set()
        producer.join(timeout=30)
    duration = time.monotonic() - began
    assert stop(consumer) == 0
    assert stop(relay) == 0

    orders = dict(db.query("SELECT id, amount FROM {prefix}_orders"))
    effects = db.query("SELECT order_id, amount, applied_at FROM {prefix}_effects")
    applied_ids = [order_id for order_id, _, _ in effects]
    duplicated = sorted({i for i in applied_ids if applied_ids.count(i) > 1})
    assert len(orders) == ORDERS
    assert set(applied_ids) == set(orders), "an order was lost"
    [(total, count)] = db.query("SELECT amount, orders FROM {prefix}_totals")
    assert (total, count) == (sum(amount for _, amount, _ in effects), len(effects))
    if setup.store == "redis":
        # Keys in Redis cannot commit with the effect: a consumer killed between its
        # commit and the mark runs the order again once the claim's lease ends. Only
        # orders first applied just before a consumer's SIGKILL may show twice.
        first: dict[str, float] = {}
        for order_id, _, applied_at in sorted(effects, key=lambda e: e[2]):
            first.setdefault(order_id, applied_at)
        unexplained = [
            i for i in duplicated if not any(0 <= k - first[i] <= 3.0 for k in consumer_kills)
        ]
        assert unexplained == [], (
            f"applied twice, not at a kill: {unexplained}, first applied at "
            f"{[first[i] for i in unexplained]}; consumers killed at {consumer_kills}"
        )
    else:
        assert duplicated == [], f"applied more than once: {duplicated[:20]}"
        assert (total, count) == (sum(orders.values()), ORDERS)
    pending = db.query(
        "SELECT status, COUNT(*) FROM {prefix}_outbox WHERE status <> 'sent' GROUP BY status"
    )
    assert pending == []
    assert message_count(own_node.url, setup.env["EO_QUEUE"]) == 0
    logs = setup.logs()
    absorbed = logs.count("is a duplicate: key")
    assert "Traceback" not in logs, logs[-4000:]
    report = {
        "store": setup.store,
        "orders": ORDERS,
        "applied": len(applied_ids),
        "lost": len(orders) - len(set(applied_ids)),
        "applied_twice": len(duplicated),
        "consumer_sigkills": len(consumer_kills),
        "duplicates_absorbed": absorbed,
        "faults": faults,
        "relays_and_consumers_started": len(setup.started),
        "seconds": round(duration, 1),
    }
    print(json.dumps(report))
    path = os.environ.get("STRICTCONSUME_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(report) + "\n")
