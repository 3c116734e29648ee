"""The outcome table (design section 3), shutdown (section 5) and the public API
(section 6) of the framework, against a real RabbitMQ.

Each test runs an :class:`strictconsume.App` in-process on trio and on asyncio, feeds
it through pika and reads what the broker holds afterwards through pika too
(``tests/amqp/oracle.py``, an independent client): the depth of the queue, of each
retry queue and of the dead-letter queue, the dead letter's headers, and, where the
broker is ours to administer, the unacked counts from ``rabbitmqctl``. Queue and
exchange names are unique per test (uuid) and deleted at the end.
"""

from __future__ import annotations

import datetime
import functools
import logging
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import anyio
import anyio.to_thread
import attrs
import pika
import pytest

import strictconsume as sc
from strictconsume._topology import QUORUM_RETRY_ARGUMENTS
from strictconsume.amqp import ChannelClosed, MessageReturned

from ..amqp.oracle import Oracle, OracleMessage, pika_channel
from ..conftest import dev_broker, external_broker_url
from .polling import DEADLINE, depths, empty, wait_for_count, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.anyio]

#: Every retry delay this file uses, in ms: the teardown deletes ``<queue>.retry.<ms>``.
RETRY_MS = (200, 300, 400)
#: A short grace period, so that a test that fails inside ``app.running()`` ends fast.
GRACE = 1.0


# -- pika helpers beyond the oracle (exchanges, properties, durable declares) -------------


def _publish(
    url: str,
    bodies: list[bytes],
    *,
    exchange: str,
    routing_key: str,
    message_id: str | None,
    headers: dict[str, Any] | None,
    expiration: str | None = None,
) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(
                message_id=message_id,
                headers=headers,
                content_type="application/octet-stream",
                expiration=expiration,
            )
            ch.basic_publish(exchange, routing_key, body, properties, mandatory=True)


def _delete_exchange(url: str, exchange: str) -> None:
    with pika_channel(url) as ch:
        ch.exchange_delete(exchange)


@attrs.frozen
class Pika:
    """What the oracle does not offer, through pika in a worker thread as well."""

    url: str

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str,
        exchange: str = "",
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        expiration: str | None = None,
    ) -> None:
        """Publish ``body`` (confirmed, mandatory)."""
        await anyio.to_thread.run_sync(
            functools.partial(
                _publish,
                self.url,
                [body],
                exchange=exchange,
                routing_key=routing_key,
                message_id=message_id,
                headers=headers,
                expiration=expiration,
            )
        )

    async def publish_many(self, queue: str, bodies: list[bytes]) -> None:
        await anyio.to_thread.run_sync(
            functools.partial(
                _publish,
                self.url,
                bodies,
                exchange="",
                routing_key=queue,
                message_id=None,
                headers=None,
            )
        )

    async def declare_durable(self, queue: str, arguments: dict[str, Any] | None) -> None:
        await Oracle(self.url).declare_durable(queue, arguments)

    async def has_arguments(self, queue: str, arguments: dict[str, Any]) -> bool:
        return await Oracle(self.url).has_arguments(queue, arguments)


# -- rabbitmqctl: ready and unacked counts --------------------------------------------------


def _ctl_counts(queue: str) -> tuple[int, int]:
    out = dev_broker(
        "ctl",
        "list_queues",
        "--no-table-headers",
        "--quiet",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ).stdout
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 3 and fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"rabbitmqctl does not list queue {queue!r}:\n{out}")


async def ctl_counts(queue: str) -> tuple[int, int] | None:
    """(ready, unacked) of ``queue`` from rabbitmqctl; None with an outside broker."""
    if external_broker_url() is not None:
        return None
    return await anyio.to_thread.run_sync(_ctl_counts, queue)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def oracle(broker_url: str) -> Oracle:
    return Oracle(broker_url)


@pytest.fixture
def pk(broker_url: str) -> Pika:
    return Pika(broker_url)


@attrs.define
class Names:
    """Unique queue and exchange names; everything named is deleted afterwards."""

    queues: list[str] = attrs.Factory(list)
    exchanges: list[str] = attrs.Factory(list)

    def queue(self) -> str:
        name = f"sc-outcomes-{uuid.uuid4().hex}"
        self.queues.append(name)
        return name

    def exchange(self) -> str:
        name = f"ex-{uuid.uuid4().hex}"
        self.exchanges.append(name)
        return name


@pytest.fixture
def names(broker_url: str, oracle: Oracle) -> Iterator[Names]:
    made = Names()
    yield made
    for queue in made.queues:
        for name in (queue, f"{queue}.dlq", *(f"{queue}.retry.{ms}" for ms in RETRY_MS)):
            oracle.delete_now(name)
    for exchange in made.exchanges:
        _delete_exchange(broker_url, exchange)


# -- helpers ----------------------------------------------------------------------------


def dead_lettered(queue: str, retry_ms: tuple[int, ...] = ()) -> dict[str, int]:
    return {**empty(queue, retry_ms), f"{queue}.dlq": 1}


async def assert_nothing_unacked(queue: str, ready: int = 0) -> None:
    counts = await ctl_counts(queue)
    if counts is not None:
        assert counts == (ready, 0), f"(ready, unacked) of {queue!r}"


def main_arguments(queue: str) -> dict[str, Any]:
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"}


def retry_arguments(queue: str, ms: int) -> dict[str, Any]:
    return {"x-message-ttl": ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue}


def check_failed_at(value: object, before: datetime.datetime) -> None:
    assert isinstance(value, str), value
    failed_at = datetime.datetime.fromisoformat(value)
    assert failed_at.utcoffset() == datetime.timedelta(0), value
    now = datetime.datetime.now(datetime.UTC)
    slack = datetime.timedelta(seconds=1)
    assert before - slack <= failed_at <= now + slack, (value, before, now)


async def get_dead_letter(oracle: Oracle, queue: str) -> OracleMessage:
    dead = await oracle.get(f"{queue}.dlq")
    assert dead is not None, f"nothing in {queue}.dlq"
    assert dead.message_count == 0, "more than one dead letter"
    return dead


# -- 1. returns -> ack ------------------------------------------------------------------


async def test_returning_handler_acks(broker_url: str, oracle: Oracle, names: Names) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[bytes, int, bool]] = []
    handled = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.body, msg.attempt, msg.redelivered))
        handled.set()

    async with app.running():
        await oracle.publish(queue, b"fine")
        with anyio.fail_after(DEADLINE):
            await handled.wait()

        # acked while still connected, not merely requeued at close
        async def acked() -> bool:
            return await ctl_counts(queue) in ((0, 0), None)

        await wait_until(acked, what="the message acked")

    assert seen == [(b"fine", 1, False)]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "ack"] == 1


# -- 2. Reject -> dead-letter at once ------------------------------------------------------


async def test_reject_dead_letters_at_once(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    calls: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=(0.2, 0.4)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        calls.append(msg.attempt)
        raise sc.Reject("reason")

    before = datetime.datetime.now(datetime.UTC)
    async with app.running():
        await pk.publish(b"\x00binary body\xff", routing_key=queue, message_id="mid-reject")
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        # a retry would be back after 0.2 s: give it the time to show up
        await anyio.sleep(0.4)

    assert calls == [1]
    assert await depths(oracle, queue, (200, 400)) == {
        **empty(queue, (200, 400)),
        f"{queue}.dlq": 1,
    }
    await assert_nothing_unacked(queue)
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == b"\x00binary body\xff"
    assert dead.properties.message_id == "mid-reject"
    headers = dead.headers or {}
    assert headers["x-error-type"] == "strictconsume.Reject"
    assert headers["x-error-message"] == "reason"
    assert headers["x-failed-queue"] == queue
    assert headers["x-attempt"] == 1
    check_failed_at(headers["x-failed-at"], before)


# -- 3. any other exception -> retries, then dead-letter --------------------------------


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_exception_is_retried_then_dead_lettered(
    broker_url: str,
    oracle: Oracle,
    pk: Pika,
    names: Names,
    queue_type: Literal["classic", "quorum"],
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=(0.2, 0.4)), timeout=5.0, queue_type=queue_type)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        raise ValueError(f"bad value on attempt {msg.attempt}")

    before = datetime.datetime.now(datetime.UTC)
    async with app.running():
        # the retry queues exist from the start, with their TTL and dead-lettering back
        for ms in (200, 400):
            # quorum queues for every consumer, handing back at least once
            arguments = {**retry_arguments(queue, ms), **QUORUM_RETRY_ARGUMENTS}
            assert await oracle.queue_exists(f"{queue}.retry.{ms}")
            assert await pk.has_arguments(f"{queue}.retry.{ms}", arguments)
            wrong_ttl = {**arguments, "x-message-ttl": ms + 1}
            assert not await pk.has_arguments(f"{queue}.retry.{ms}", wrong_ttl)
        expected = main_arguments(queue)
        if queue_type == "quorum":
            expected["x-queue-type"] = "quorum"
            expected["x-delivery-limit"] = 20  # the default for quorum queues
        assert await pk.has_arguments(queue, expected)
        dlq = {"x-queue-type": "quorum"} if queue_type == "quorum" else {}
        assert await pk.has_arguments(f"{queue}.dlq", dlq)

        await pk.publish(b'{"n": 3}', routing_key=queue, message_id="mid-retry")
        await wait_for_count(oracle, f"{queue}.dlq", 1)

    assert attempts == [1, 2, 3]
    assert await depths(oracle, queue, (200, 400)) == {
        **empty(queue, (200, 400)),
        f"{queue}.dlq": 1,
    }
    await assert_nothing_unacked(queue)
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == b'{"n": 3}'
    assert dead.properties.message_id == "mid-retry"
    headers = dead.headers or {}
    assert headers["x-error-type"] == "ValueError"
    assert headers["x-error-message"] == "bad value on attempt 3"
    assert headers["x-failed-queue"] == queue
    assert headers["x-attempt"] == 3
    check_failed_at(headers["x-failed-at"], before)
    assert app.outcomes[queue, "retry"] == 2
    assert app.outcomes[queue, "dead_letter"] == 1


# -- 4. RetryLater(delay) -> retry through a queue made on demand -------------------------


async def test_retry_later_with_own_delay(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2, 0.4)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            raise sc.RetryLater(delay=0.3)
        done.set()

    async with app.running():
        assert not await oracle.queue_exists(f"{queue}.retry.300")
        started = anyio.current_time()
        await oracle.publish(queue, b"later")
        with anyio.fail_after(DEADLINE):
            await done.wait()
        assert anyio.current_time() - started >= 0.3  # it did wait in the retry queue
        assert await oracle.queue_exists(f"{queue}.retry.300")
        # An ad-hoc retry queue (0.3 s is one of the ad-hoc steps) expires when unused.
        assert await pk.has_arguments(
            f"{queue}.retry.300",
            {**retry_arguments(queue, 300), **QUORUM_RETRY_ARGUMENTS, "x-expires": 300 + 7_200_000},
        )

    assert attempts == [1, 2]
    assert await depths(oracle, queue, (200, 300, 400)) == empty(queue, (200, 300, 400))
    await assert_nothing_unacked(queue)


# -- 5. Requeue -> nack with requeue, no attempt counted --------------------------------


async def test_requeue_redelivers_without_counting_an_attempt(
    broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bool]] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.attempt, msg.redelivered))
        if len(seen) == 1:
            raise sc.Requeue()
        done.set()

    async with app.running():
        await oracle.publish(queue, b"again")
        with anyio.fail_after(DEADLINE):
            await done.wait()

    assert seen == [(1, False), (1, True)]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "requeue"] == 1
    assert app.outcomes[queue, "ack"] == 1


# -- 6. timeout -> TimeoutError, retried like an exception --------------------------------


async def test_timeout_is_retried(broker_url: str, oracle: Oracle, names: Names) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []
    cancelled: list[int] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=0.2)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                cancelled.append(msg.attempt)
                raise
        done.set()

    async with app.running():
        await oracle.publish(queue, b"slow once")
        with anyio.fail_after(5):  # far below the 10 s the first run would take
            await done.wait()

    assert attempts == [1, 2]
    assert cancelled == [1]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)


async def test_timeout_without_retries_dead_letters_timeout_error(
    broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=0.2)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        await anyio.sleep(10)

    before = datetime.datetime.now(datetime.UTC)
    async with app.running():
        await oracle.publish(queue, b"always slow")
        with anyio.fail_after(5):
            await wait_for_count(oracle, f"{queue}.dlq", 1)

    assert attempts == [1]
    assert await depths(oracle, queue) == dead_lettered(queue)
    await assert_nothing_unacked(queue)
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == b"always slow"
    headers = dead.headers or {}
    assert headers["x-error-type"] == "TimeoutError"
    assert "0.2" in str(headers["x-error-message"])
    assert headers["x-attempt"] == 1
    assert headers["x-failed-queue"] == queue
    check_failed_at(headers["x-failed-at"], before)


# -- 7. undecodable body -> dead-letter at once, no retry -------------------------------


@pytest.mark.parametrize(
    ("body", "decode"),
    [
        pytest.param(b"{not json", "json", id="json"),
        pytest.param(b"caf\xe9 latin-1", "text", id="utf8"),
        pytest.param(b"\xff\xfe", "json", id="json-of-invalid-utf8"),
    ],
)
async def test_undecodable_body_is_dead_lettered_at_once(
    broker_url: str, oracle: Oracle, names: Names, body: bytes, decode: str
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        if decode == "json":
            msg.json()
        else:
            msg.text()

    async with app.running():
        await oracle.publish(queue, body)
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        await anyio.sleep(0.4)  # a retry would be back after 0.2 s

    assert attempts == [1]
    assert await depths(oracle, queue, (200,)) == dead_lettered(queue, (200,))
    await assert_nothing_unacked(queue)
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == body
    headers = dead.headers or {}
    assert headers["x-error-type"] == "strictconsume.DecodeError"
    assert headers["x-attempt"] == 1
    assert queue in str(headers["x-error-message"])


# -- 8. shutdown: grace period, then requeue ----------------------------------------------


async def test_shutdown_acks_finished_and_requeues_blocked(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=0.5)
    started: list[bytes] = []
    finished: list[bytes] = []
    cancelled: list[bytes] = []
    stopping = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=30.0, prefetch=10)
    async def handle(msg: sc.Message) -> None:
        started.append(msg.body)
        try:
            if msg.body == b"blocked":
                await anyio.sleep(30)
            else:
                await stopping.wait()
                await anyio.sleep(0.2)  # finishes inside the 0.5 s grace period
        except anyio.get_cancelled_exc_class():
            cancelled.append(msg.body)
            raise
        finished.append(msg.body)

    async with app.running():
        await pk.publish_many(queue, [b"quick", b"blocked"])

        async def both_running() -> bool:
            return len(started) == 2

        await wait_until(both_running, what="both handlers running")
        assert await ctl_counts(queue) in ((0, 2), None)
        stopping.set()
        leaving = anyio.current_time()
    took = anyio.current_time() - leaving

    assert 0.4 <= took < 5, took  # the grace period, not the blocked handler's 30 s
    assert sorted(started) == [b"blocked", b"quick"]
    assert finished == [b"quick"]
    assert cancelled == [b"blocked"]
    # the quick one was acked; the blocked one is back in its queue, not unacked
    assert await depths(oracle, queue, (200,)) == {**empty(queue, (200,)), queue: 1}
    await assert_nothing_unacked(queue, ready=1)
    back = await oracle.get(queue)
    assert back is not None
    assert back.body == b"blocked"
    assert back.redelivered
    assert not (back.headers or {}).get("x-attempt")  # a requeue is not an attempt
    assert app.outcomes[queue, "ack"] == 1
    assert app.outcomes[queue, "cancelled"] == 1


# -- 9. a retried message keeps its routing key ----------------------------------------


async def test_retried_message_keeps_routing_key_and_exchange(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    exchange = names.exchange()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[str, str, int]] = []
    done = anyio.Event()

    @app.consumer(
        queue,
        retry=sc.Retry(delays=(0.2,)),
        timeout=5.0,
        bindings=[sc.Binding(exchange, routing_key="order.*", exchange_type="topic")],
    )
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.exchange, msg.routing_key, msg.attempt))
        if msg.attempt == 1:
            raise RuntimeError("once more")
        done.set()

    async with app.running():
        await pk.publish(b"order", exchange=exchange, routing_key="order.created")
        with anyio.fail_after(DEADLINE):
            await done.wait()

    assert seen == [(exchange, "order.created", 1), (exchange, "order.created", 2)]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)


# -- 10. a deleted queue is redeclared and consumed again -------------------------------


async def test_deleted_queue_is_redeclared_and_consumed(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[bytes] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append(msg.body)
        done.set()

    async with app.running():
        assert await oracle.consumer_count(queue) == 1
        await oracle.delete(queue)

        async def resubscribed() -> bool:
            return await oracle.queue_exists(queue) and await oracle.consumer_count(queue) == 1

        await wait_until(resubscribed, what="the queue redeclared and consumed again")
        assert await pk.has_arguments(queue, main_arguments(queue))
        await oracle.publish(queue, b"after the delete")
        with anyio.fail_after(DEADLINE):
            await done.wait()
        assert app.ready
        assert app.reconnects == 0  # a channel-level resubscribe, not a reconnect

    assert seen == [b"after the delete"]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)


# -- 11. fatal start-up errors ----------------------------------------------------------


def _with_credentials(url: str, *, password: str | None = None, vhost: str | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    path = parts.path
    if password is not None:
        hostport = netloc.rpartition("@")[2]
        netloc = f"{urllib.parse.quote(parts.username or 'guest')}:{password}@{hostport}"
    if vhost is not None:
        path = "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


@pytest.fixture
def no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The URL given in code is the one used (the environment would override it)."""
    monkeypatch.delenv("STRICTCONSUME_URL", raising=False)
    monkeypatch.delenv("AMQP_URL", raising=False)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _never_handling_app(broker_url: str, queue: str) -> sc.App:
    """An App with one consumer of ``queue`` (retry after 0.2 s) that must never run."""
    app = sc.App(url=broker_url, grace_period=GRACE)

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("never called")

    return app


async def _start_fails(app: sc.App) -> sc.StartupError:
    handled: list[bytes] = []
    with anyio.fail_after(10), pytest.raises(sc.StartupError) as info:
        async with app.running():
            handled.append(b"entered")
    assert handled == []
    assert "\n" not in str(info.value)  # a one-line reason
    return info.value


@pytest.mark.usefixtures("no_env_url")
async def test_wrong_password_is_a_startup_error(
    broker_url: str, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    password = f"wrong-{uuid.uuid4().hex}"
    app = sc.App(url=_with_credentials(broker_url, password=password), grace_period=GRACE)
    queue = names.queue()

    @app.consumer(queue, timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("never called")

    error = await _start_fails(app)
    assert "ACCESS_REFUSED" in str(error) or "403" in str(error), str(error)
    for exc in _chain(error):
        assert password not in str(exc), exc
        assert password not in repr(exc), exc
    assert password not in caplog.text


@pytest.mark.usefixtures("no_env_url")
async def test_unknown_vhost_is_a_startup_error(
    broker_url: str, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    vhost = f"no-such-vhost-{uuid.uuid4().hex}"
    app = sc.App(url=_with_credentials(broker_url, vhost=vhost), grace_period=GRACE)
    queue = names.queue()

    @app.consumer(queue, timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        raise AssertionError("never called")

    error = await _start_fails(app)
    assert vhost in str(error), str(error)
    assert "530" in str(error) or "NOT_ALLOWED" in str(error), str(error)
    password = urllib.parse.urlsplit(broker_url).password
    if password:
        assert f":{password}@" not in str(error)


@pytest.mark.usefixtures("no_env_url")
async def test_topology_mismatch_is_a_startup_error(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    # the queue exists, durable as the App wants it, but without the dead-letter arguments
    await pk.declare_durable(queue, None)
    await oracle.publish(queue, b"already there")
    error = await _start_fails(_never_handling_app(broker_url, queue))
    assert queue in str(error), str(error)
    assert "x-dead-letter" in str(error), str(error)
    # the queue and its message were left alone
    assert await oracle.message_count(queue) == 1
    assert await pk.has_arguments(queue, {})
    assert await oracle.consumer_count(queue) == 0


@pytest.mark.usefixtures("no_env_url")
async def test_a_classic_retry_queue_of_an_earlier_version_is_a_startup_error_with_the_way_out(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    """An earlier version declared retry queues as classic queues; retry queues are
    quorum queues now. The start-up error names the queue and the command that
    deletes it once its copies have gone back, and leaves the copy where it is."""
    queue = names.queue()
    old_retry = f"{queue}.retry.200"
    await pk.declare_durable(old_retry, retry_arguments(queue, 200))
    await oracle.publish(old_retry, b"a copy on its way back")
    error = await _start_fails(_never_handling_app(broker_url, queue))
    assert f"the retry queue {old_retry!r} exists on the broker" in str(error), str(error)
    assert f"rabbitmqctl delete_queue {old_retry} --if-empty" in str(error), str(error)
    # nothing was deleted: the copy goes back to the queue as it always did
    assert await pk.has_arguments(old_retry, retry_arguments(queue, 200))
    await oracle.delete(old_retry)


# -- 12. app.publisher() ----------------------------------------------------------------


async def test_publisher_outside_and_inside_a_running_app(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[bytes, str | None, Any]] = []
    both = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.body, msg.message_id, msg.headers.get("k")))
        if len(seen) == 2:
            both.set()

    # the topology of the contract, declared ahead so that the message has a queue
    await pk.declare_durable(queue, main_arguments(queue))
    async with app.publisher() as pub:  # not running: a connection of its own
        await pub.publish(
            b"from outside", routing_key=queue, message_id="m-out", headers={"k": "v"}
        )
        # confirmed means taken by the broker
        assert await oracle.message_count(queue) == 1
        with pytest.raises(MessageReturned):
            await pub.publish(b"to nowhere", routing_key=f"{queue}-missing")

    async with app.running():
        async with app.publisher() as pub:
            with pytest.raises(MessageReturned):
                await pub.publish(b"to nowhere", routing_key=f"{queue}-missing")
            await pub.publish(b"from inside", routing_key=queue, message_id="m-in")
        with anyio.fail_after(DEADLINE):
            await both.wait()

    assert seen == [(b"from outside", "m-out", "v"), (b"from inside", "m-in", None)]
    assert not await oracle.queue_exists(f"{queue}-missing")
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)


async def test_publisher_and_retries_survive_a_closed_publishing_channel(
    broker_url: str, oracle: Oracle, names: Names
) -> None:
    """A publish to a missing exchange closes the shared confirmed channel (404); the
    next publish, and the retries that use the same channel, get a new one."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            raise RuntimeError("retry me")
        done.set()

    async with app.running():
        async with app.publisher() as pub:
            with pytest.raises(ChannelClosed) as info:
                await pub.publish(b"x", routing_key=queue, exchange=f"missing-{uuid.uuid4().hex}")
            assert info.value.reply_code == 404
            await pub.publish(b"after the 404", routing_key=queue)
        with anyio.fail_after(DEADLINE):
            await done.wait()
        assert app.reconnects == 0

    assert attempts == [1, 2]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)


# -- 13. concurrency below prefetch ---------------------------------------------------


async def test_concurrency_limits_running_handlers(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    running = 0
    peak = 0
    done: list[bytes] = []
    gate = anyio.Event()
    all_done = anyio.Event()
    bodies = [f"m{i}".encode() for i in range(10)]

    @app.consumer(queue, prefetch=10, concurrency=2, retry=sc.Retry(delays=(0.2,)), timeout=10.0)
    async def handle(msg: sc.Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await gate.wait()
            await anyio.sleep(0.02)
        finally:
            running -= 1
        done.append(msg.body)
        if len(done) == len(bodies):
            all_done.set()

    async with app.running():
        await pk.publish_many(queue, bodies)

        async def prefetched() -> bool:
            # all 10 delivered (prefetch 10), two of them running (concurrency 2)
            return running == 2 and await oracle.message_count(queue) == 0

        await wait_until(prefetched, what="10 messages delivered, 2 handlers running")
        assert await ctl_counts(queue) in ((0, 10), None)
        await anyio.sleep(0.2)
        assert running == 2
        assert peak == 2
        gate.set()
        with anyio.fail_after(DEADLINE):
            await all_done.wait()

    assert peak == 2
    assert sorted(done) == sorted(bodies)
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "ack"] == 10


# -- more of sections 3 to 5 ----------------------------------------------------------


async def test_slow_message_does_not_hold_back_the_prefetch_window(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    """Finished messages above a still-running one are acked at once (section 4): with
    prefetch 3, five quick messages behind a blocked one all get through."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    release = anyio.Event()
    quick_done: list[bytes] = []
    all_quick = anyio.Event()
    slow_done = anyio.Event()
    quick = [f"quick-{i}".encode() for i in range(5)]

    @app.consumer(queue, prefetch=3, retry=sc.Retry(delays=(0.2,)), timeout=10.0)
    async def handle(msg: sc.Message) -> None:
        if msg.body == b"slow":
            await release.wait()
            slow_done.set()
            return
        quick_done.append(msg.body)
        if len(quick_done) == len(quick):
            all_quick.set()

    async with app.running():
        await pk.publish_many(queue, [b"slow", *quick])
        with anyio.fail_after(DEADLINE):
            await all_quick.wait()

        async def only_slow_unacked() -> bool:
            return await ctl_counts(queue) in ((0, 1), None)

        await wait_until(only_slow_unacked, what="only the slow message unacked")
        assert not slow_done.is_set()
        release.set()
        with anyio.fail_after(DEADLINE):
            await slow_done.wait()

        async def all_acked() -> bool:
            return await ctl_counts(queue) in ((0, 0), None)

        await wait_until(all_acked, what="every message acked")

    assert sorted(quick_done) == quick
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "ack"] == 6


async def test_shutdown_returns_prefetched_messages_not_started(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    """With concurrency below prefetch, messages delivered but waiting for a slot go
    back to the queue on shutdown, as do the ones cancelled after the grace."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=0.3)
    running = 0
    cancelled = 0
    bodies = [f"m{i}".encode() for i in range(10)]

    @app.consumer(queue, prefetch=10, concurrency=2, retry=sc.Retry(delays=(0.2,)), timeout=30.0)
    async def handle(msg: sc.Message) -> None:
        nonlocal running, cancelled
        running += 1
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            cancelled += 1
            raise

    async with app.running():
        await pk.publish_many(queue, bodies)

        async def all_delivered() -> bool:
            return running == 2 and await oracle.message_count(queue) == 0

        await wait_until(all_delivered, what="10 delivered, 2 running")
        leaving = anyio.current_time()
    took = anyio.current_time() - leaving

    assert took < 3, took
    assert running == 2
    assert cancelled == 2
    assert await depths(oracle, queue, (200,)) == {**empty(queue, (200,)), queue: 10}
    await assert_nothing_unacked(queue, ready=10)
    returned = []
    for _ in bodies:
        got = await oracle.get(queue)
        assert got is not None
        returned.append(got.body)
    assert sorted(returned) == sorted(bodies)


async def test_failures_during_the_grace_period_are_retried_and_dead_lettered(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    """A handler that fails while the App stops still gets its outcome: the retry copy
    and the dead letter are published (the publishing channel outlives the consumers)."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=2.0)
    started: list[bytes] = []
    stopping = anyio.Event()

    @app.consumer(queue, prefetch=10, retry=sc.Retry(delays=(0.2,)), timeout=30.0)
    async def handle(msg: sc.Message) -> None:
        started.append(msg.body)
        await stopping.wait()
        await anyio.sleep(0.1)
        if msg.body == b"reject":
            raise sc.Reject("rejected while stopping")
        raise ValueError("failed while stopping")

    async with app.running():
        await pk.publish_many(queue, [b"reject", b"retry"])

        async def both_running() -> bool:
            return len(started) == 2

        await wait_until(both_running, what="both handlers running")
        stopping.set()

    assert sorted(started) == [b"reject", b"retry"]
    # the retry copy comes back from <queue>.retry.200 to the queue, with attempt 2
    await wait_for_count(oracle, queue, 1)
    assert await depths(oracle, queue, (200,)) == {
        **empty(queue, (200,)),
        queue: 1,
        f"{queue}.dlq": 1,
    }
    await assert_nothing_unacked(queue, ready=1)
    back = await oracle.get(queue)
    assert back is not None
    assert back.body == b"retry"
    assert (back.headers or {}).get("x-attempt") == 2
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == b"reject"
    assert (dead.headers or {})["x-error-message"] == "rejected while stopping"


async def test_second_stop_skips_the_grace_period(
    broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=20.0)
    started = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=60.0)
    async def handle(msg: sc.Message) -> None:
        started.set()
        await anyio.sleep(60)

    async with app.running():
        await oracle.publish(queue, b"blocked")
        with anyio.fail_after(DEADLINE):
            await started.wait()
        leaving = anyio.current_time()
        app.stop()
        app.stop()
    took = anyio.current_time() - leaving

    assert took < 3, took  # not the 20 s grace period
    assert await depths(oracle, queue, (200,)) == {**empty(queue, (200,)), queue: 1}
    await assert_nothing_unacked(queue, ready=1)


async def test_dead_letter_does_not_keep_the_message_expiration(
    broker_url: str, oracle: Oracle, pk: Pika, names: Names
) -> None:
    """A dead letter must stay in the dlq. RabbitMQ's own dead-lettering drops the
    per-message ``expiration`` for that reason; a copy that keeps it expires from the
    dlq (which has no dead-letter exchange) and is lost."""
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    calls: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        calls.append(msg.attempt)
        raise sc.Reject("no")

    async with app.running():
        await pk.publish(b"short-lived", routing_key=queue, expiration="500")
        await wait_for_count(oracle, f"{queue}.dlq", 1)
    await anyio.sleep(0.8)  # past the message's 500 ms expiration

    assert calls == [1]
    assert await depths(oracle, queue) == dead_lettered(queue)
    dead = await get_dead_letter(oracle, queue)
    assert dead.body == b"short-lived"
    assert dead.properties.expiration is None


async def test_deleted_dead_letter_queue_is_redeclared(
    broker_url: str, oracle: Oracle, names: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """As for a deleted retry queue, a dead letter whose dlq was deleted declares it
    again instead of requeueing the message to be handled (and fail) over and over."""
    caplog.set_level(logging.CRITICAL, logger="strictconsume")  # one line per failed run
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    calls: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        calls.append(msg.attempt)
        raise sc.Reject("to the dlq")

    async with app.running():
        await oracle.delete(f"{queue}.dlq")
        await oracle.publish(queue, b"reject me")

        async def dead_lettered_once() -> bool:
            return (
                await oracle.queue_exists(f"{queue}.dlq")
                and await oracle.message_count(f"{queue}.dlq") == 1
            )

        try:
            await wait_until(dead_lettered_once, within=2, what="the dead letter in a new dlq")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; meanwhile the handler ran {len(calls)} times") from None
    assert calls == [1]
    assert await depths(oracle, queue) == dead_lettered(queue)


async def test_deleted_retry_queue_is_redeclared(
    broker_url: str, oracle: Oracle, names: Names
) -> None:
    queue = names.queue()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[int] = []
    done = anyio.Event()

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt == 1:
            raise ValueError("retry me")
        done.set()

    async with app.running():
        await oracle.delete(f"{queue}.retry.200")
        await oracle.publish(queue, b"retry me")
        with anyio.fail_after(DEADLINE):
            await done.wait()
        assert await oracle.queue_exists(f"{queue}.retry.200")

    assert attempts == [1, 2]
    assert await depths(oracle, queue, (200,)) == empty(queue, (200,))
    await assert_nothing_unacked(queue)
