"""The strongest form: the key marked in the handler's own transaction, on PostgreSQL
(sync and async psycopg) and in the example app (SQLite, and PostgreSQL), against a
real RabbitMQ with pika publishing duplicates."""

from __future__ import annotations

import importlib
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import psycopg
import pytest

import strictconsume as sc
from strictconsume.idempotency import Duplicate, Idempotency, PostgresStore

from ..amqp.oracle import Oracle
from ..framework.polling import wait_until
from .test_guard import message

pytestmark = pytest.mark.anyio


@pytest.fixture
def pg_table(postgres_url: str) -> Iterator[str]:
    table = f"idem_{uuid.uuid4().hex[:12]}"
    yield table
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"DROP TABLE IF EXISTS {table}_stock")


@pytest.mark.services
async def test_on_postgres_the_mark_commits_with_the_writes_and_a_second_waits(
    anyio_backend: str, postgres_url: str, pg_table: str
) -> None:
    store = PostgresStore(postgres_url, table=pg_table)
    await store.open()
    idem = Idempotency(store)
    stock = f"{pg_table}_stock"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {stock} (n INTEGER)")
        conn.execute(f"INSERT INTO {stock} VALUES (10)")
    msg = message("order-7")
    inside = threading.Event()
    go_on = threading.Event()

    def take(fail: bool = False, hold: bool = False) -> str:
        try:
            with psycopg.connect(postgres_url) as conn, conn.transaction():
                idem.mark(conn, msg)
                conn.execute(f"UPDATE {stock} SET n = n - 1")
                if hold:  # a second transaction marks the same key meanwhile
                    inside.set()
                    go_on.wait(10)
                if fail:
                    raise ValueError("rolled back")
        except Duplicate:
            return "duplicate"
        except ValueError:
            return "failed"
        return "done"

    def count() -> int:
        with psycopg.connect(postgres_url) as conn:
            row = conn.execute(f"SELECT n FROM {stock}").fetchone()
            assert row is not None
            return int(row[0])

    assert await anyio.to_thread.run_sync(lambda: take(fail=True)) == "failed"
    assert count() == 10  # the mark rolled back with the write
    results: dict[str, str] = {}

    async def first() -> None:
        results["first"] = await anyio.to_thread.run_sync(lambda: take(hold=True))

    async def second() -> None:
        results["second"] = await anyio.to_thread.run_sync(take)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.to_thread.run_sync(inside.wait, 10)
        tg.start_soon(second)  # blocks on the first's uncommitted row
        await anyio.sleep(0.3)
        assert results == {}
        go_on.set()
    assert results == {"first": "done", "second": "duplicate"}
    assert count() == 9
    await store.aclose()


@pytest.mark.services
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's async API needs asyncio
async def test_amark_on_psycopgs_async_connection(
    anyio_backend: str, postgres_url: str, pg_table: str
) -> None:
    store = PostgresStore(postgres_url, table=pg_table)
    await store.open()
    idem = Idempotency(store)
    msg = message("order-8")
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        async with conn.transaction():
            await idem.amark(conn, msg)
        with pytest.raises(Duplicate):
            async with conn.transaction():
                await idem.amark(conn, msg)
    await store.aclose()


# -- the example app -----------------------------------------------------------------------


def load_example(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    for name in ("STRICTCONSUME_POSTGRES_URL", "PAYMENTS_DB"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # by name: mypy checks examples/ as files of their own
    return importlib.reload(importlib.import_module("examples.idempotent_payments"))


async def run_example(module: ModuleType, broker_url: str) -> sc.App:
    app: sc.App = module.app
    queue = "payments"
    oracle = Oracle(broker_url)
    await oracle.delete(queue)
    await oracle.delete(f"{queue}.dlq")
    app.configure(urls=broker_url, grace_period=1.0)
    async with app.running():
        for message_id, body in [
            ("p-1", b'{"account": "alice", "amount": 5}'),
            ("p-1", b'{"account": "alice", "amount": 5}'),
            ("p-2", b'{"account": "alice", "amount": 7}'),
            ("p-2", b'{"account": "alice", "amount": 7}'),
            ("p-3", b'{"account": "bob", "amount": 1}'),
        ]:
            await oracle.publish(queue, body, message_id=message_id)

        async def settled() -> bool:
            return app.outcomes.total() >= 5

        await wait_until(settled, what="5 outcomes")
    assert {k: n for (_, k), n in app.outcomes.items() if n} == {"ack": 3, "duplicate": 2}
    for name in (queue, f"{queue}.dlq", *(f"{queue}.retry.{ms}" for ms in (1000, 10000, 60000))):
        oracle.delete_now(name)
    return app


@pytest.mark.broker
async def test_the_example_credits_each_payment_once_on_sqlite(
    anyio_backend: str, broker_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "payments.db"
    module = load_example(monkeypatch, PAYMENTS_DB=str(db))
    await run_example(module, broker_url)
    with sqlite3.connect(db) as conn:
        balances: dict[str, Any] = dict(conn.execute("SELECT account, amount FROM balances"))
    assert balances == {"alice": 12, "bob": 1}


@pytest.mark.services
@pytest.mark.broker
async def test_the_example_credits_each_payment_once_on_postgres(
    anyio_backend: str, broker_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS balances")
        conn.execute("DROP TABLE IF EXISTS strictconsume_idempotency")
    module = load_example(monkeypatch, STRICTCONSUME_POSTGRES_URL=postgres_url)
    await run_example(module, broker_url)
    with psycopg.connect(postgres_url) as conn:
        balances: dict[Any, Any] = dict(
            conn.execute("SELECT account, amount FROM balances").fetchall()
        )
    assert balances == {"alice": 12, "bob": 1}
