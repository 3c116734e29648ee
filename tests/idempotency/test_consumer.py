"""An idempotent consumer inside the App: against the scripted fake broker (exact
frames: duplicates acked, the handler run once) and against a real RabbitMQ, with
pika as the independent oracle publishing duplicates and reading the dead letter."""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pamqp import commands

import strictconsume as sc
from strictconsume._outcome import OutcomeKind
from strictconsume._shutdown import Shutdown
from strictconsume.idempotency import SQLiteStore

from ..amqp.fake_broker import FakeBroker
from ..amqp.oracle import Oracle
from ..framework.polling import DEADLINE, depths, empty, wait_until
from ..framework.test_dispatch_fake import (
    CLEAN_SHUTDOWN,
    FIRST_CONSUMER_CHANNEL,
    Connector,
    Recorder,
    make_supervisor,
    serve_startup,
    serve_until_closed,
    spec_for,
)

pytestmark = pytest.mark.anyio


# -- the fake broker ------------------------------------------------------------------------


async def test_duplicates_are_acked_without_running_the_handler(
    anyio_backend: str, tmp_path: Path
) -> None:
    shutdown = Shutdown()
    runs: list[bytes] = []

    async def handler(msg: sc.Message) -> None:
        runs.append(msg.body)
        await anyio.sleep(0.05)  # still running when its duplicate arrives

    idem = sc.Idempotency(SQLiteStore(tmp_path / "keys.db"), key=lambda msg: msg.text())
    spec = spec_for(handler, idempotency=idem)

    async def script(broker: FakeBroker) -> None:
        [tag] = await serve_startup(broker, [spec])
        for delivery_tag, body in enumerate([b"a", b"a", b"b", b"a"], start=1):
            await broker.deliver(FIRST_CONSUMER_CHANNEL, tag, delivery_tag, body)
        acked: set[int] = set()
        while acked != {1, 2, 3, 4}:
            ack = await broker.expect(commands.Basic.Ack, FIRST_CONSUMER_CHANNEL)
            settled = range(1, ack.delivery_tag + 1) if ack.multiple else [ack.delivery_tag]
            assert not acked & set(settled), f"acked twice: {ack!r}"
            acked.update(settled)
        shutdown.request(5.0)
        assert await serve_until_closed(broker) == CLEAN_SHUTDOWN

    recorder = Recorder()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await make_supervisor(
                Connector(tg, [script]), [spec], shutdown=shutdown, recorder=recorder
            ).run()
    assert sorted(runs) == [b"a", b"b"]
    assert Counter(kind for _, kind in recorder.outcomes) == {
        OutcomeKind.ACK: 2,
        OutcomeKind.DUPLICATE: 2,
    }
    await idem.store.aclose()


def test_the_duplicate_series_starts_at_zero(tmp_path: Path) -> None:
    app = sc.App(url="amqp://guest:guest@localhost:1/")
    app.metrics.add_queues(["orders"])
    assert app.metrics.messages["orders", "duplicate"] == 0
    assert "duplicate" in {kind.value for kind in OutcomeKind}


# -- the real broker ------------------------------------------------------------------------


@pytest.fixture
def queue(broker_url: str) -> Iterator[str]:
    name = f"sc-idem-{uuid.uuid4().hex}"
    yield name
    oracle = Oracle(broker_url)
    for q in (name, f"{name}.dlq", f"{name}.retry.200"):
        oracle.delete_now(q)


@pytest.mark.broker
async def test_duplicates_published_by_pika_are_handled_once(
    anyio_backend: str,
    broker_url: str,
    queue: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="strictconsume")
    oracle = Oracle(broker_url)
    store = SQLiteStore(tmp_path / "keys.db")
    app = sc.App(url=broker_url, grace_period=1.0)
    runs: Counter[str | None] = Counter()
    failed_once: set[str] = set()

    @app.consumer(
        queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0, idempotency=sc.Idempotency(store)
    )
    async def handle(msg: sc.Message) -> None:
        runs[msg.message_id] += 1
        if msg.body == b"fail-once" and msg.message_id not in failed_once:
            failed_once.add(str(msg.message_id))
            raise ValueError("payment gateway down")

    async with app.running():
        for _ in range(3):
            await oracle.publish(queue, b"order", message_id="o-1")
        await oracle.publish(queue, b"order", message_id="o-2")
        await oracle.publish(queue, b"fail-once", message_id="o-3")  # its retry runs
        await oracle.publish(queue, b"fail-once", message_id="o-3")
        await oracle.publish(queue, b"no id")

        async def settled() -> bool:
            return app.outcomes.total() >= 8

        await wait_until(settled, within=DEADLINE, what="8 outcomes")
    assert runs == {"o-1": 1, "o-2": 1, "o-3": 2}
    assert {outcome: n for (_, outcome), n in app.outcomes.items() if n} == {
        "ack": 3,
        "duplicate": 3,
        "retry": 1,
        "dead_letter": 1,
    }
    dead = await oracle.get(f"{queue}.dlq")
    assert dead is not None
    assert dead.body == b"no id"
    headers: dict[str, Any] = dead.headers or {}
    assert headers["x-error-type"] == "strictconsume.idempotency.InvalidKey"
    assert "the message has no message_id" in headers["x-error-message"]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    assert caplog.text.count("is a duplicate: key 'o-1' was handled already") == 2


@pytest.mark.broker
async def test_a_store_that_cannot_be_opened_is_a_startup_error_naming_it(
    anyio_backend: str, broker_url: str, queue: str, tmp_path: Path
) -> None:
    path = tmp_path / "no-such-dir" / "keys.db"
    app = sc.App(url=broker_url, grace_period=1.0)

    @app.consumer(queue, idempotency=sc.Idempotency(SQLiteStore(path)))
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("never runs")

    with anyio.fail_after(10), pytest.raises(sc.StartupError) as info:
        async with app.running():
            pass
    text = str(info.value)
    assert f"idempotency store sqlite:{path}" in text
    assert repr(queue) in text


@pytest.mark.broker
@pytest.mark.services
async def test_the_store_lost_mid_run_requeues_and_the_app_recovers(
    anyio_backend: str,
    broker_url: str,
    redis_url: str,
    queue: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis stopped while the App consumes: the messages go back to the queue (an
    ERROR line names the store), none is acked unhandled; once Redis is back every
    message is handled once."""
    import os
    import subprocess
    import sys

    from strictconsume.idempotency import RedisStore

    from ..conftest import DEV_SERVICES

    if os.environ.get("STRICTCONSUME_REDIS_URL"):
        pytest.skip("stops and starts the private Redis of scripts/dev-services")

    def services(command: str) -> None:
        subprocess.run(
            [sys.executable, str(DEV_SERVICES), command, "redis"], check=True, capture_output=True
        )

    oracle = Oracle(broker_url)
    app = sc.App(url=broker_url, grace_period=1.0)
    runs: Counter[str | None] = Counter()
    store = RedisStore(redis_url, prefix=f"lost-{uuid.uuid4().hex}:", socket_timeout=1.0)

    @app.consumer(queue, timeout=5.0, idempotency=sc.Idempotency(store))
    async def handle(msg: sc.Message) -> None:
        runs[msg.message_id] += 1

    try:
        async with app.running():
            await oracle.publish(queue, b"before", message_id="m-0")
            await wait_until(lambda: _true(runs["m-0"] == 1), what="m-0 handled")
            await anyio.to_thread.run_sync(services, "stop")
            for i in range(1, 4):
                await oracle.publish(queue, b"while down", message_id=f"m-{i}")

            async def refused() -> bool:
                return app.outcomes[queue, "requeue"] >= 3

            await wait_until(refused, what="requeues while Redis is down")
            assert sum(runs.values()) == 1  # nothing ran without its claim
            await anyio.to_thread.run_sync(services, "start")

            async def recovered() -> bool:
                return app.outcomes[queue, "ack"] == 4

            await wait_until(recovered, within=30, what="all handled once Redis is back")
    finally:
        await anyio.to_thread.run_sync(services, "start")
    assert runs == {f"m-{i}": 1 for i in range(4)}
    assert await oracle.message_count(queue) == 0
    assert f"could not be claimed: idempotency store {store.name}" in caplog.text


async def _true(value: bool) -> bool:
    return value
