"""Exactly-once effects over at-least-once delivery: an idempotent consumer whose mark
commits in the same database transaction as its own writes.

Run it against a broker with::

    STRICTCONSUME_URL=amqp://guest:guest@127.0.0.1:5673/ \\
        python -m strictconsume examples.idempotent_payments:app

Each message credits an account (``{"account": "alice", "amount": 5}``). RabbitMQ may
deliver a message twice (a consumer killed before its ack, a lost connection, a
retried copy). The consumer option ``idempotency=`` skips a message whose
``message_id`` was handled (outcome ``duplicate``), and ``idem.mark(db, msg)`` inside
the handler's transaction records the key together with the credit: a crash can
never commit the credit without the mark, nor the mark without the credit.

The database is SQLite (``payments.db`` here, or ``PAYMENTS_DB``) on one machine, or
PostgreSQL when ``STRICTCONSUME_POSTGRES_URL`` names one (several machines): the
handler is the same but for its connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

import anyio.to_thread

import strictconsume as sc
from strictconsume.idempotency import IdempotencyStore, SQLiteStore

app = sc.App(grace_period=10.0, prefetch=20)

POSTGRES_URL = os.environ.get("STRICTCONSUME_POSTGRES_URL")
SQLITE_PATH = os.environ.get("PAYMENTS_DB", "payments.db")

store: IdempotencyStore
if POSTGRES_URL:
    from strictconsume.idempotency import PostgresStore

    store = PostgresStore(POSTGRES_URL)
else:
    store = SQLiteStore(SQLITE_PATH)
idem = sc.Idempotency(store, ttl=7 * 24 * 3600.0)

CREATE = "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, amount INTEGER NOT NULL)"
CREDIT = (
    "INSERT INTO balances (account, amount) VALUES ({p}, {p}) ON CONFLICT (account) "
    "DO UPDATE SET amount = balances.amount + excluded.amount"
)


def connect() -> Any:
    """The handler's own database connection (one per worker thread call here; a
    real service would keep a pool)."""
    if POSTGRES_URL:
        import psycopg

        return psycopg.connect(POSTGRES_URL)
    return sqlite3.connect(SQLITE_PATH, timeout=30)


_table_lock = threading.Lock()
_table_created = False


def create_table() -> None:
    """The table, once per process, in a transaction of its own: two handlers'
    transactions each creating it would race (PostgreSQL refuses the second)."""
    global _table_created
    with _table_lock:
        if _table_created:
            return
        db = connect()
        try:
            with db:
                db.execute(CREATE)
        finally:
            db.close()
        _table_created = True


def credit(msg: sc.Message, account: str, amount: int) -> None:
    """One transaction: the key's mark and the credit commit together."""
    create_table()
    db = connect()
    try:
        with db:  # sqlite3 and psycopg alike: commit on success, roll back on error
            idem.mark(db, msg)  # raises sc.Duplicate if the message was handled
            db.execute(CREDIT.format(p="%s" if POSTGRES_URL else "?"), (account, amount))
    finally:
        db.close()


@app.consumer("payments", timeout=20.0, idempotency=idem)
async def handle_payment(msg: sc.Message) -> None:
    payment = msg.json()
    if not isinstance(payment, dict) or not isinstance(payment.get("amount"), int):
        raise sc.Reject('a payment is {"account": str, "amount": int}')
    await anyio.to_thread.run_sync(credit, msg, str(payment["account"]), payment["amount"])
