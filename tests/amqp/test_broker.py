"""The AMQP client against a real RabbitMQ, with pika as the independent oracle.

Each test runs on trio and on asyncio. pika (``tests/amqp/oracle.py``) runs in a
worker thread and says what the broker holds: message counts, what a message looks
like to another client, whether a queue exists. Queue names are unique per test
(uuid) and deleted at the end.

Tests that administer the broker (``broker_ctl``: the memory alarm,
close_all_connections, a second TLS node) are skipped when the broker comes from
STRICTCONSUME_URL / AMQP_URL. They affect every connection of the broker, so this file
must not run in parallel with other broker tests.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
import os
import shutil
import socket
import ssl
import struct
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import pytest
import trustme

from strictconsume.amqp import (
    ChannelClosed,
    ConnectionClosed,
    ConnectionLost,
    ConsumerCancelled,
    GetResult,
    MessageReturned,
    Properties,
    PublishNacked,
    UnsupportedSetting,
    connect,
    parse_url,
)

from ..conftest import dev_broker, external_broker_url, free_node_port
from .oracle import Oracle

pytestmark = [pytest.mark.broker, pytest.mark.anyio]


@pytest.fixture
def oracle(broker_url: str) -> Oracle:
    return Oracle(broker_url)


@pytest.fixture
def new_queue(oracle: Oracle) -> Iterator[Callable[[], str]]:
    """Make unique queue names; every queue made is deleted (through pika) afterwards."""
    names: list[str] = []

    def make() -> str:
        name = f"test-broker-{uuid.uuid4().hex}"
        names.append(name)
        return name

    yield make
    for name in names:
        oracle.delete_now(name)


def _digest(body: bytes) -> tuple[int, str]:
    """Length and SHA-256 of a body, so that a mismatch does not print megabytes."""
    return len(body), hashlib.sha256(body).hexdigest()


def _url_with(url: str, *, password: str | None = None, vhost: str | None = None) -> str:
    """``url`` with another password or vhost (the rest as given)."""
    params = parse_url(url)
    user = urllib.parse.quote(params.username, safe="")
    secret = urllib.parse.quote(params.password if password is None else password, safe="")
    path = urllib.parse.quote(params.vhost if vhost is None else vhost, safe="")
    host = f"[{params.host}]" if ":" in params.host else params.host
    scheme = "amqps" if params.tls else "amqp"
    return f"{scheme}://{user}:{secret}@{host}:{params.port}/{path}"


async def _ctl(*args: str) -> None:
    """rabbitmqctl against the session's broker, in a thread (it takes ~0.3-1 s)."""
    await anyio.to_thread.run_sync(lambda: dev_broker("ctl", *args))


async def _wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``condition`` until it holds; the caller bounds the wait.

    Only for broker state that nothing announces: the client has no event for "the
    broker blocked us", and pika cannot wait for a queue's count.
    """
    while True:
        if await condition():
            return
        await anyio.sleep(0.02)


async def _settled_count(oracle: Oracle, queue: str, expected: int) -> int:
    """The ready count of ``queue`` once it reached ``expected`` (or after 5 s).

    Requeues by nack, reject, recover or a consumer's exit reach the queue
    asynchronously: RabbitMQ can answer a queue.declare before it applied a requeue
    sent just before it, even on the same channel (its stat call to the queue process
    is prioritised over the requeue; seen on 3.10: 5 ready instead of 9). So a count
    that goes up by requeueing is polled for.
    """

    async def settled() -> bool:
        return await oracle.message_count(queue) == expected

    with anyio.move_on_after(5):
        await _wait_for(settled)
    return await oracle.message_count(queue)


# -- volume, size -------------------------------------------------------------------------

MESSAGES = 10_000
PUBLISHERS = 20


async def test_ten_thousand_confirmed_messages_are_consumed_exactly_once(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    bodies = {f"message-{i:05d}".encode() for i in range(MESSAGES)}
    received: list[bytes] = []
    with anyio.fail_after(90):
        async with connect(broker_url) as conn:
            async with conn.channel(confirms=True) as pub:
                await pub.queue_declare(queue)

                async def publish_every_nth(first: int) -> None:
                    # Several publishers share the channel: their confirms interleave.
                    for i in range(first, MESSAGES, PUBLISHERS):
                        await pub.publish(f"message-{i:05d}".encode(), routing_key=queue)

                async with anyio.create_task_group() as tg:
                    for first in range(PUBLISHERS):
                        tg.start_soon(publish_every_nth, first)
            # Every publish returned, so every message was confirmed: all are stored.
            assert await oracle.message_count(queue) == MESSAGES

            async with conn.channel() as ch:
                await ch.qos(200)
                async with ch.consume(queue) as consumer:
                    async for delivery in consumer:
                        assert not delivery.redelivered
                        assert (delivery.exchange, delivery.routing_key) == ("", queue)
                        received.append(delivery.body)
                        await ch.ack(delivery.delivery_tag)
                        if len(received) == MESSAGES:
                            break
                # Nothing is left ready while we are still connected ...
                assert await oracle.message_count(queue) == 0
        # ... and nothing was left unacked either: unacked messages would have
        # returned to the queue (as ready) when our connection closed.
        assert await oracle.message_count(queue) == 0
    assert len(received) == MESSAGES
    assert set(received) == bodies, "every body must arrive exactly once"


async def test_five_megabyte_bodies_round_trip_in_both_directions(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    size = 5 * 1024 * 1024
    for_us, for_oracle, from_oracle = os.urandom(size), os.urandom(size), os.urandom(size)
    with anyio.fail_after(60):
        async with connect(broker_url) as conn:
            # The bodies span dozens of frames each way.
            assert size > 30 * conn.frame_max
            async with conn.channel(confirms=True) as ch:
                await ch.queue_declare(queue)

                await ch.publish(for_us, routing_key=queue)
                async with ch.consume(queue) as consumer:
                    delivery = await anext(consumer)
                    await ch.ack(delivery.delivery_tag)
                assert _digest(delivery.body) == _digest(for_us)

                await ch.publish(for_oracle, routing_key=queue)
                seen = await oracle.get(queue)
                assert seen is not None
                assert _digest(seen.body) == _digest(for_oracle)

                await oracle.publish(queue, from_oracle)
                result = await ch.get(queue, no_ack=True)
                assert result is not None
                assert _digest(result.body) == _digest(from_oracle)
                assert result.message_count == 0
        assert await oracle.message_count(queue) == 0


def least_frame_max(version: tuple[int, int, int]) -> int:
    """The smallest frame_max the broker accepts: 8192 from RabbitMQ 4.1, else 4096."""
    return 8192 if version[:2] >= (4, 1) else 4096


async def test_bodies_at_frame_boundaries_round_trip_in_both_directions(
    broker_url: str,
    broker_version: tuple[int, int, int],
    oracle: Oracle,
    new_queue: Callable[[], str],
) -> None:
    queue = new_queue()
    least = least_frame_max(broker_version)
    url = broker_url + ("&" if "?" in broker_url else "?") + f"frame_max={least}"
    async with connect(url) as conn, conn.channel(confirms=True) as ch:
        assert conn.frame_max == least
        assert conn.server_version == broker_version
        chunk = conn.frame_max - 8  # a body frame's 7 header bytes and its frame-end
        await ch.queue_declare(queue)
        for size in (0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 2 * chunk + 1):
            ours, theirs = os.urandom(size), os.urandom(size)
            # We split, pika (frame_max 131072) reads ...
            await ch.publish(ours, routing_key=queue)
            seen = await oracle.get(queue)
            assert seen is not None
            assert (size, seen.body) == (size, ours)
            # ... and we assemble what the broker splits at our frame_max.
            await oracle.publish(queue, theirs)
            result = await ch.get(queue, no_ack=True)
            assert result is not None
            assert (size, result.body) == (size, theirs)
    assert await oracle.message_count(queue) == 0


async def test_a_frame_max_below_the_brokers_least_is_refused_before_it_is_sent(
    broker_url: str, broker_version: tuple[int, int, int]
) -> None:
    """RabbitMQ 4.1 and later drop the socket, without a reason, on a tune-ok with a
    frame_max below 8192; the client says why instead, before sending it."""
    url = broker_url + ("&" if "?" in broker_url else "?") + "frame_max=4096"
    if least_frame_max(broker_version) == 4096:
        async with connect(url) as conn:
            assert conn.frame_max == 4096
        return
    with anyio.fail_after(10), pytest.raises(UnsupportedSetting) as info:
        async with connect(url):
            pytest.fail("connected with frame_max 4096")
    assert "frame_max 4096 is below 8192" in str(info.value)
    assert "this broker is " + ".".join(map(str, broker_version)) in str(info.value)


# -- field tables -------------------------------------------------------------------------


def _exact(value: object) -> object:
    """``value`` with every leaf's type made explicit, so that the comparison is exact.

    Plain ``==`` would accept ``True == 1``, ``b"x" == bytearray(b"x")`` and
    ``Decimal("1.5") == Decimal("1.50")``. pika returns 64-bit ints as its
    ``compat.long``, an ``int`` subclass: that is an int.
    """
    if isinstance(value, dict):
        return {key: _exact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_exact(item) for item in value]
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", int(value))
    if isinstance(value, decimal.Decimal):
        return ("Decimal", str(value))
    if isinstance(value, datetime.datetime):
        return ("datetime", value.isoformat())
    return (type(value).__name__, value)


def _single(value: float) -> float:
    """``value`` rounded to single precision, as pamqp's 'f' field carries it."""
    return float(struct.unpack(">f", struct.pack(">f", value))[0])


TIMESTAMP = datetime.datetime(2024, 2, 29, 23, 59, 59, tzinfo=datetime.UTC)

# Headers as we publish them. pamqp (our codec) encodes: bool as 't'; an int as the
# smallest of 'b' (int8), 's' (int16), 'u' (uint16), 'I' (int32), 'i' (uint32),
# 'l' (int64); float as 'f' (single precision); Decimal as 'D' (scale, int32);
# str as 'S'; datetime as 'T' (whole seconds, UTC); bytearray as 'x' (pamqp refuses
# bytes; our Channel.publish turns bytes into bytearray first, at any depth, so both
# are published here); None as 'V'; dict as 'F'; list as 'A'.
OUR_HEADERS: dict[str, Any] = {
    "true": True,
    "false": False,
    "zero": 0,
    "int8-min": -128,
    "int8-max": 127,
    "int16-min": -32768,
    "int16-max": 32767,
    "uint16-max": 65535,
    "int32-min": -(2**31),
    "int32-max": 2**31 - 1,
    "uint32-max": 2**32 - 1,
    "int64-min": -(2**63),
    "int64-max": 2**63 - 1,
    "float": 1.5,
    "negative-float": -2.75,
    "inexact-float": 0.1,
    "decimal": decimal.Decimal("3.14"),
    "negative-decimal": decimal.Decimal("-0.005"),
    "integral-decimal": decimal.Decimal("42"),
    "timestamp": TIMESTAMP,
    "string": "plain",
    "unicode": "h\u00e9llo w\u00f6rld \u2713",
    "empty-string": "",
    "bytes": bytearray(b"\x00\x01\xfe\xff"),
    "plain-bytes": b"\xde\xad",
    "void": None,
    "table": {"nested": {"deeper": {"level": 3}}, "empty": {}, "raw": b"\x01"},
    "array": [1, "two", None, True, [3, [-4]], {"k": "v"}, decimal.Decimal("0.5"), b"\x02"],
    "empty-array": [],
}


async def test_field_table_values_published_by_us_arrive_at_the_oracle(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue)
        mine = Properties(headers=OUR_HEADERS)
        await ch.publish(b"for pika", routing_key=queue, properties=mine)
        # The caller's properties and headers are not changed by the bytes conversion.
        assert mine.headers is OUR_HEADERS
        assert type(OUR_HEADERS["plain-bytes"]) is bytes
        await ch.publish(b"for us", routing_key=queue, properties=Properties(headers=OUR_HEADERS))
        seen = await oracle.get(queue)
        ours = await ch.get(queue, no_ack=True)
    assert seen is not None
    assert seen.body == b"for pika"
    # What pika makes of it: the same, except that pika decodes 'f' and 'd' through
    # int() (1.5 -> 1, -2.75 -> -2, 0.1 -> 0) and 'x' as bytes.
    assert _exact(seen.headers) == _exact(
        {
            **OUR_HEADERS,
            "float": 1,
            "negative-float": -2,
            "inexact-float": 0,
            "bytes": b"\x00\x01\xfe\xff",
            "plain-bytes": b"\xde\xad",
            "table": {**OUR_HEADERS["table"], "raw": b"\x01"},
            "array": [*OUR_HEADERS["array"][:-1], b"\x02"],
        }
    )
    # Read back by us, every value is what we sent (a float travels as a double, so
    # 0.1 arrives exactly), except that a byte array decodes as bytearray whether it
    # was published from bytes or bytearray.
    assert ours is not None
    assert ours.body == b"for us"
    assert _exact(ours.properties.headers) == _exact(
        {
            **OUR_HEADERS,
            "plain-bytes": bytearray(b"\xde\xad"),
            "table": {**OUR_HEADERS["table"], "raw": bytearray(b"\x01")},
            "array": [*OUR_HEADERS["array"][:-1], bytearray(b"\x02")],
        }
    )


# Headers as pika publishes them. pika encodes: bool as 't'; an int as 'I' (int32)
# when it fits, else 'l' (int64); Decimal as 'D' after normalize() (so 1.50 goes as
# 1.5 and 100 as scale 0, 100); str as 'S'; bytes as 'x'; datetime as 'T'; None as
# 'V'; dict as 'F'; list as 'A'. It cannot encode a float at all.
ORACLE_HEADERS: dict[str, Any] = {
    "true": True,
    "false": False,
    "zero": 0,
    "minus-one": -1,
    "int32-min": -(2**31),
    "int32-max": 2**31 - 1,
    "above-int32": 2**31,
    "int64-min": -(2**63),
    "int64-max": 2**63 - 1,
    "decimal": decimal.Decimal("3.14"),
    "trailing-zero-decimal": decimal.Decimal("1.50"),
    "integral-decimal": decimal.Decimal("100"),
    "negative-decimal": decimal.Decimal("-0.005"),
    "timestamp": TIMESTAMP,
    "string": "plain",
    "unicode": "h\u00e9llo w\u00f6rld \u2713",
    "empty-string": "",
    "bytes": b"\x00\x01\xfe\xff",
    "void": None,
    "table": {"nested": {"deeper": {"level": 3}}, "empty": {}},
    "array": [1, "two", None, False, [3, [-4]], {"k": "v"}, decimal.Decimal("0.5")],
    "empty-array": [],
}


async def test_field_table_values_published_by_the_oracle_arrive_at_us(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    await oracle.declare(queue)
    await oracle.publish(queue, b"from pika", headers=ORACLE_HEADERS)
    async with (
        connect(broker_url) as conn,
        conn.channel() as ch,
        ch.consume(queue) as consumer,
    ):
        delivery = await anext(consumer)
        await ch.ack(delivery.delivery_tag)
    assert delivery.body == b"from pika"
    # What pamqp makes of it: 'x' decodes as bytearray, and the decimal that pika
    # normalized arrives normalized; everything else as pika was given it.
    assert _exact(delivery.properties.headers) == _exact(
        {
            **ORACLE_HEADERS,
            "trailing-zero-decimal": decimal.Decimal("1.5"),
            "bytes": bytearray(b"\x00\x01\xfe\xff"),
        }
    )
    assert await oracle.message_count(queue) == 0


# -- publishing that does not reach a queue ------------------------------------------------


async def test_unroutable_mandatory_publish_raises_message_returned(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    nowhere = f"test-broker-no-such-queue-{uuid.uuid4().hex}"
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        with pytest.raises(MessageReturned) as info:
            await ch.publish(b"lost", routing_key=nowhere, mandatory=True)
        err = info.value
        assert (err.reply_code, err.reply_text, err.exchange, err.routing_key) == (
            312,
            "NO_ROUTE",
            "",
            nowhere,
        )
        assert nowhere in str(err)
        # The channel and the connection go on.
        assert ch.is_open
        assert conn.is_open
        await ch.queue_declare(queue)
        await ch.publish(b"routed", routing_key=queue, mandatory=True)
        assert await oracle.message_count(queue) == 1

        # Many pipelined publishes, routable and not: each return reaches the
        # publish it belongs to, and only that one.
        outcomes: dict[int, str] = {}

        async def publish(i: int) -> None:
            key = queue if i % 3 else f"{nowhere}-{i}"
            try:
                await ch.publish(b"%d" % i, routing_key=key, mandatory=True)
            except MessageReturned as exc:
                outcomes[i] = exc.routing_key
            else:
                outcomes[i] = "stored"

        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(publish, i)
        assert outcomes == {i: "stored" if i % 3 else f"{nowhere}-{i}" for i in range(60)}
        assert await oracle.message_count(queue) == 1 + 40


async def test_publish_the_broker_nacks_raises_publish_nacked(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        await ch.publish(b"first", routing_key=queue)
        with pytest.raises(PublishNacked) as info:
            await ch.publish(b"second", routing_key=queue)
        assert (info.value.exchange, info.value.routing_key) == ("", queue)
        assert ch.is_open
        assert await oracle.message_count(queue) == 1
        seen = await oracle.get(queue)
        assert seen is not None
        assert seen.body == b"first"
        # Room again: the next publish is confirmed.
        await ch.publish(b"third", routing_key=queue)
    assert await oracle.message_count(queue) == 1


# -- settling ------------------------------------------------------------------------------


async def test_nack_reject_and_recover_settle_exactly_what_they_name(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue)
        for i in range(6):
            await ch.publish(b"%d" % i, routing_key=queue)
        fetched = [await ch.get(queue) for _ in range(4)]
        tags = [result.delivery_tag for result in fetched if result is not None]
        assert [r.body for r in fetched if r is not None] == [b"0", b"1", b"2", b"3"]
        await ch.nack(tags[1], multiple=True, requeue=False)  # drops 0 and 1
        await ch.reject(tags[2], requeue=True)  # 2 goes back
        await ch.recover(requeue=True)  # 3, still unacked, goes back
        assert await _settled_count(oracle, queue, 4) == 4
        rest = []
        while (result := await ch.get(queue, no_ack=True)) is not None:
            rest.append((result.body, result.redelivered))
    assert sorted(rest) == [(b"2", True), (b"3", True), (b"4", False), (b"5", False)]
    assert await oracle.message_count(queue) == 0


async def test_leaving_a_consumer_requeues_the_deliveries_it_did_not_yield(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue)
        for i in range(10):
            await ch.publish(b"%d" % i, routing_key=queue)
        await ch.qos(5)
        with anyio.fail_after(10):
            async with ch.consume(queue) as consumer:
                first = await anext(consumer)
        # The broker had sent 5 (the prefetch); the 4 never yielded were nacked with
        # requeue on exit. The one yielded is the caller's to settle, even after the
        # consumer is cancelled.
        await ch.ack(first.delivery_tag)
        assert await _settled_count(oracle, queue, 9) == 9
        assert await oracle.consumer_count(queue) == 0
    assert await oracle.message_count(queue) == 9
    rest = [await oracle.get(queue) for _ in range(9)]
    assert sorted(m.body for m in rest if m is not None) == sorted(
        b"%d" % i for i in range(10) if b"%d" % i != first.body
    )
    assert sum(m.redelivered for m in rest if m is not None) == 4
    assert await oracle.message_count(queue) == 0


# -- channel and consumer failures ---------------------------------------------------------


async def test_ack_of_an_unknown_delivery_tag_closes_only_that_channel(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as other:
        await other.queue_declare(queue)
        async with conn.channel() as broken:
            await broken.ack(4242)  # no round trip: the broker answers with channel.close
            with anyio.fail_after(5), pytest.raises(ChannelClosed) as info:
                await broken.queue_declare(queue, passive=True)
            err = info.value
            assert err.reply_code == 406
            assert err.channel_id == broken.channel_id
            assert "PRECONDITION_FAILED" in err.reply_text
            assert "4242" in err.reply_text
            assert not broken.is_open
            # Every later call says the same.
            with pytest.raises(ChannelClosed) as again:
                await broken.publish(b"x", routing_key=queue)
            assert again.value.reply_code == 406
        # The other channel of the connection goes on ...
        assert conn.is_open
        await other.publish(b"via the other channel", routing_key=queue)
        # ... and so does a new one.
        async with conn.channel() as fresh:
            result = await fresh.get(queue, no_ack=True)
            assert result is not None
            assert result.body == b"via the other channel"
    assert await oracle.message_count(queue) == 0


async def test_deleting_the_queue_under_a_consumer_ends_it_with_consumer_cancelled(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue)
        await ch.publish(b"before", routing_key=queue)
        with anyio.fail_after(10):
            async with ch.consume(queue) as consumer:
                delivery = await anext(consumer)
                assert delivery.body == b"before"
                await ch.ack(delivery.delivery_tag)
                await oracle.delete(queue)
                with pytest.raises(ConsumerCancelled) as info:
                    await anext(consumer)
                assert info.value.consumer_tag == consumer.consumer_tag
                assert info.value.queue == queue
                assert queue in str(info.value)
                # The iterator stays ended.
                with pytest.raises(ConsumerCancelled):
                    await anext(consumer)
        # The channel survives: declare the queue again and resubscribe.
        assert ch.is_open
        await ch.queue_declare(queue)
        await ch.publish(b"after", routing_key=queue)
        with anyio.fail_after(10):
            async with ch.consume(queue) as again:
                delivery = await anext(again)
                assert delivery.body == b"after"
                await ch.ack(delivery.delivery_tag)
    assert await oracle.message_count(queue) == 0


# -- the broker's resource alarm -----------------------------------------------------------


async def test_memory_alarm_blocks_a_publishing_connection_until_it_clears(
    broker_url: str, broker_ctl: None, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    published = while_blocked = 0
    stop = anyio.Event()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue)
        initially = conn.blocked
        assert initially is None

        async def publish_until_stopped() -> None:
            nonlocal published
            while not stop.is_set():
                await ch.publish(b"%d" % published, routing_key=queue)
                published += 1

        async with anyio.create_task_group() as tg:
            try:
                await _ctl("set_vm_memory_high_watermark", "0.0000001")
                tg.start_soon(publish_until_stopped)

                # RabbitMQ blocks a connection (and says so) when it publishes.
                async def is_blocked() -> bool:
                    return conn.blocked is not None

                with anyio.fail_after(15):
                    await _wait_for(is_blocked)
                reason = conn.blocked
                assert reason == "low on memory"
                # While blocked, no publish completes.
                await anyio.sleep(0.5)
                while_blocked = published
                await anyio.sleep(0.5)
                assert published == while_blocked
                still = conn.blocked  # (a local: mypy would narrow the property)
                assert still == reason
            finally:
                with anyio.CancelScope(shield=True):
                    await _ctl("set_vm_memory_high_watermark", "0.4")
            with anyio.fail_after(15):
                await conn.wait_unblocked()
            assert conn.blocked is None
            stop.set()  # the publisher ends once its waiting publish is confirmed
        assert published > while_blocked
        assert conn.is_open
    assert await oracle.message_count(queue) == published


# -- refused connections -------------------------------------------------------------------


async def test_wrong_password_fails_fast_with_access_refused(broker_url: str) -> None:
    password = f"wrong-{uuid.uuid4().hex}"
    url = _url_with(broker_url, password=password)
    with anyio.fail_after(5), pytest.raises(ConnectionClosed) as info:
        async with connect(url):
            pytest.fail("connected with a wrong password")
    err = info.value
    assert err.reply_code == 403
    assert "ACCESS_REFUSED" in str(err)
    chain: list[BaseException] = [err]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    for exc in chain:
        assert password not in str(exc)
        assert password not in repr(exc)


async def test_unknown_vhost_fails_with_not_allowed_naming_it(broker_url: str) -> None:
    vhost = f"test-broker-no-such-vhost-{uuid.uuid4().hex}"
    with anyio.fail_after(5), pytest.raises(ConnectionClosed) as info:
        async with connect(_url_with(broker_url, vhost=vhost)):
            pytest.fail("connected to a vhost that does not exist")
    err = info.value
    assert err.reply_code == 530
    assert "NOT_ALLOWED" in str(err)
    assert vhost in str(err)


# -- TLS ------------------------------------------------------------------------------------


@attrs.frozen
class TLSNode:
    ca: trustme.CA
    tls_port: int


@pytest.fixture(scope="module")
def tls_node() -> Iterator[TLSNode]:
    """A second private node with a TLS listener, booted once for both backends."""
    if external_broker_url() is not None:
        pytest.skip("starts a private node; the broker comes from STRICTCONSUME_URL")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    # Not pytest's tmp_path: /tmp/pytest-of-root is 0700, and the node runs as rabbitmq.
    directory = Path(tempfile.mkdtemp(prefix="strictconsume-tls-"))
    name = f"tls{uuid.uuid4().hex[:8]}"
    port = free_node_port(set())
    tls_port = free_node_port({port, port + 10000, port + 20000})
    node = ("--name", name, "--port", str(port))
    try:
        directory.chmod(0o755)
        ca_file, cert_file, key_file = (directory / n for n in ("ca.pem", "cert.pem", "key.pem"))
        ca.cert_pem.write_to_path(str(ca_file))
        server.cert_chain_pems[0].write_to_path(str(cert_file))
        server.private_key_pem.write_to_path(str(key_file))
        for path in (ca_file, cert_file, key_file):
            path.chmod(0o644)
        dev_broker(
            *node,
            "start",
            "--tls-port",
            str(tls_port),
            "--tls-cert",
            str(cert_file),
            "--tls-key",
            str(key_file),
            "--tls-ca",
            str(ca_file),
        )
        # dev-broker waits for the plain listener; the TLS one opens alongside it.
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", tls_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield TLSNode(ca, tls_port)
    finally:
        dev_broker(*node, "purge", check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
async def test_amqps_with_a_trusted_ca_round_trips_a_message(tls_node: TLSNode) -> None:
    # The certificate names 127.0.0.1 too: the address needs no name resolution (a
    # fresh Debian root has no /etc/hosts entry for localhost).
    url = f"amqps://guest:guest@127.0.0.1:{tls_node.tls_port}/"
    context = ssl.create_default_context()
    tls_node.ca.configure_trust(context)
    queue = f"test-broker-tls-{uuid.uuid4().hex}"
    body = os.urandom(300_000)  # more than one frame over TLS
    with anyio.fail_after(20):
        async with connect(url, ssl_context=context) as conn, conn.channel(confirms=True) as ch:
            assert conn.params.tls
            await ch.queue_declare(queue)
            await ch.publish(body, routing_key=queue, mandatory=True)
            result = await ch.get(queue, no_ack=True)
            assert result is not None
            assert _digest(result.body) == _digest(body)
            assert await ch.queue_delete(queue) == 0


@pytest.mark.slow
async def test_amqps_without_trusting_the_ca_fails_naming_the_certificate(
    tls_node: TLSNode,
) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{tls_node.tls_port}/"
    with anyio.fail_after(20), pytest.raises(ConnectionLost) as info:
        async with connect(url):
            pytest.fail("connected to a broker whose certificate is not trusted")
    assert "certificate" in str(info.value)


# -- the broker closes the connection -------------------------------------------------------


async def test_connection_closed_by_an_operator_raises_connection_forced(
    broker_url: str, broker_ctl: None, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    subscribed = anyio.Event()
    raised_at: float | None = None
    error: ConnectionClosed | None = None

    async def consume() -> None:
        nonlocal raised_at, error
        try:
            async with connect(broker_url) as conn, conn.channel() as ch:
                await ch.queue_declare(queue)
                async with ch.consume(queue) as consumer:
                    subscribed.set()
                    async for _ in consumer:
                        pytest.fail("nothing was published")
        except ConnectionClosed as exc:
            raised_at = anyio.current_time()
            error = exc

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await subscribed.wait()
            await _ctl("close_all_connections", "test")
            closed_at = anyio.current_time()
    assert error is not None, "the async with connect() must raise ConnectionClosed"
    assert raised_at is not None
    assert error.reply_code == 320
    assert "CONNECTION_FORCED" in str(error)
    assert "test" in error.reply_text
    # Promptly: by the time rabbitmqctl returns, or right after.
    assert raised_at - closed_at < 3.0


# -- basic.get, passive declare ------------------------------------------------------------


async def test_get_returns_none_on_an_empty_queue_and_the_message_otherwise(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    queue = new_queue()
    async with connect(broker_url) as conn, conn.channel(confirms=True) as ch:
        await ch.queue_declare(queue)
        assert await ch.get(queue) is None
        for body in (b"one", b"two", b"three"):
            await ch.publish(body, routing_key=queue)
        first = await ch.get(queue)
        assert isinstance(first, GetResult)
        assert (first.body, first.message_count, first.redelivered) == (b"one", 2, False)
        assert (first.exchange, first.routing_key) == ("", queue)
        await ch.ack(first.delivery_tag)
        second = await ch.get(queue, no_ack=True)
        assert second is not None
        assert (second.body, second.message_count) == (b"two", 1)
        assert await oracle.message_count(queue) == 1
        third = await ch.get(queue)
        assert third is not None
        assert (third.body, third.message_count) == (b"three", 0)
        await ch.ack(third.delivery_tag)
        assert await ch.get(queue) is None
    assert await oracle.message_count(queue) == 0


async def test_passive_declare_of_a_missing_queue_raises_not_found(
    broker_url: str, oracle: Oracle, new_queue: Callable[[], str]
) -> None:
    missing = new_queue()
    async with connect(broker_url) as conn:
        async with conn.channel() as ch:
            with pytest.raises(ChannelClosed) as info:
                await ch.queue_declare(missing, passive=True)
            err = info.value
            assert err.reply_code == 404
            assert err.channel_id == ch.channel_id
            assert "NOT_FOUND" in str(err)
            assert missing in str(err)
        # The connection stays usable.
        assert conn.is_open
        async with conn.channel() as ch:
            declared = await ch.queue_declare(missing)
            assert (declared.queue, declared.message_count) == (missing, 0)
    assert await oracle.queue_exists(missing)
