"""The bad-input catalogue (issue 7, part 2): what strictconsume does with input it
cannot use, against a real RabbitMQ.

The principle every test holds the code to: **bad input gets a clear error and loses
nothing; the error says what happened and what to do.** A message that cannot be
handled ends in ``<queue>.dlq`` with its reason (or back in its queue, for an
interrupt), never dropped and never looping; a broker address or topology that cannot
work stops the process with one line on stderr and a non-zero exit, never a
traceback and never a hang.

Two styles, as the rest of the suite:

- the App in-process (``app.running()``, trio and asyncio through ``anyio_backend``)
  where the message's fate is the question; pika (``tests/amqp/oracle.py``) publishes
  and reads the broker's side;
- ``python -m strictconsume tests.faults.bad_input_app:app`` as a real process (the
  ``harness`` fixture, ``--backend trio|asyncio``) where the running consumer's
  behaviour is: exit codes, log lines, memory, heartbeats, a deleted queue.

Cases that ``tests/framework/test_process.py`` covers already (wrong credentials,
unknown vhost, malformed URL, a port where nothing listens) are not repeated here;
the catalogue in ``tests/README.md`` names those tests.

Each test states the behaviour a RabbitMQ user would expect. The defects this
catalogue found when it was written (doubles in copies, undecodable properties, a
BaseExceptionGroup, asyncio's CancelledError, a broker-sent cancel, the blocked-loop
log line) are fixed; their tests stay as regression tests.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import functools
import hashlib
import os
import re
import signal
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
import attrs
import pamqp.encode
import pika
import pytest

import strictconsume as sc
import strictconsume.amqp
from strictconsume._versions import max_message_size

from ..amqp.oracle import Oracle, OracleMessage, get_from, pika_channel
from ..amqp.test_broker import ORACLE_HEADERS, OUR_HEADERS, _exact, _single
from ..framework.polling import depths, empty, wait_for_count, wait_until
from ..framework.test_process import _error_lines, _events
from ..processes import (
    SHARED_NODE,
    Consumer,
    Harness,
    ctl_available,
    message_count,
    settled_count,
    unacked_when_settled,
)

pytestmark = pytest.mark.broker

BACKENDS = pytest.mark.parametrize("backend", ["trio", "asyncio"])
TARGET = "tests.faults.bad_input_app:app"
#: The retry delay of the in-process consumers that retry (ms in the queue's name).
RETRY = 0.2
RETRY_MS = 200
#: A short grace period, so that a failing in-process test ends fast.
GRACE = 1.0


# -- publishing with pika ------------------------------------------------------------------


class RawHeaders(pika.BasicProperties):  # type: ignore[misc]
    """pika's properties, with a field table encoded by hand as the headers.

    pika cannot send a float, a double or an unsigned integer, and pamqp (what
    aiormq and strictconsume use) never sends an unsigned byte or a double: this
    publishes every type tag of RabbitMQ's field-table grammar exactly as another
    client (Java, .NET, Go) can send it. Only properties encoded after the headers
    (delivery mode, message id, ...) may be given besides.
    """

    def __init__(self, table: bytes, **properties: Any) -> None:
        if properties.get("content_type") or properties.get("content_encoding"):
            raise ValueError("the raw headers are encoded first: no content type or encoding")
        super().__init__(**properties)
        self._raw_table = table

    def encode(self) -> list[bytes]:
        pieces: list[bytes] = super().encode()
        (flags,) = struct.unpack(">H", pieces[0])
        return [struct.pack(">H", flags | self.FLAG_HEADERS), self._raw_table, *pieces[1:]]


def _send(url: str, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        ch.basic_publish("", queue, body, properties, mandatory=True)


def send(
    url: str,
    queue: str,
    body: bytes = b"{}",
    *,
    headers: dict[str, Any] | None = None,
    message_id: str | None = None,
    properties: pika.BasicProperties | None = None,
) -> None:
    """Publish one message with pika (confirmed, mandatory, persistent)."""
    if properties is None:
        properties = pika.BasicProperties(headers=headers, message_id=message_id, delivery_mode=2)
    _send(url, queue, body, properties)


async def asend(
    url: str,
    queue: str,
    body: bytes = b"{}",
    *,
    message_id: str | None = None,
    properties: pika.BasicProperties | None = None,
) -> None:
    """:func:`send` in a worker thread, for tests that run the App in-process."""
    await anyio.to_thread.run_sync(
        functools.partial(send, url, queue, body, message_id=message_id, properties=properties)
    )


def take_all(url: str, queue: str) -> list[OracleMessage]:
    """Every message of ``queue`` (basic.get, auto-ack), read by pika."""
    taken: list[OracleMessage] = []
    with pika_channel(url) as ch:
        while (message := get_from(ch, queue)) is not None:
            taken.append(message)
    return taken


# -- field tables, byte by byte ---------------------------------------------------------------


def _value(tag: bytes, fmt: str, value: object) -> bytes:
    return tag + struct.pack(fmt, value)


def _long_bytes(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack(">I", len(data)) + data


def field_table(items: Sequence[tuple[str, bytes]]) -> bytes:
    """An AMQP field table of already encoded values (``tag`` + payload each)."""
    body = b"".join(struct.pack("B", len(k.encode())) + k.encode() + v for k, v in items)
    return struct.pack(">I", len(body)) + body


def field_array(values: Sequence[bytes]) -> bytes:
    body = b"".join(values)
    return struct.pack(">I", len(body)) + body


TIMESTAMP = datetime.datetime(2024, 2, 29, 23, 59, 59, tzinfo=datetime.UTC)

#: Every type of the field-table grammar RabbitMQ speaks (the AMQP 0-9-1 errata), as
#: (name, encoded value, what the handler should see).
TYPED: list[tuple[str, bytes, object]] = [
    ("bool", b"t\x01", True),
    ("int8", _value(b"b", ">b", -128), -128),
    ("uint8", _value(b"B", ">B", 255), 255),
    ("int16", _value(b"s", ">h", -32768), -32768),
    ("uint16", _value(b"u", ">H", 65535), 65535),
    ("int32", _value(b"I", ">i", -(2**31)), -(2**31)),
    ("uint32", _value(b"i", ">I", 2**32 - 1), 2**32 - 1),
    ("int64", _value(b"l", ">q", -(2**63)), -(2**63)),
    ("float", _value(b"f", ">f", 1.5), 1.5),
    ("double", _value(b"d", ">d", -2.25), -2.25),
    ("decimal", b"D" + struct.pack(">Bi", 2, -314), decimal.Decimal("-3.14")),
    ("string", _long_bytes(b"S", "h\u00e9llo \u2713".encode()), "h\u00e9llo \u2713"),
    ("bytes", _long_bytes(b"x", b"\x00\xff"), bytearray(b"\x00\xff")),
    ("timestamp", _value(b"T", ">Q", int(TIMESTAMP.timestamp())), TIMESTAMP),
    (
        "table",
        b"F"
        + field_table(
            [("int", _value(b"I", ">i", 7)), ("nested", b"F" + field_table([("no", b"t\x00")]))]
        ),
        {"int": 7, "nested": {"no": False}},
    ),
    (
        "array",
        b"A"
        + field_array(
            [_value(b"b", ">b", 1), _long_bytes(b"S", b"two"), b"V", b"A" + field_array([b"t\x01"])]
        ),
        [1, "two", None, [True]],
    ),
    ("empty-table", b"F" + field_table([]), {}),
    ("empty-array", b"A" + field_array([]), []),
    ("void", b"V", None),
]
TYPED_TABLE = field_table([(name, encoded) for name, encoded, _ in TYPED])
TYPED_EXPECTED = {name: expected for name, _, expected in TYPED}


def _bytearrays(value: Any) -> Any:
    """``value`` with bytes made bytearray at any depth (pamqp encodes only bytearray
    as 'x'; strictconsume's Channel.publish does this conversion too)."""
    if isinstance(value, dict):
        return {k: _bytearrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bytearrays(v) for v in value]
    if isinstance(value, bytes):
        return bytearray(value)
    return value


#: OUR_HEADERS (tests/amqp/test_broker.py) as pamqp, the codec of aiormq and aio-pika,
#: encodes them; decoded, a float comes back through single precision ('f').
PAMQP_TABLE = pamqp.encode.field_table(_bytearrays(OUR_HEADERS))
PAMQP_EXPECTED = {**_bytearrays(OUR_HEADERS), "inexact-float": _single(0.1)}

#: pika's own encoding of ORACLE_HEADERS, as our codec decodes it (see
#: tests/amqp/test_broker.py): pika normalizes decimals, and 'x' decodes as bytearray.
PIKA_EXPECTED = {
    **ORACLE_HEADERS,
    "trailing-zero-decimal": decimal.Decimal("1.5"),
    "bytes": bytearray(b"\x00\x01\xfe\xff"),
}


# -- in-process: queues, and the broker's counts -------------------------------------------------


@attrs.define
class Queues:
    """Unique queue names; every queue of theirs is deleted afterwards."""

    url: str
    made: list[str] = attrs.Factory(list)

    def new(self) -> str:
        name = f"sc-bad-input-{uuid.uuid4().hex}"
        self.made.append(name)
        return name


@pytest.fixture
def queues(broker_url: str) -> Iterator[Queues]:
    made = Queues(broker_url)
    yield made
    oracle = Oracle(broker_url)
    for queue in made.made:
        for name in (queue, f"{queue}.dlq", f"{queue}.retry.{RETRY_MS}", f"{queue}.reference"):
            oracle.delete_now(name)


async def assert_nothing_unacked(queue: str) -> None:
    """No message of ``queue`` is held unacked (by rabbitmqctl, on our own node)."""
    if ctl_available():
        assert await anyio.to_thread.run_sync(unacked_when_settled, SHARED_NODE, queue) == 0


# -- 1, 2, 4. bodies that cannot be decoded ------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "is not JSON: Expecting value at line 1 column 1"),
        (b'{"id": 1', "is not JSON: Expecting ',' delimiter at line 1 column 9"),
        (
            b'\xef\xbb\xbf{"id": 1}',
            "is not JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) at line 1 column 1",
        ),
        (b"", "is not JSON: Expecting value at line 1 column 1"),
    ],
    ids=["not-json", "truncated", "utf8-bom", "empty"],
)
async def test_a_body_that_is_not_json_is_dead_lettered_at_once(
    broker_url: str, queues: Queues, body: bytes, reason: str
) -> None:
    """Case 1 and 4: ``msg.json()`` on a body that is not JSON (an empty one included)
    raises DecodeError, and the message goes to the .dlq at once although the policy
    has retries: retrying cannot fix bad input. The dead letter keeps the body and says
    what was wrong with it, and where."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    app = sc.App(url=broker_url, grace_period=GRACE)
    calls: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=(RETRY,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        calls.append(msg.attempt)
        msg.json()

    async with app.running():
        await asend(broker_url, queue, body, message_id="mid-1")
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        await anyio.sleep(RETRY * 2)  # a retry would be back by now

    assert calls == [1]
    assert await depths(oracle, queue, (RETRY_MS,)) == {
        **empty(queue, (RETRY_MS,)),
        f"{queue}.dlq": 1,
    }
    await assert_nothing_unacked(queue)
    assert app.outcomes[queue, "dead_letter"] == 1
    (dead,) = take_all(broker_url, f"{queue}.dlq")
    assert dead.body == body
    assert dead.properties.message_id == "mid-1"
    headers = dead.headers or {}
    print(f"x-error-message: {headers['x-error-message']}")
    assert headers["x-error-type"] == "strictconsume.DecodeError"
    assert (
        headers["x-error-message"] == f"the body of message 'mid-1' from queue {queue!r} {reason}"
    )
    assert headers["x-failed-queue"] == queue
    assert headers["x-attempt"] == 1


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["text", "json"])
async def test_a_body_that_is_not_utf8_is_dead_lettered_at_once(
    broker_url: str, queues: Queues, method: str
) -> None:
    """Case 2: ``msg.text()`` and ``msg.json()`` on invalid UTF-8 raise DecodeError
    naming the offending byte; the message is dead-lettered at once with its body
    intact. The bytes stay readable: ``msg.body`` and ``msg.text("latin-1")`` work."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    body = b"caf\xe9 \xff\xfe"
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[tuple[int, bytes, str]] = []

    @app.consumer(queue, retry=sc.Retry(delays=(RETRY,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append((msg.attempt, msg.body, msg.text("latin-1")))
        getattr(msg, method)()

    async with app.running():
        await asend(broker_url, queue, body, message_id="mid-2")
        await wait_for_count(oracle, f"{queue}.dlq", 1)
        await anyio.sleep(RETRY * 2)

    assert seen == [(1, body, "caf\u00e9 \u00ff\u00fe")]
    assert await depths(oracle, queue, (RETRY_MS,)) == {
        **empty(queue, (RETRY_MS,)),
        f"{queue}.dlq": 1,
    }
    await assert_nothing_unacked(queue)
    (dead,) = take_all(broker_url, f"{queue}.dlq")
    assert dead.body == body
    headers = dead.headers or {}
    assert headers["x-error-type"] == "strictconsume.DecodeError"
    assert headers["x-error-message"] == (
        f"the body of message 'mid-2' from queue {queue!r} is not valid utf-8 "
        "(byte 3: invalid continuation byte)"
    )


@pytest.mark.anyio
async def test_an_empty_body_is_handled_by_handlers_of_bytes_and_text(
    broker_url: str, queues: Queues
) -> None:
    """Case 4: an empty body is a valid message for a handler of bytes (``msg.body``)
    and of text (``msg.text()`` is ""): both ack it. (To ``msg.json()`` it is a
    DecodeError: see the ``empty`` case of the JSON test above.)"""
    oracle = Oracle(broker_url)
    of_bytes, of_text = queues.new(), queues.new()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: dict[str, object] = {}

    @app.consumer(of_bytes, timeout=5.0)
    async def handle_bytes(msg: sc.Message) -> None:
        seen["bytes"] = msg.body

    @app.consumer(of_text, timeout=5.0)
    async def handle_text(msg: sc.Message) -> None:
        seen["text"] = msg.text()

    async with app.running():
        await asend(broker_url, of_bytes, b"")
        await asend(broker_url, of_text, b"")

        async def both_acked() -> bool:
            return app.outcomes[of_bytes, "ack"] == 1 and app.outcomes[of_text, "ack"] == 1

        await wait_until(both_acked, what="both empty bodies acked")

    assert seen == {"bytes": b"", "text": ""}
    for queue in (of_bytes, of_text):
        assert await depths(oracle, queue) == empty(queue)
        await assert_nothing_unacked(queue)


# -- 3. a 50 MB body --------------------------------------------------------------------------


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a live process, in MB."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found


def large_body_size(version: tuple[int, int, int]) -> int:
    """50 MB where the broker takes it (its default max_message_size is 128 MiB before
    RabbitMQ 4.0), else 1 MiB below the 16 MiB default of 4.0 and later."""
    return min(50 * 1024 * 1024, max_message_size(version) - 1024 * 1024)


@pytest.mark.slow
@BACKENDS
def test_a_50_mb_body_is_handled_and_its_dead_letter_copy_is_whole(
    harness: Harness, backend: str, broker_version: tuple[int, int, int]
) -> None:
    """Case 3: a 50 MB body (15 MiB from RabbitMQ 4.0, whose default limit is
    16 MiB), far larger than frame_max (128 KiB: some 400 or 120 body frames), is
    assembled, handled and acked; a second one that fails is copied whole (split into
    frames again) to the .dlq. The process's peak RSS grows by a small multiple of
    the body, not without bound (the bound asserted: 5x per body)."""
    size = large_body_size(broker_version)
    consumer = harness.start(backend, "--grace-period", "5", target=TARGET)
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 1, 15, "ready line")
    before = _memory_mb(consumer.proc.pid)
    ok, bad = os.urandom(size), os.urandom(size)
    began = time.monotonic()
    send(harness.url, harness.queue, ok, headers={"do": "digest", "id": "big-ok"})
    # random bytes are not UTF-8: msg.json() fails, and the copy goes to the .dlq
    send(harness.url, harness.queue, bad, headers={"id": "big-bad"})
    published = time.monotonic()
    consumer.wait_for(lambda: consumer.records("digest") != [], 60, "the digest of the body")
    consumer.wait_for(
        lambda: message_count(harness.url, f"{harness.queue}.dlq") == 1, 60, "the dead letter"
    )
    handled = time.monotonic()
    after = _memory_mb(consumer.proc.pid)
    frames = -(-size // (131072 - 8))
    growth = after["VmHWM"] - before["VmRSS"]
    print(
        f"[{backend}] two bodies of {size / 2**20:.0f} MB ({frames} body frames each): "
        f"published in {published - began:.2f} s, handled {handled - published:.2f} s later; "
        f"RSS {before['VmRSS']:.0f} MB at ready, peak {after['VmHWM']:.0f} MB "
        f"(+{growth:.0f} MB = {growth * 2**20 / (2 * size):.1f}x the bodies received), "
        f"now {after['VmRSS']:.0f} MB"
    )

    assert consumer.records("digest") == ["big-ok", str(size), hashlib.sha256(ok).hexdigest()]
    assert consumer.finished() == ["big-ok"]
    assert settled_count(harness.url, harness.queue, 0) == 0
    if ctl_available():
        assert unacked_when_settled(SHARED_NODE, harness.queue) == 0
    (dead,) = take_all(harness.url, f"{harness.queue}.dlq")
    assert len(dead.body) == size
    assert dead.body == bad
    assert (dead.headers or {})["x-error-type"] == "strictconsume.DecodeError"
    assert growth * 2**20 < 5 * 2 * size, f"peak RSS grew by {growth:.0f} MB"
    consumer.send(signal.SIGTERM)
    code, _ = consumer.wait_exit(15)
    assert code == 0, consumer.tail()
    assert "Traceback" not in consumer.log()


@pytest.mark.anyio
async def test_a_body_over_the_brokers_limit_is_refused_with_the_reason(
    broker_url: str, broker_version: tuple[int, int, int], queues: Queues
) -> None:
    """Case 3, from RabbitMQ 4.0: a 50 MB publish exceeds the default max_message_size
    of 16 MiB. The broker closes the publishing channel with 406; ``publish`` raises
    it with advice that names the limit, nothing reaches the queue, and the publisher
    goes on with the next message. (Before 4.0 the default limit is 128 MiB, which the
    case above stays below.)"""
    if max_message_size(broker_version) > 50 * 1024 * 1024:
        pytest.skip(f"RabbitMQ {broker_version} takes 50 MB by default")
    oracle = Oracle(broker_url)
    queue = queues.new()
    await oracle.declare(queue)
    app = sc.App(url=broker_url, grace_period=GRACE)
    async with app.publisher() as pub:
        with pytest.raises(sc.amqp.ChannelClosed) as info:
            await pub.publish(os.urandom(50 * 1024 * 1024), routing_key=queue)
        await pub.publish(b"small", routing_key=queue)
    error = info.value
    assert error.reply_code == 406
    assert error.message_too_large
    assert "larger than configured max size 16777216" in str(error)
    assert "max_message_size" in str(error)
    assert "arguments differ" not in str(error)
    seen = await oracle.get(queue)
    assert seen is not None
    assert (seen.body, seen.message_count) == (b"small", 0)


# -- 5. headers of every field-table type ----------------------------------------------------------


@pytest.mark.anyio
async def test_headers_of_every_type_reach_the_handler_and_survive_retry_and_dead_letter(
    broker_url: str, queues: Queues
) -> None:
    """Case 5: headers of every field-table type (RabbitMQ's grammar: bool, signed and
    unsigned ints of 8 to 64 bits, float, double, decimal, string, bytes, timestamp,
    table, array, void; encoded byte by byte) and headers as pika encodes them reach
    the handler as the right Python values; the retry copy brings them back to the
    handler unchanged, and pika reads the dead-letter copy as it reads the original."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    reference = f"{queue}.reference"
    await oracle.declare(reference)
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: dict[tuple[str, int], dict[str, Any]] = {}

    @app.consumer(queue, retry=sc.Retry(delays=(RETRY,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen[str(msg.message_id), msg.attempt] = dict(msg.headers)
        raise ValueError("fails on every attempt")

    typed = RawHeaders(TYPED_TABLE, message_id="typed", delivery_mode=2)
    by_pamqp = RawHeaders(PAMQP_TABLE, message_id="pamqp", delivery_mode=2)
    by_pika = pika.BasicProperties(headers=ORACLE_HEADERS, message_id="pika", delivery_mode=2)
    async with app.running():
        for properties in (typed, by_pamqp, by_pika):
            await asend(broker_url, queue, b"body", properties=properties)
            await asend(broker_url, reference, b"body", properties=properties)
        await wait_for_count(oracle, f"{queue}.dlq", 3)

    assert set(seen) == {(mid, n) for mid in ("typed", "pamqp", "pika") for n in (1, 2)}
    references = {m.properties.message_id: m for m in take_all(broker_url, reference)}
    dead = {m.properties.message_id: m for m in take_all(broker_url, f"{queue}.dlq")}
    for mid, expected in (
        ("typed", TYPED_EXPECTED),
        ("pamqp", PAMQP_EXPECTED),
        ("pika", PIKA_EXPECTED),
    ):
        first, second = seen[mid, 1], seen[mid, 2]
        assert _exact(first) == _exact(expected), mid
        # the retried copy: the same values, plus what the retry added
        assert _exact({k: second[k] for k in expected}) == _exact(expected), mid
        assert second["x-attempt"] == 2
        assert {"x-original-exchange", "x-original-routing-key", "x-death"} <= set(second)
        # the dead letter, read by pika as pika reads the original
        original = references[mid].headers or {}
        copy = dead[mid].headers or {}
        assert _exact({k: copy[k] for k in original}) == _exact(original), mid
        assert copy["x-error-type"] == "ValueError"
        assert copy["x-attempt"] == 2
    await assert_nothing_unacked(queue)


@pytest.mark.anyio
@pytest.mark.parametrize("value", [0.1, 1e300], ids=["inexact-in-single", "beyond-single"])
async def test_a_double_header_survives_the_retry_copy(
    broker_url: str, queues: Queues, value: float
) -> None:
    """Case 5, doubles: a header of type 'd' (what Java, .NET and Go clients send for a
    double) must reach the handler with the same value on every attempt, and the
    message must end in the .dlq without the connection breaking."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    app = sc.App(url=broker_url, grace_period=GRACE)
    seen: list[object] = []

    @app.consumer(queue, retry=sc.Retry(delays=(RETRY,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        seen.append(msg.headers.get("double"))
        raise ValueError("fails on every attempt")

    table = field_table([("double", _value(b"d", ">d", value))])
    async with app.running():
        await asend(broker_url, queue, b"body", properties=RawHeaders(table, message_id="double"))

        async def settled() -> bool:
            dlq = await oracle.message_count(f"{queue}.dlq")
            return dlq == 1 or app.reconnects > 0

        await wait_until(settled, what="the dead letter, or a reconnect")
        reconnects = app.reconnects

    print(f"values seen: {seen}; reconnects: {reconnects}")
    assert reconnects == 0, "the copy broke the connection"
    assert seen == [value, value]
    assert await depths(oracle, queue, (RETRY_MS,)) == {
        **empty(queue, (RETRY_MS,)),
        f"{queue}.dlq": 1,
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    "properties",
    [
        pika.BasicProperties(headers={b"\xff\xfe-key": 1}),
        pika.BasicProperties(message_id=b"\xff\xfe"),
    ],
    ids=["non-utf8-header-name", "non-utf8-message-id"],
)
async def test_a_message_whose_properties_cannot_be_decoded_is_dead_lettered(
    broker_url: str, queues: Queues, properties: pika.BasicProperties
) -> None:
    """Case 5, properties our codec cannot turn into Python values (a header name or
    a message_id that is not UTF-8, sent by pika; a timestamp beyond datetime, such as
    Go's ``time.UnixNano()``, is no longer one: it arrives as ``amqp.Timestamp``): the
    message is bad input, so it belongs in the .dlq (the broker can dead-letter it on a reject, raw
    properties intact), and the connection and the messages after it go on."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    app = sc.App(url=broker_url, grace_period=GRACE)
    handled: list[bytes] = []

    @app.consumer(queue, timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        handled.append(msg.body)

    async with app.running():
        await asend(broker_url, queue, b"bad", properties=properties)
        await asend(broker_url, queue, b"good")

        async def settled() -> bool:
            return handled == [b"good"] or app.reconnects > 0

        await wait_until(settled, what="the good message handled, or a reconnect")
        assert app.reconnects == 0, "the undecodable message broke the connection"
        await wait_for_count(oracle, f"{queue}.dlq", 1)

    assert handled == [b"good"]
    assert await depths(oracle, queue) == {**empty(queue), f"{queue}.dlq": 1}


# -- 6. no message_id --------------------------------------------------------------------------


@BACKENDS
def test_a_message_without_message_id_is_handled_and_its_failure_is_logged(
    harness: Harness, backend: str
) -> None:
    """Case 6: a message without message_id is handled like any other. When it fails,
    the JSON log's ``message_id`` is null and the text shows ``message None`` next to
    its delivery_tag (what identifies it on the channel); the dead letter has no
    message_id either (not the string "None") and its headers are complete."""
    consumer = harness.start(backend, "--log-format", "json", target=TARGET)
    consumer.wait_for(
        lambda: any(e["event"] == "ready" for e in _events(consumer)), 15, "the ready event"
    )
    send(harness.url, harness.queue, b'{"fine": true}')
    send(harness.url, harness.queue, b"not json")
    consumer.wait_for(
        lambda: message_count(harness.url, f"{harness.queue}.dlq") == 1, 10, "the dead letter"
    )
    consumer.wait_for(lambda: consumer.finished() == ["tag1"], 10, "the first message handled")
    consumer.send(signal.SIGTERM)
    code, _ = consumer.wait_exit(15)
    assert code == 0, consumer.tail()

    (failed,) = [e for e in _events(consumer) if e["event"] == "message_failed"]
    print(f"[{backend}] {failed['message']}")
    assert failed["message_id"] is None
    assert failed["delivery_tag"] == 2
    assert failed["outcome"] == "dead_letter"
    assert str(failed["message"]).startswith(
        f"queue {harness.queue!r}: message None (delivery_tag 2, attempt 1) failed after "
    )
    assert str(failed["error"]) == (
        f"strictconsume.DecodeError: the body of message None from queue {harness.queue!r} "
        "is not JSON: Expecting value at line 1 column 1"
    )
    (dead,) = take_all(harness.url, f"{harness.queue}.dlq")
    assert dead.properties.message_id is None
    headers = dead.headers or {}
    assert headers["x-error-type"] == "strictconsume.DecodeError"
    assert headers["x-failed-queue"] == harness.queue
    assert headers["x-attempt"] == 1
    assert isinstance(headers["x-failed-at"], str)
    assert message_count(harness.url, harness.queue) == 0


# -- 7. handlers that raise BaseException ----------------------------------------------------------


@attrs.frozen
class Raising:
    """What a handler raises, and what the process should do about it."""

    raises: str
    exit_code: int
    traceback: bool  # Python's own report of an uncaught exception on stderr
    grace: bool = True  # the other handlers get the grace period


def _raising_cases() -> Iterator[Any]:
    cases = [
        Raising("KeyboardInterrupt", 130, traceback=False),
        Raising("SystemExit", 3, traceback=False),
        Raising("GeneratorExit", 1, traceback=True),
        Raising("HandlerAbort", 1, traceback=True),
    ]
    for backend in ("trio", "asyncio"):
        for case in cases:
            yield pytest.param(backend, case, id=f"{backend}-{case.raises}")
        yield pytest.param(
            backend,
            Raising("BaseExceptionGroup", 130, traceback=False),
            id=f"{backend}-BaseExceptionGroup",
        )
    yield pytest.param(
        "trio",
        Raising("SystemExitInTaskGroup", 3, traceback=False),
        id="trio-SystemExitInTaskGroup",
    )
    # On asyncio a SystemExit in a child task escapes the event loop itself (asyncio's
    # Task re-raises it from the loop), so the App cannot give the other handlers
    # their grace period; nothing is lost, the exit code is the right one.
    yield pytest.param(
        "asyncio",
        Raising("SystemExitInTaskGroup", 3, traceback=False, grace=False),
        id="asyncio-SystemExitInTaskGroup",
    )


@pytest.mark.parametrize(("backend", "case"), list(_raising_cases()))
def test_a_handler_raising_a_base_exception_requeues_and_stops_gracefully(
    harness: Harness, backend: str, case: Raising
) -> None:
    """Case 7: a handler that raises a BaseException (an interrupt, GeneratorExit, one of
    the user's own, a group of them) has its message requeued; the App stops
    gracefully (a slow handler running beside it finishes in the grace period) and the
    process exits with the exception's code: 130 for KeyboardInterrupt, n for
    ``sys.exit(n)``, 1 and Python's traceback for any other. Nothing is lost."""
    consumer = harness.start(backend, "--grace-period", "10", target=TARGET)
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 1, 15, "ready line")
    send(harness.url, harness.queue, headers={"do": "sleep", "seconds": "1.5", "id": "slow"})
    consumer.wait_for(lambda: consumer.started() == ["slow"], 10, "the slow handler started")
    began = time.monotonic()
    send(harness.url, harness.queue, headers={"do": "raise", "raise": case.raises, "id": "bad"})
    code, exited = consumer.wait_exit(20)
    log = consumer.log()
    print(f"[{backend}] {case.raises}: exit {code} {exited - began:.2f} s after the publish")

    assert code == case.exit_code, log
    assert ("Traceback" in log) is case.traceback, log
    assert any(
        f"the handler raised {name}; stopping the App (the message goes back to the queue)" in log
        for name in _reported_as(case.raises)
    ), log
    back = take_all(harness.url, harness.queue)
    ids = sorted(str((m.headers or {})["id"]) for m in back)
    if case.grace:
        assert consumer.finished() == ["slow"], log
        assert ids == ["bad"]
    else:
        assert consumer.finished() == []
        assert ids == ["bad", "slow"]
    assert all(m.redelivered for m in back)
    assert message_count(harness.url, f"{harness.queue}.dlq") == 0


def _reported_as(raises: str) -> tuple[str, ...]:
    """The names the error line may give what the handler raised (a group, or what
    is inside it)."""
    if raises == "HandlerAbort":
        return ("tests.faults.bad_input_app.HandlerAbort",)
    if raises == "SystemExitInTaskGroup":
        return ("BaseExceptionGroup", "SystemExit")
    if raises == "BaseExceptionGroup":
        return ("BaseExceptionGroup", "KeyboardInterrupt")
    return (raises,)


@pytest.mark.anyio
async def test_an_exception_group_is_an_exception_retried_then_dead_lettered(
    broker_url: str, queues: Queues
) -> None:
    """Case 7, ExceptionGroup: it is an Exception, so it is retried per policy and then
    dead-lettered with its type; a group of one DecodeError counts as that DecodeError
    (dead-lettered at once)."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    app = sc.App(url=broker_url, grace_period=GRACE)
    attempts: list[tuple[str, int]] = []

    @app.consumer(queue, retry=sc.Retry(delays=(RETRY,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        attempts.append((str(msg.message_id), msg.attempt))
        if msg.message_id == "two":
            raise ExceptionGroup("two failures", [ValueError("first"), KeyError("second")])
        try:
            msg.json()
        except sc.DecodeError as exc:
            raise ExceptionGroup("one failure", [exc]) from None

    async with app.running():
        await asend(broker_url, queue, b"{}", message_id="two")
        await asend(broker_url, queue, b"not json", message_id="decode")
        await wait_for_count(oracle, f"{queue}.dlq", 2)

    assert sorted(attempts) == [("decode", 1), ("two", 1), ("two", 2)]
    assert await depths(oracle, queue, (RETRY_MS,)) == {
        **empty(queue, (RETRY_MS,)),
        f"{queue}.dlq": 2,
    }
    dead = {m.properties.message_id: m.headers or {} for m in take_all(broker_url, f"{queue}.dlq")}
    print(f"x-error-message of the group: {dead['two']['x-error-message']!r}")
    assert (dead["two"]["x-error-type"], dead["two"]["x-attempt"]) == ("ExceptionGroup", 2)
    assert dead["two"]["x-error-message"].startswith("two failures")
    assert (dead["decode"]["x-error-type"], dead["decode"]["x-attempt"]) == (
        "strictconsume.DecodeError",
        1,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_cancelled_error_raised_by_a_handler_is_a_failure(
    broker_url: str, queues: Queues
) -> None:
    """Case 7, asyncio: a handler that awaits something another task cancelled gets a
    CancelledError nobody asked the handler for. Nothing cancelled the handler, so it
    is the handler's failure: dead-lettered (no retries here), the connection intact."""
    oracle = Oracle(broker_url)
    queue = queues.new()
    app = sc.App(url=broker_url, grace_period=GRACE)
    calls: list[int] = []

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        calls.append(msg.attempt)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.cancel()
        await future  # raises CancelledError

    async with app.running():
        await asend(broker_url, queue, b"{}", message_id="cancelled")

        async def settled() -> bool:
            dlq = await oracle.message_count(f"{queue}.dlq")
            return dlq == 1 or app.reconnects > 0

        await wait_until(settled, what="the dead letter, or a reconnect")
        reconnects = app.reconnects

    assert reconnects == 0
    assert calls == [1]
    assert await depths(oracle, queue) == {**empty(queue), f"{queue}.dlq": 1}


# -- 8. a handler that blocks the event loop -------------------------------------------------------


def _block_and_recover(harness: Harness, backend: str, *, others: int) -> tuple[Consumer, str]:
    """Run a consumer with ``?heartbeat=2``, publish a message whose handler blocks
    the event loop for 8 s (four heartbeat intervals) and ``others`` short ones; wait
    until every one finished; returns the consumer and its reconnect line."""
    url = harness.url.rstrip("/") + "/?heartbeat=2"
    consumer = harness.start(backend, "--grace-period", "5", "--url", url, target=TARGET)
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 1, 15, "ready line")
    ids = ["blocker", *(f"other-{i}" for i in range(others))]
    send(harness.url, harness.queue, headers={"do": "block", "seconds": "8", "id": "blocker"})
    for ident in ids[1:]:
        send(harness.url, harness.queue, headers={"do": "sleep", "seconds": "0.5", "id": ident})
    began = time.monotonic()
    consumer.wait_for(lambda: set(consumer.finished()) == set(ids), 40, "every message finished")
    print(f"[{backend}] every message finished {time.monotonic() - began:.1f} s after the publish")
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 2, 10, "the reconnect")
    lost = [line for line in consumer.log().splitlines() if "reconnecting in" in line]
    print(f"[{backend}] the reconnect line: {lost}")
    assert len(lost) == 1, consumer.log()
    return consumer, lost[0]


@pytest.mark.slow
@BACKENDS
def test_a_handler_blocking_the_event_loop_past_the_heartbeat_loses_nothing(
    harness: Harness, backend: str
) -> None:
    """Case 8: a handler that blocks the event loop (``time.sleep(8)``) with a 2 s
    heartbeat stops the heartbeats: the broker drops the connection ("missed heartbeats
    from client"), the App reconnects, and the messages that were not acked come back
    redelivered. Every message is handled (the blocker twice: its first ack was never
    sent), none stays unacked, the process stops cleanly."""
    consumer, _line = _block_and_recover(harness, backend, others=5)
    finished = consumer.finished()
    print(f"[{backend}] handler runs: {finished}")
    assert finished.count("blocker") == 2, finished
    assert settled_count(harness.url, harness.queue, 0) == 0
    if ctl_available():
        assert unacked_when_settled(SHARED_NODE, harness.queue) == 0
    assert message_count(harness.url, f"{harness.queue}.dlq") == 0
    consumer.send(signal.SIGTERM)
    code, _ = consumer.wait_exit(15)
    assert code == 0, consumer.tail()
    assert "Traceback" not in consumer.log()


@pytest.mark.slow
@BACKENDS
def test_a_blocked_event_loop_is_named_in_the_log(harness: Harness, backend: str) -> None:
    """Case 8, the log: the line that reports the lost connection must say that this
    process's event loop was blocked (a handler calling blocking code), since that is
    what to fix; blaming the broker sends the operator to the wrong place."""
    consumer, line = _block_and_recover(harness, backend, others=0)
    consumer.send(signal.SIGTERM)
    consumer.wait_exit(15)
    assert re.search(r"event loop .*blocked|blocked .*event loop", line), line


# -- 9. a queue that exists with other arguments ---------------------------------------------------


@attrs.frozen
class Existing:
    """A queue declared beforehand by someone else, and the argument that differs."""

    suffix: str  # "" for the consumer's queue, else e.g. ".retry.500"
    durable: bool
    arguments: Callable[[str], dict[str, Any]]
    differs: str
    retry: str = ""  # BAD_INPUT_RETRY for the consumer


def _dlx(queue: str, key: str | None = None) -> dict[str, Any]:
    return {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": key or f"{queue}.dlq"}


EXISTING = [
    pytest.param(Existing("", True, lambda q: {}, "x-dead-letter-exchange"), id="no-dlx"),
    pytest.param(
        Existing("", True, lambda q: _dlx(q, "elsewhere"), "x-dead-letter-routing-key"),
        id="other-dlx",
    ),
    pytest.param(Existing("", False, _dlx, "durable"), id="transient"),
    pytest.param(
        Existing("", True, lambda q: {**_dlx(q), "x-queue-type": "quorum"}, "x-queue-type"),
        id="quorum",
    ),
    pytest.param(
        Existing(".retry.500", True, lambda q: {"x-message-ttl": 1000}, "x-message-ttl", "0.5"),
        id="retry-ttl",
    ),
]


@BACKENDS
@pytest.mark.parametrize("existing", EXISTING)
def test_a_queue_that_exists_with_other_arguments_is_fatal_with_one_line(
    harness: Harness, backend: str, existing: Existing
) -> None:
    """Case 9: the broker answers 406 PRECONDITION_FAILED to the declaration of a queue
    that exists with other arguments. At start-up that is fatal: exit 1 after one
    attempt (no retry loop), one line on stderr naming the queue and the differing
    argument and saying what to do, no traceback; the existing queue and its messages
    are left alone."""
    name = harness.queue + existing.suffix
    with pika_channel(harness.url) as ch:
        ch.queue_declare(name, durable=existing.durable, arguments=existing.arguments(name))
    try:
        send(harness.url, name, b'{"kept": true}')
        began = time.monotonic()
        env = {"BAD_INPUT_RETRY": existing.retry} if existing.retry else None
        consumer = harness.start(backend, target=TARGET, env=env)
        code, exited = consumer.wait_exit(15)
        log = consumer.log()
        errors = _error_lines(log)
        print(f"[{backend}] exit {code} after {exited - began:.2f} s: {errors}")
        assert code == 1, log
        assert exited - began < 10
        assert len(errors) == 1, log
        assert f"queue {name!r} exists on the broker with different settings" in errors[0]
        assert f"inequivalent arg '{existing.differs}'" in errors[0]
        if ".retry." in existing.suffix:  # copies on their way back: delete it empty
            assert f"rabbitmqctl delete_queue {name} --if-empty" in errors[0]
        else:
            assert "delete it on the broker" in errors[0]
        assert "Traceback" not in log, log
        assert "reconnecting" not in log, log
        assert message_count(harness.url, name) == 1
    finally:
        if existing.suffix:
            Oracle(harness.url).delete_now(name)


# -- 10. a queue deleted while consuming -----------------------------------------------------------


@attrs.frozen
class Deleted:
    consumer: Consumer
    in_flight: list[str]
    deleted_ready: int
    after: list[str]


def _delete_while_consuming(harness: Harness, backend: str) -> Deleted:
    """Consume 10 slow messages with prefetch 5, delete the queue (with pika) while 5
    are in flight, wait for the consumer to declare it again and resubscribe, publish
    10 more and wait until they are all handled."""
    consumer = harness.start(backend, "--prefetch", "5", "--grace-period", "5", target=TARGET)
    consumer.wait_for(lambda: consumer.log_count("ready: consuming") == 1, 15, "ready line")
    for i in range(10):
        send(harness.url, harness.queue, headers={"do": "sleep", "seconds": "1", "id": f"b{i}"})
    consumer.wait_for(lambda: len(consumer.started()) == 5, 10, "5 handlers started")
    in_flight = consumer.started()
    deleting = time.monotonic()
    with pika_channel(harness.url) as ch:
        deleted_ready = int(ch.queue_delete(harness.queue).method.message_count)
    back = consumer.wait_for(
        lambda: consumer.log_count("subscribed to queue") == 2, 15, "the resubscription"
    )
    after = [f"a{i}" for i in range(10)]
    for ident in after:
        send(harness.url, harness.queue, headers={"do": "sleep", "seconds": "0.1", "id": ident})
    consumer.wait_for(
        lambda: set(after) <= set(consumer.finished()), 15, "every message published after"
    )
    print(
        f"[{backend}] deleted with {len(in_flight)} in flight and {deleted_ready} ready; "
        f"subscribed again {back - deleting:.2f} s later; in-flight handlers finished: "
        f"{sorted(set(in_flight) & set(consumer.finished()))}"
    )
    return Deleted(consumer, in_flight, deleted_ready, after)


@BACKENDS
def test_a_queue_deleted_while_consuming_is_declared_again_and_consumed(
    harness: Harness, backend: str
) -> None:
    """Case 10: deleting the queue makes the broker cancel the consumer (basic.cancel);
    the App says so in one line, declares the queue again and resubscribes, and every
    message published afterwards is handled once. The deletion took the ready
    messages with it (the broker's count), and nothing is left unacked."""
    deleted = _delete_while_consuming(harness, backend)
    consumer = deleted.consumer
    log = consumer.log()
    assert deleted.deleted_ready == 10 - len(deleted.in_flight)
    assert sorted(i for i in consumer.finished() if i.startswith("a")) == sorted(deleted.after)
    assert f"consumer of queue {harness.queue!r} stopped: the broker cancelled consumer" in log
    assert "(the queue was deleted or its node is gone); declare the queue and consume again" in log
    assert settled_count(harness.url, harness.queue, 0) == 0
    if ctl_available():
        assert unacked_when_settled(SHARED_NODE, harness.queue) == 0
    consumer.send(signal.SIGTERM)
    code, _ = consumer.wait_exit(15)
    assert code == 0, consumer.tail()
    assert "Traceback" not in consumer.log()


@BACKENDS
def test_handlers_in_flight_when_the_queue_is_deleted_finish(
    harness: Harness, backend: str
) -> None:
    """Case 10, what was in flight: the channel is still open after a broker-sent
    cancel, so the handlers already running can finish and be acked (as in a shutdown's
    grace period) instead of being cancelled with nowhere for their messages to go."""
    deleted = _delete_while_consuming(harness, backend)
    consumer = deleted.consumer
    consumer.wait_for(
        lambda: set(deleted.in_flight) <= set(consumer.finished()),
        5,
        "the handlers in flight at the deletion finished",
    )
    consumer.send(signal.SIGTERM)
    code, _ = consumer.wait_exit(15)
    assert code == 0, consumer.tail()


# -- 11. a port that is not a broker ---------------------------------------------------------------


class _HttpAnswer(socketserver.BaseRequestHandler):
    """Answers the first bytes it gets with an HTTP 400, as nginx does to a request
    line it cannot parse (AMQP's protocol header starts with "AMQP\\x00")."""

    def handle(self) -> None:
        try:
            self.request.recv(8)
            self.request.sendall(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\n"
                b"Content-Length: 11\r\nConnection: close\r\n\r\nBad Request"
            )
        except OSError:
            pass


class _Silent(socketserver.BaseRequestHandler):
    """Accepts the connection and says nothing until the server stops."""

    def handle(self) -> None:
        assert isinstance(self.server, _Server)
        self.server.stopping.wait(30)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", 0), handler)


@contextmanager
def serving(handler: type[socketserver.BaseRequestHandler]) -> Iterator[int]:
    """A TCP server on a free loopback port, in a thread; yields its port."""
    server = _Server(handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@BACKENDS
def test_a_port_that_answers_http_is_fatal_with_one_line(harness: Harness, backend: str) -> None:
    """Case 11: a URL pointing at an HTTP server (a load balancer, the management UI):
    fatal at once, exit 1, one line saying the peer does not speak AMQP 0-9-1 and what
    it sent, no traceback, no retry, no hang."""
    with serving(_HttpAnswer) as port:
        began = time.monotonic()
        consumer = harness.start(
            backend, "--url", f"amqp://guest:guest@127.0.0.1:{port}/", target=TARGET
        )
        code, exited = consumer.wait_exit(15)
    log = consumer.log()
    errors = _error_lines(log)
    print(f"[{backend}] exit {code} after {exited - began:.2f} s: {errors}")
    assert code == 1, log
    assert exited - began < 10
    assert len(errors) == 1, log
    assert "does not answer as an AMQP 0-9-1 broker" in errors[0]
    assert "HTTP/1.1 400 Bad Request" in errors[0]
    assert "is the port an AMQP port?" in errors[0]
    assert "Traceback" not in log, log
    assert "reconnecting" not in log, log


@BACKENDS
def test_a_port_that_accepts_and_says_nothing_is_retried_after_the_handshake_timeout(
    harness: Harness, backend: str
) -> None:
    """Case 11: a peer that accepts the TCP connection and never answers (a broker
    frozen or still booting, a black-holing proxy) is not fatal, as a refused port is
    not: each attempt ends after ``connection_timeout`` (2 s here; 10 s by default)
    with a line saying the handshake did not complete, then the App tries again with
    backoff. A SIGTERM ends the retrying at once with exit 0; no traceback."""
    with serving(_Silent) as port:
        url = f"amqp://guest:guest@127.0.0.1:{port}/?connection_timeout=2"
        began = time.monotonic()
        consumer = harness.start(backend, "--url", url, target=TARGET)
        consumer.wait_for(lambda: consumer.log_count("reconnecting") >= 2, 20, "two retries")
        retried = time.monotonic()
        signalled = consumer.send(signal.SIGTERM)
        code, exited = consumer.wait_exit(10)
    log = consumer.log()
    lines = [line for line in log.splitlines() if "reconnecting" in line]
    print(
        f"[{backend}] two attempts in {retried - began:.2f} s; exit {code} "
        f"{exited - signalled:.2f} s after SIGTERM; {lines[0]}"
    )
    assert code == 0, log
    assert exited - signalled < 3
    assert retried - began >= 4, "an attempt ended before its handshake timeout"
    assert "did not complete the AMQP handshake within 2 s; reconnecting in" in lines[0]
    assert "cannot connect: the broker at amqp://guest:***@127.0.0.1:" in lines[0]
    assert "Traceback" not in log, log
