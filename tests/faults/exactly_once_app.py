"""The processes of the exactly-once fault test (``test_exactly_once.py``): an outbox
relay and an idempotent consumer over one database, configured from the environment.

- ``EO_STORE``: where the consumer's keys are: ``postgres`` (marked in the handler's
  own PostgreSQL transaction), ``sqlite`` (everything in one SQLite file, the mark in
  the handler's transaction) or ``redis`` (keys in Redis, effects in PostgreSQL).
- ``EO_PG_URL``, ``EO_SQLITE``, ``EO_REDIS_URL``, ``EO_PREFIX`` (table names),
  ``EO_QUEUE``.

The handler applies an order's effect: one row in ``<prefix>_effects`` (no unique
key, so that a second application would show, with when it was applied) and the
amount added to ``<prefix>_totals``, in one transaction.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any

import anyio
import anyio.to_thread

import strictconsume as sc
from strictconsume.idempotency import IdempotencyStore, SQLiteStore
from strictconsume.outbox import OutboxTable, PostgresOutbox, Relay, SQLiteOutbox

STORE = os.environ.get("EO_STORE", "sqlite")
PREFIX = os.environ.get("EO_PREFIX", "eo")
QUEUE = os.environ.get("EO_QUEUE", "eo-orders")
PG_URL = os.environ.get("EO_PG_URL", "")
SQLITE = os.environ.get("EO_SQLITE", "eo.db")

outbox: OutboxTable
store: IdempotencyStore
if STORE == "sqlite":
    outbox = SQLiteOutbox(SQLITE, table=f"{PREFIX}_outbox")
    store = SQLiteStore(SQLITE, table=f"{PREFIX}_keys")
else:
    outbox = PostgresOutbox(PG_URL, table=f"{PREFIX}_outbox")
    if STORE == "redis":
        from strictconsume.idempotency import RedisStore

        store = RedisStore(os.environ["EO_REDIS_URL"], prefix=f"{PREFIX}:")
    else:
        from strictconsume.idempotency import PostgresStore

        store = PostgresStore(PG_URL, table=f"{PREFIX}_keys")

idem = sc.Idempotency(store, lease=5.0)
relay = Relay(outbox, batch=50, poll_interval=0.2)
app = sc.App(prefetch=20, grace_period=5.0)

_local = threading.local()


def connection() -> Any:
    """This worker thread's database connection (opened again if it broke)."""
    conn = getattr(_local, "conn", None)
    if conn is not None and STORE != "sqlite" and (conn.closed or conn.broken):
        conn = None
    if conn is None:
        if STORE == "sqlite":
            conn = sqlite3.connect(SQLITE, timeout=30)
        else:
            import psycopg

            conn = psycopg.connect(PG_URL)
        _local.conn = conn
    return conn


def apply(msg: sc.Message, order: dict[str, Any]) -> None:
    p = "?" if STORE == "sqlite" else "%s"
    conn = connection()
    try:
        if STORE == "sqlite":
            conn.execute("BEGIN IMMEDIATE")
        if STORE != "redis":
            idem.mark(conn, msg)  # the strongest form: the mark and the effect together
        conn.execute(
            f"INSERT INTO {PREFIX}_effects (order_id, amount, applied_at) VALUES ({p}, {p}, {p})",
            (order["id"], order["amount"], time.time()),
        )
        conn.execute(
            f"UPDATE {PREFIX}_totals SET amount = amount + {p}, orders = orders + 1",
            (order["amount"],),
        )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise


@app.consumer(QUEUE, prefetch=20, timeout=2.0, idempotency=idem, retry=sc.Retry(delays=(0.2,)))
async def handle_order(msg: sc.Message) -> None:
    order = msg.json()
    await anyio.sleep(0.005)  # the handler's work, then its commit
    await anyio.to_thread.run_sync(apply, msg, order)
