"""The transactional outbox: ``add`` in the caller's transaction, the relay's rounds
(order, retries with backoff, giving up, a lost connection, retention, a graceful
stop) with a recording publisher on SQLite; on PostgreSQL the NOTIFY wake-up, the
commit-order horizon and two relays at once; and, against a real RabbitMQ, a relay
inside an App with pika reading what arrived, and the metrics."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

import strictconsume as sc
from strictconsume._backoff import Backoff
from strictconsume.amqp import ConnectionLost, MessageReturned
from strictconsume.outbox import OutboxRow, OutboxTable, PostgresOutbox, Relay, SQLiteOutbox

from ..amqp.oracle import Oracle
from ..framework.polling import wait_until

pytestmark = pytest.mark.anyio

FAST = Backoff(base=0.01, cap=0.05)


class Recorder:
    """A relay's publish: records the rows; raises what ``failures`` says for an id."""

    def __init__(self, changed: list[anyio.Event] | None = None) -> None:
        self.rows: list[OutboxRow] = []
        self.failures: dict[str, list[BaseException]] = {}
        #: Set (and replaced) at each row recorded; may be shared by recorders.
        self.changed = changed if changed is not None else []

    async def __call__(self, row: OutboxRow) -> None:
        pending = self.failures.get(row.message_id)
        if pending:
            raise pending.pop(0)
        self.rows.append(row)
        if self.changed:
            self.changed.pop().set()

    async def wait(self, done: Callable[[], bool]) -> None:
        """Until ``done()`` holds, checked at each recorded row."""
        while not done():
            event = anyio.Event()
            self.changed[:] = [event]
            await event.wait()

    @property
    def ids(self) -> list[str]:
        return [row.message_id for row in self.rows]


async def run_until(
    relay: Relay, publish: Recorder, done: Callable[[], bool], *, within: float = 10.0
) -> None:
    """Run ``relay`` until ``done()`` holds, then stop it gracefully."""
    stop = anyio.Event()
    with anyio.fail_after(within):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: relay.run(publish, stopped=stop.wait))
            await publish.wait(done)
            stop.set()


def counts(outbox: OutboxTable) -> dict[str, int]:
    conn = outbox.connect()
    try:
        return outbox.counts(conn)
    finally:
        conn.close()


@pytest.fixture
def sqlite_outbox(tmp_path: Path) -> SQLiteOutbox:
    outbox = SQLiteOutbox(tmp_path / "shop.db")
    conn = outbox.connect()
    outbox.create(conn)
    conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY)")
    conn.commit()
    conn.close()
    return outbox


def add_orders(outbox: SQLiteOutbox, ids: list[str], *, fail: bool = False) -> None:
    """One transaction: the orders and their messages, committed or rolled back."""
    conn = sqlite3.connect(outbox.path)
    try:
        with conn:
            for order in ids:
                conn.execute("INSERT INTO orders VALUES (?)", (order,))
                outbox.add(
                    conn,
                    exchange="shop",
                    routing_key="order.created",
                    body=f'{{"order": "{order}"}}',
                    headers={"x-order": order, "n": 1},
                    message_id=order,
                    content_type="application/json",
                )
            if fail:
                raise ValueError("rolled back")
    except ValueError:
        pass
    finally:
        conn.close()


# -- SQLite, a recording publisher ----------------------------------------------------------


async def test_committed_rows_are_published_in_order_and_rolled_back_ones_never(
    anyio_backend: str, sqlite_outbox: SQLiteOutbox
) -> None:
    add_orders(sqlite_outbox, ["o-1", "o-2"])
    add_orders(sqlite_outbox, ["o-x"], fail=True)
    add_orders(sqlite_outbox, [f"o-{i}" for i in range(3, 251)])
    relay = Relay(sqlite_outbox, batch=100, poll_interval=0.05)
    publish = Recorder()
    await run_until(relay, publish, lambda: len(publish.rows) >= 250)
    assert publish.ids == [f"o-{i}" for i in range(1, 251)]
    first = publish.rows[0]
    assert (first.exchange, first.routing_key, first.body) == (
        "shop",
        "order.created",
        b'{"order": "o-1"}',
    )
    assert (first.headers, first.content_type, first.persistent) == (
        {"x-order": "o-1", "n": 1},
        "application/json",
        True,
    )
    assert counts(sqlite_outbox) == {"sent": 250}
    assert relay.stats.published == 250
    assert relay.stats.oldest_pending is None


def test_a_message_id_is_a_new_uuid_unless_given(sqlite_outbox: SQLiteOutbox) -> None:
    conn = sqlite3.connect(sqlite_outbox.path)
    with conn:
        generated = sqlite_outbox.add(conn, routing_key="q", body=b"x")
        given = sqlite_outbox.add(conn, routing_key="q", body="y", message_id="mine")
    conn.close()
    assert uuid.UUID(generated).version == 4
    assert given == "mine"
    with pytest.raises(TypeError, match="outbox headers must be JSON values"):
        sqlite_outbox.add(conn, routing_key="q", body=b"x", headers={"when": object()})
    with pytest.raises(TypeError, match="body must be bytes or str, not int"):
        sqlite_outbox.add(conn, routing_key="q", body=7)  # type: ignore[arg-type]


async def test_a_refused_row_is_retried_with_backoff_and_holds_back_the_next(
    anyio_backend: str, sqlite_outbox: SQLiteOutbox
) -> None:
    add_orders(sqlite_outbox, ["o-1", "o-2", "o-3"])
    publish = Recorder()
    publish.failures["o-2"] = [
        MessageReturned(312, "NO_ROUTE", "shop", "order.created") for _ in range(2)
    ]
    relay = Relay(sqlite_outbox, poll_interval=0.05, max_attempts=5, backoff=FAST)
    await run_until(relay, publish, lambda: len(publish.rows) >= 3)
    assert publish.ids == ["o-1", "o-2", "o-3"]  # o-3 waited for o-2
    assert relay.stats.failed == 0
    conn = sqlite3.connect(sqlite_outbox.path)
    row = conn.execute(
        "SELECT attempts, status, last_error FROM strictconsume_outbox WHERE message_id = 'o-2'"
    ).fetchone()
    conn.close()
    assert row[0] == 2
    assert row[1] == "sent"
    assert "NO_ROUTE" in row[2]


async def test_a_row_that_keeps_failing_is_given_up_logged_and_counted(
    anyio_backend: str, sqlite_outbox: SQLiteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    add_orders(sqlite_outbox, ["o-1", "o-2"])
    publish = Recorder()
    publish.failures["o-1"] = [
        MessageReturned(312, "NO_ROUTE", "shop", "order.created") for _ in range(10)
    ]
    relay = Relay(sqlite_outbox, poll_interval=0.05, max_attempts=3, backoff=FAST)
    await run_until(relay, publish, lambda: len(publish.rows) >= 1)
    assert publish.ids == ["o-2"]
    assert len(publish.failures["o-1"]) == 7  # three attempts
    assert relay.stats.failed == 1
    assert counts(sqlite_outbox) == {"failed": 1, "sent": 1}
    assert "failed 3 time(s) and is given up (status 'failed')" in caplog.text
    assert "'o-1'" in caplog.text


async def test_a_lost_connection_is_no_attempt_and_the_row_is_published_again(
    anyio_backend: str, sqlite_outbox: SQLiteOutbox
) -> None:
    add_orders(sqlite_outbox, ["o-1", "o-2"])
    publish = Recorder()
    publish.failures["o-1"] = [ConnectionLost("the broker went away") for _ in range(3)]
    relay = Relay(sqlite_outbox, poll_interval=0.05, max_attempts=2, backoff=FAST)
    await run_until(relay, publish, lambda: len(publish.rows) >= 2)
    assert publish.ids == ["o-1", "o-2"]
    assert relay.stats.failed == 0
    conn = sqlite3.connect(sqlite_outbox.path)
    assert conn.execute("SELECT MAX(attempts) FROM strictconsume_outbox").fetchone() == (0,)
    conn.close()


async def test_sent_rows_are_deleted_after_the_retention(
    anyio_backend: str, sqlite_outbox: SQLiteOutbox
) -> None:
    add_orders(sqlite_outbox, ["o-1"])
    relay = Relay(sqlite_outbox, poll_interval=0.05, retention=0.2)
    publish = Recorder()
    await run_until(relay, publish, lambda: len(publish.rows) >= 1)
    assert counts(sqlite_outbox) == {"sent": 1}
    add_orders(sqlite_outbox, ["o-2"])
    await anyio.sleep(0.3)
    await run_until(relay, publish, lambda: len(publish.rows) >= 2)
    # o-1 was older than the retention at the next purge; o-2 was just sent
    assert counts(sqlite_outbox) == {"sent": 1}


class FlakyOutbox(SQLiteOutbox):
    """Its first reads fail as a database that went away would."""

    failures = 2

    def fetch(self, conn: Any, limit: int) -> list[OutboxRow]:
        if self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return super().fetch(conn, limit)


async def test_a_failing_database_is_logged_and_tried_again(
    anyio_backend: str, sqlite_outbox: SQLiteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    add_orders(sqlite_outbox, ["o-1", "o-2"])
    flaky = FlakyOutbox(sqlite_outbox.path)
    relay = Relay(flaky, poll_interval=0.05, backoff=FAST)
    publish = Recorder()
    await run_until(relay, publish, lambda: len(publish.rows) >= 2)
    assert publish.ids == ["o-1", "o-2"]
    assert caplog.text.count("the database failed: OperationalError: disk I/O error") == 2
    assert "the relay tries again in" in caplog.text


def test_options_are_checked_up_front(sqlite_outbox: SQLiteOutbox) -> None:
    with pytest.raises(ValueError, match="batch must be an int >= 1, not 0"):
        Relay(sqlite_outbox, batch=0)
    with pytest.raises(ValueError, match="max_attempts must be"):
        Relay(sqlite_outbox, max_attempts=0)
    with pytest.raises(ValueError, match="retention must be > 0"):
        Relay(sqlite_outbox, retention=0)
    with pytest.raises(ValueError, match="plain SQL identifier"):
        SQLiteOutbox("x.db", table="drop table")


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture
def pg_outbox(postgres_url: str) -> Iterator[PostgresOutbox]:
    import psycopg

    outbox = PostgresOutbox(postgres_url, table=f"outbox_{uuid.uuid4().hex[:12]}")
    with psycopg.connect(postgres_url) as conn:
        outbox.create(conn)
    yield outbox
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {outbox.table}")


def pg_add(outbox: PostgresOutbox, ids: list[str]) -> None:
    import psycopg

    with psycopg.connect(outbox.conninfo) as conn, conn.transaction():
        for order in ids:
            outbox.add(conn, routing_key="orders", body=order, message_id=order)


@pytest.mark.services
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # psycopg's async API needs asyncio
async def test_aadd_on_psycopgs_async_connection_commits_with_the_transaction(
    anyio_backend: str, pg_outbox: PostgresOutbox
) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_outbox.conninfo) as conn:
        async with conn.transaction():
            kept = await pg_outbox.aadd(conn, routing_key="orders", body=b"kept")
        try:
            async with conn.transaction():
                await pg_outbox.aadd(conn, routing_key="orders", body=b"gone")
                raise ValueError("rolled back")
        except ValueError:
            pass
    relay = Relay(pg_outbox, poll_interval=0.05)
    publish = Recorder()
    await run_until(relay, publish, lambda: len(publish.rows) >= 1)
    await anyio.sleep(0.2)
    assert publish.ids == [kept]
    assert counts(pg_outbox) == {"sent": 1}


@pytest.mark.services
async def test_on_postgres_notify_wakes_the_relay_at_once(
    anyio_backend: str, pg_outbox: PostgresOutbox
) -> None:
    relay = Relay(pg_outbox, poll_interval=30.0)  # only NOTIFY can wake it in time
    publish = Recorder()
    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: relay.run(publish, stopped=stop.wait))
            await anyio.sleep(0.5)  # the relay found nothing and waits
            await anyio.to_thread.run_sync(pg_add, pg_outbox, ["p-1"])
            added = anyio.current_time()
            await publish.wait(lambda: bool(publish.rows))
            woke_after = anyio.current_time() - added
            stop.set()
    assert publish.ids == ["p-1"]
    assert woke_after < 5.0, woke_after  # not the 30 s poll


@pytest.mark.services
async def test_on_postgres_a_later_commit_never_overtakes_an_open_transaction(
    anyio_backend: str, pg_outbox: PostgresOutbox
) -> None:
    import psycopg

    holding, release = threading.Event(), threading.Event()

    def slow_transaction() -> None:
        with psycopg.connect(pg_outbox.conninfo) as conn, conn.transaction():
            pg_add_in(conn, "first")  # id 1, its transaction still open
            holding.set()
            release.wait(10)

    def pg_add_in(conn: Any, order: str) -> None:
        pg_outbox.add(conn, routing_key="orders", body=order, message_id=order)

    relay = Relay(pg_outbox, poll_interval=0.05)
    publish = Recorder()
    stop = anyio.Event()
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, slow_transaction)
            await anyio.to_thread.run_sync(holding.wait, 10)
            await anyio.to_thread.run_sync(pg_add, pg_outbox, ["second"])  # id 2, committed
            tg.start_soon(lambda: relay.run(publish, stopped=stop.wait))
            await anyio.sleep(0.5)
            assert publish.ids == []  # "second" waits for the older open transaction
            release.set()
            await publish.wait(lambda: len(publish.rows) >= 2)
            stop.set()
    assert publish.ids == ["first", "second"]


@pytest.mark.services
async def test_on_postgres_two_relays_share_the_rows_without_publishing_one_twice(
    anyio_backend: str, pg_outbox: PostgresOutbox
) -> None:
    ids = [f"r-{i}" for i in range(400)]
    for start in range(0, 400, 100):
        await anyio.to_thread.run_sync(pg_add, pg_outbox, ids[start : start + 100])
    changed: list[anyio.Event] = []
    one, two = Recorder(changed), Recorder(changed)
    relays = [Relay(pg_outbox, batch=10, poll_interval=0.05) for _ in range(2)]

    async def slow(recorder: Recorder, row: OutboxRow) -> None:
        await anyio.sleep(0.001)
        await recorder(row)

    stop = anyio.Event()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: relays[0].run(lambda row: slow(one, row), stopped=stop.wait))
            tg.start_soon(lambda: relays[1].run(lambda row: slow(two, row), stopped=stop.wait))
            await one.wait(lambda: len(one.rows) + len(two.rows) >= 400)
            stop.set()
    assert sorted(one.ids + two.ids) == sorted(ids)  # each once
    assert one.rows
    assert two.rows
    assert counts(pg_outbox) == {"sent": 400}


@pytest.mark.services
async def test_on_postgres_a_restarted_server_is_waited_for(
    anyio_backend: str, pg_outbox: PostgresOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL restarted under a running relay: its connections (the rows' and
    LISTEN's) break, the relay logs it, connects again and publishes what was added."""
    import os
    import subprocess
    import sys

    from ..conftest import DEV_SERVICES

    if os.environ.get("STRICTCONSUME_POSTGRES_URL"):
        pytest.skip("restarts the private PostgreSQL of scripts/dev-services")

    def services(command: str) -> None:
        subprocess.run(
            [sys.executable, str(DEV_SERVICES), command, "postgres"],
            check=True,
            capture_output=True,
        )

    relay = Relay(pg_outbox, poll_interval=0.1, backoff=FAST)
    publish = Recorder()
    stop = anyio.Event()
    try:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: relay.run(publish, stopped=stop.wait))
                await anyio.to_thread.run_sync(pg_add, pg_outbox, ["before"])
                await publish.wait(lambda: len(publish.rows) >= 1)
                await anyio.to_thread.run_sync(services, "stop")
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(services, "start")
                await anyio.to_thread.run_sync(pg_add, pg_outbox, ["after"])
                await publish.wait(lambda: len(publish.rows) >= 2)
                stop.set()
    finally:
        await anyio.to_thread.run_sync(services, "start")
    assert publish.ids == ["before", "after"]
    assert "the database failed" in caplog.text


# -- a relay inside an App, against RabbitMQ -------------------------------------------------


@pytest.mark.broker
async def test_a_relay_inside_an_app_publishes_with_confirms_and_counts(
    anyio_backend: str, broker_url: str, sqlite_outbox: SQLiteOutbox
) -> None:
    oracle = Oracle(broker_url)
    queue = f"sc-outbox-{uuid.uuid4().hex}"
    await oracle.declare(queue)
    conn = sqlite3.connect(sqlite_outbox.path)
    with conn:
        for i in range(5):
            sqlite_outbox.add(conn, routing_key=queue, body=f"m{i}", message_id=f"m{i}")
        sqlite_outbox.add(conn, routing_key="no-such-queue-" + queue, body="lost", message_id="x")
    conn.close()
    app = sc.App(url=broker_url, grace_period=1.0)
    relay = Relay(sqlite_outbox, poll_interval=0.05, max_attempts=2, backoff=FAST)
    relay.attach(app)
    try:
        async with app.running():

            async def done() -> bool:
                return relay.stats.published == 5 and relay.stats.failed == 1

            await wait_until(done, what="5 published, 1 failed")
            from strictconsume._asgi import _registry, render_metrics

            text = render_metrics(_registry(app.metrics))[0].decode()
        got = [await oracle.get(queue) for _ in range(5)]
        assert [m.body for m in got if m is not None] == [f"m{i}".encode() for i in range(5)]
        assert [m.properties.message_id for m in got if m is not None] == [
            f"m{i}" for i in range(5)
        ]
        assert await oracle.message_count(queue) == 0
        label = f'outbox="{sqlite_outbox.name}"'
        assert f"strictconsume_outbox_published_total{{{label}}} 5.0" in text
        assert f"strictconsume_outbox_failed_total{{{label}}} 1.0" in text
        assert f"strictconsume_outbox_lag_seconds{{{label}}} 0.0" in text
        assert counts(sqlite_outbox) == {"sent": 5, "failed": 1}
    finally:
        oracle.delete_now(queue)


@pytest.mark.broker
def test_a_relay_runs_on_its_own_from_the_command_line(
    broker_url: str, sqlite_outbox: SQLiteOutbox
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from ..conftest import REPO

    queue = f"sc-outbox-cli-{uuid.uuid4().hex}"
    oracle = Oracle(broker_url)
    oracle_declare(broker_url, queue)
    conn = sqlite3.connect(sqlite_outbox.path)
    with conn:
        for i in range(3):
            sqlite_outbox.add(conn, routing_key=queue, body=f"m{i}")
    conn.close()
    env = {**os.environ, "OUTBOX_DB": sqlite_outbox.path, "STRICTCONSUME_URL": broker_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "strictconsume", "relay", "tests.outbox.relay_app:relay"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while counts(sqlite_outbox) != {"sent": 3}:
            assert time.monotonic() < deadline, "the relay did not publish in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        depth = message_count(broker_url, queue)
        oracle.delete_now(queue)
    assert proc.returncode == 0, out
    assert depth == 3
    assert "outbox relay for sqlite:" in out
    assert "the App has no consumers" not in out
    assert "stopped (published 3, failed 0)" in out


def oracle_declare(url: str, queue: str) -> None:
    from ..amqp.oracle import pika_channel

    with pika_channel(url) as ch:
        ch.queue_declare(queue)


def message_count(url: str, queue: str) -> int:
    from ..amqp.oracle import pika_channel

    with pika_channel(url) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)
