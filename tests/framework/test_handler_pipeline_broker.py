"""The handler pipeline against a real RabbitMQ: typed bodies and their dead letters,
blocking handlers beside the event loop, middleware, and replies with
``publisher().request()`` over direct reply-to. pika is the oracle for what the broker
holds and for a request published by another client.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pika
import pydantic
import pytest

import strictconsume as sc
from strictconsume.amqp import MessageReturned

from ..amqp.oracle import Oracle, pika_channel
from .polling import DEADLINE, wait_for_count, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.anyio]

GRACE = 1.0
RPC_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rpc.py"


class Order(pydantic.BaseModel):
    id: int
    quantity: int = pydantic.Field(gt=0)


@pytest.fixture
def oracle(broker_url: str) -> Oracle:
    return Oracle(broker_url)


@pytest.fixture
def queues(oracle: Oracle) -> Iterator[list[str]]:
    """Unique queue names; each is deleted afterwards with its .dlq and retry queue."""
    made: list[str] = []
    yield made
    for queue in made:
        for name in (queue, f"{queue}.dlq", f"{queue}.retry.200"):
            oracle.delete_now(name)


def new_queue(queues: list[str]) -> str:
    name = f"sc-pipeline-{uuid.uuid4().hex}"
    queues.append(name)
    return name


async def test_typed_bodies_valid_ones_handled_invalid_ones_dead_lettered_at_once(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[Order] = []

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(order: Order, msg: sc.Message) -> None:
        seen.append(order)

    async with app.running():
        await oracle.publish(queue, json.dumps({"id": 1, "quantity": 0}).encode())
        await oracle.publish(queue, json.dumps({"id": 2, "quantity": 3}).encode())
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        await wait_until(lambda: _true(len(seen) == 1), what="the valid order handled")
        await anyio.sleep(0.4)  # a retry would be back after 0.2 s

    assert seen == [Order(id=2, quantity=3)]
    assert app.outcomes[queue, "dead_letter"] == 1
    assert app.outcomes[queue, "retry"] == 0
    dead = await oracle.get(f"{queue}.dlq")
    assert dead is not None
    headers = dead.headers or {}
    assert headers["x-error-type"] == "strictconsume.InvalidBody"
    message = headers["x-error-message"]
    assert isinstance(message, str)
    assert message.endswith("is not a valid Order: quantity: Input should be greater than 0")
    assert json.loads(dead.body) == {"id": 1, "quantity": 0}  # the body, untouched


async def _true(value: bool) -> bool:
    return value


async def test_a_blocking_handler_stalls_neither_heartbeats_nor_other_consumers(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    """time.sleep(3) in a def handler, on a connection with 1 s heartbeats: if it held
    the event loop, the broker would drop the connection after two silent intervals
    and the other consumer would stop; neither happens."""
    slow, fast = new_queue(queues), new_queue(queues)
    separator = "&" if "?" in broker_url else "?"
    app = sc.App(url=f"{broker_url}{separator}heartbeat=1", grace_period=5.0)
    sleeping = threading.Event()
    slept = threading.Event()
    fast_seen: list[bytes] = []
    fast_while_sleeping: list[bool] = []

    @app.consumer(slow, timeout=30.0, concurrency=1, prefetch=1)
    def blocking(msg: sc.Message) -> None:
        sleeping.set()
        time.sleep(3.0)
        slept.set()

    @app.consumer(fast, timeout=5.0)
    async def quick(msg: sc.Message) -> None:
        fast_seen.append(msg.body)
        fast_while_sleeping.append(sleeping.is_set() and not slept.is_set())

    async with app.running():
        await oracle.publish(slow, b"sleep")
        assert await anyio.to_thread.run_sync(sleeping.wait, DEADLINE)
        for n in range(20):
            await oracle.publish(fast, str(n).encode())
        await wait_until(lambda: _true(len(fast_seen) == 20), what="20 fast messages handled")
        await wait_until(lambda: _true(slept.is_set()), what="the blocking handler done")
        await wait_until(
            lambda: _true(app.outcomes[slow, "ack"] == 1), what="the blocking one acked"
        )
        assert app.connected
    assert app.reconnects == 0
    assert sum(fast_while_sleeping) == 20  # all while the thread slept
    assert await oracle.message_count(slow) == 0


async def test_middleware_vetoes_and_times_on_the_app(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    queue = new_queue(queues)
    timed: list[tuple[str | None, float]] = []

    async def veto(msg: sc.Message, call_next: sc.CallNext) -> Any:
        if msg.headers.get("tenant") == "blocked":
            raise sc.Reject("tenant blocked")
        started = time.monotonic()
        try:
            return await call_next(msg)
        finally:
            timed.append((msg.message_id, time.monotonic() - started))

    app = sc.App(url=broker_url, grace_period=GRACE, middleware=[veto])
    handled: list[str | None] = []

    @app.consumer(queue, timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        handled.append(msg.message_id)

    async with app.running(), app.publisher() as pub:
        await pub.publish(b"a", routing_key=queue, message_id="ok")
        await pub.publish(b"b", routing_key=queue, message_id="no", headers={"tenant": "blocked"})
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        await wait_until(lambda: _true(handled == ["ok"]), what="the allowed message handled")
    assert [message_id for message_id, _ in timed] == ["ok"]
    dead = await oracle.get(f"{queue}.dlq")
    assert dead is not None
    assert (dead.headers or {})["x-error-message"] == "tenant blocked"


async def test_request_and_reply_over_direct_reply_to(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=GRACE)

    @app.consumer(queue, timeout=5.0)
    def price(order: Order) -> dict[str, int]:  # a blocking handler replies too
        return {"id": order.id, "total": order.quantity * 10}

    async with app.running(), app.publisher() as pub:
        reply = await pub.request(
            json.dumps({"id": 4, "quantity": 2}),
            routing_key=queue,
            content_type="application/json",
            correlation_id="c-4",
            timeout=DEADLINE,
        )
        assert reply.json() == {"id": 4, "total": 20}
        assert (reply.correlation_id, reply.content_type) == ("c-4", "application/json")
        # many at once, each its own correlation id
        answers: dict[int, Any] = {}

        async def ask(n: int) -> None:
            got = await pub.request(json.dumps({"id": n, "quantity": 1}), routing_key=queue)
            answers[n] = got.json()

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(ask, n)
        assert answers == {n: {"id": n, "total": 10} for n in range(10)}
    assert app.outcomes[queue, "ack"] == 11
    assert await oracle.message_count(queue) == 0


async def test_a_reply_goes_to_a_queue_another_client_named(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    """pika publishes the request with reply_to its own queue and reads the reply."""
    queue, replies = new_queue(queues), new_queue(queues)
    await anyio.to_thread.run_sync(
        functools.partial(_declare_and_request, broker_url, queue, replies)
    )
    app = sc.App(url=broker_url, grace_period=GRACE)

    @app.consumer(queue, timeout=5.0)
    async def echo(body: str) -> str:
        return body.upper()

    async with app.running():
        await wait_for_count(oracle, replies, 1)
    got = await oracle.get(replies)
    assert got is not None
    assert got.body == b"HELLO"
    assert got.properties.correlation_id == "pika-1"
    assert got.properties.content_type == "text/plain; charset=utf-8"


def _declare_and_request(url: str, queue: str, replies: str) -> None:
    with pika_channel(url) as ch:
        ch.queue_declare(replies)
        ch.queue_declare(
            queue,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"},
        )
        ch.basic_publish(
            "",
            queue,
            b"hello",
            pika.BasicProperties(reply_to=replies, correlation_id="pika-1"),
        )


async def test_a_request_without_a_reply_times_out_and_one_to_no_queue_is_returned(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    queue = new_queue(queues)
    await oracle.declare(queue)
    app = sc.App(url=broker_url)
    async with app.publisher() as pub:  # the App is not running: a connection of its own
        with pytest.raises(TimeoutError, match=r"no reply to the request 'c-1' sent to"):
            await pub.request(b"?", routing_key=queue, correlation_id="c-1", timeout=0.3)
        with pytest.raises(MessageReturned):
            await pub.request(b"?", routing_key=f"{queue}-missing", timeout=DEADLINE)
    assert await oracle.message_count(queue) == 1  # the request itself was delivered


async def test_a_blocking_handler_past_the_grace_period_has_its_message_requeued(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    """The thread cannot be stopped: the App stops at the end of the grace period
    anyway, the message goes back to the queue, and the thread's end is ignored."""
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=0.3)
    started = threading.Event()
    release = threading.Event()

    @app.consumer(queue, timeout=30.0)
    def stuck(msg: sc.Message) -> None:
        started.set()
        release.wait(DEADLINE)

    try:
        async with app.running():
            await oracle.publish(queue, b"stuck")
            assert await anyio.to_thread.run_sync(started.wait, DEADLINE)
        assert app.outcomes[queue, "cancelled"] == 1
        assert not release.is_set()  # the App did not wait for the thread
        await wait_for_count(oracle, queue, 1)  # requeued
    finally:
        release.set()


async def test_the_rpc_example_answers_a_quote(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    # loaded from its file, afresh for each backend (an App belongs to one event loop)
    spec = importlib.util.spec_from_file_location(f"rpc_example_{uuid.uuid4().hex}", RPC_EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    rpc: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rpc)
    queues.append("quotes")  # the example's queue, deleted afterwards
    rpc.app.configure(urls=broker_url)
    async with rpc.app.running():
        quote = await rpc.ask(12, 2.5)
    assert quote == rpc.Quote(total=27.0, discount=0.1)
    assert rpc.app.outcomes["quotes", "ack"] >= 1
