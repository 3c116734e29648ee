"""``strictconsume.testing``: run_handler decides as the App does.

Part 1 feeds messages to :func:`run_handler` without a broker and asserts the exact
result for every row of the outcome table, the handler timeout (on trio's autojump
clock, to the virtual second), and the decoding of the message (headers through the
AMQP codec, properties, ``json=``, attempts and quorum delivery counts).

Part 2 is the promise itself: an App handles messages on a real RabbitMQ, pika (an
independent client) reads where each one landed (the queue, its ``.retry.<ms>`` queues,
its ``.dlq`` and the dead letters' headers) and the App's outcome counters; then
:func:`run_handler` is given each delivery the App's handler saw (body, headers,
properties) and must decide the same outcome, destination and headers.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs
import pika
import pytest
import sniffio
import trio
import trio.testing

import strictconsume as sc
from strictconsume._versions import nack_counts_as_delivery
from strictconsume.amqp import Properties
from strictconsume.testing import HandlerResult, run_handler, run_handler_sync

from ..amqp.oracle import Oracle, OracleMessage, get_from, pika_channel

if TYPE_CHECKING:
    from pamqp.common import FieldTable

pytestmark = pytest.mark.anyio

QUEUE = "orders"
POLICY = sc.Retry(delays=(1.0, 10.0, 60.0))
FAILED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def autojump() -> pytest.MarkDecorator:
    """Run on trio only, with a MockClock that jumps whenever every task is blocked."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


def check_failed_at(value: object, before: datetime.datetime) -> None:
    assert isinstance(value, str), value
    assert FAILED_AT.match(value), value
    failed_at = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    now = datetime.datetime.now(datetime.UTC)
    slack = datetime.timedelta(milliseconds=2)
    assert before - slack <= failed_at <= now + slack, (value, before, now)


def route(queue: str = QUEUE, exchange: str = "") -> FieldTable:
    return {"x-original-exchange": exchange, "x-original-routing-key": queue}


# -- 1. the outcome table ---------------------------------------------------------------


@sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
async def returns(msg: sc.Message) -> None:
    """Returns: ack."""


@sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
async def boom(msg: sc.Message) -> None:
    raise ValueError("boom")


async def test_return_acks() -> None:
    result = await run_handler(returns, b"fine")
    assert result == HandlerResult(outcome="ack", message=result.message)
    assert result.acked
    assert (result.error, result.delay, result.reason, result.destination) == (
        None,
        None,
        None,
        None,
    )
    assert result.headers == {}
    assert result.message.body == b"fine"
    assert result.message.queue == QUEUE
    assert result.message.attempt == 1


@pytest.mark.parametrize(
    ("attempt", "delay", "destination"),
    [
        (1, 1.0, "orders.retry.1000"),
        (2, 10.0, "orders.retry.10000"),
        (3, 60.0, "orders.retry.60000"),
    ],
)
async def test_exception_retries_with_the_policy_delay(
    attempt: int, delay: float, destination: str
) -> None:
    result = await run_handler(boom, b"x", attempt=attempt, headers={"trace": "t-1"})
    assert result.outcome == "retry"
    assert not result.acked
    assert isinstance(result.error, ValueError)
    assert str(result.error) == "boom"
    assert result.delay == delay
    assert result.reason == "ValueError: boom"
    assert result.destination == destination
    # the copy: the original's headers, the next attempt, and where it was published
    assert result.headers == {"trace": "t-1", "x-attempt": attempt + 1, **route()}
    assert result.message.attempt == attempt


async def test_a_cancelled_error_the_handler_raises_itself_is_a_failure() -> None:
    """A handler that raises asyncio.CancelledError of its own accord (it awaited a
    future or task cancelled elsewhere; on trio nothing else raises it) is retried like
    any failure: nothing was cancelling the handler's task."""

    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def awaits_a_cancelled_future(msg: sc.Message) -> None:
        raise asyncio.CancelledError

    result = await run_handler(awaits_a_cancelled_future, b"x")
    assert result.outcome == "retry"
    assert isinstance(result.error, RuntimeError)
    assert "nothing was cancelling it" in str(result.error)
    assert isinstance(result.error.__cause__, asyncio.CancelledError)


async def test_exhausted_retries_dead_letter_with_the_reason() -> None:
    before = datetime.datetime.now(datetime.UTC)
    result = await run_handler(boom, b"x", attempt=POLICY.max_attempts, headers={"trace": "t"})
    assert result.outcome == "dead_letter"
    assert isinstance(result.error, ValueError)
    assert result.delay is None
    assert result.reason == "ValueError: boom"
    assert result.destination == "orders.dlq"
    headers = dict(result.headers)
    check_failed_at(headers.pop("x-failed-at"), before)
    assert headers == {
        "trace": "t",
        "x-error-type": "ValueError",
        "x-error-message": "boom",
        "x-failed-queue": QUEUE,
        "x-attempt": 4,
        **route(),
    }


async def test_reject_dead_letters_at_once() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        raise sc.Reject("quantity must be positive")

    before = datetime.datetime.now(datetime.UTC)
    result = await run_handler(handler, json={"quantity": -1})
    assert result.outcome == "dead_letter"
    assert isinstance(result.error, sc.Reject)
    assert result.reason == "strictconsume.Reject: quantity must be positive"
    assert result.destination == "orders.dlq"
    assert result.delay is None
    headers = dict(result.headers)
    check_failed_at(headers.pop("x-failed-at"), before)
    assert headers == {
        "x-error-type": "strictconsume.Reject",
        "x-error-message": "quantity must be positive",
        "x-failed-queue": QUEUE,
        "x-attempt": 1,
        **route(),
    }


@sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
async def wants_json(msg: sc.Message) -> None:
    msg.json()


@sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
async def wants_text(msg: sc.Message) -> None:
    msg.text()


@pytest.mark.parametrize(
    ("handler", "body", "message"),
    [
        pytest.param(
            wants_json,
            b"{not json",
            "the body of message 'm-7' from queue 'orders' is not JSON: Expecting "
            "property name enclosed in double quotes at line 1 column 2",
            id="json",
        ),
        pytest.param(
            wants_json,
            b"\xff{}",
            "the body of message 'm-7' from queue 'orders' is not valid utf-8 "
            "(byte 0: invalid start byte)",
            id="json-of-invalid-utf8",
        ),
        pytest.param(
            wants_text,
            b"ok\xc3(",
            "the body of message 'm-7' from queue 'orders' is not valid utf-8 "
            "(byte 2: invalid continuation byte)",
            id="text",
        ),
    ],
)
async def test_decode_error_dead_letters_at_once(
    handler: Callable[[sc.Message], Any], body: bytes, message: str
) -> None:
    before = datetime.datetime.now(datetime.UTC)
    result = await run_handler(handler, body, message_id="m-7")
    assert result.outcome == "dead_letter"
    assert isinstance(result.error, sc.DecodeError)
    assert result.reason == f"strictconsume.DecodeError: {message}"
    assert result.destination == "orders.dlq"
    headers = dict(result.headers)
    check_failed_at(headers.pop("x-failed-at"), before)
    assert headers == {
        "x-error-type": "strictconsume.DecodeError",
        "x-error-message": message,
        "x-failed-queue": QUEUE,
        "x-attempt": 1,
        **route(),
    }


async def test_retry_later_with_a_delay() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        raise sc.RetryLater(delay=5)

    result = await run_handler(handler, b"x")
    assert result.outcome == "retry"
    assert result.delay == 5.0
    assert result.destination == "orders.retry.5000"
    assert result.reason == "strictconsume.RetryLater: retry in 5 s"
    assert result.headers == {"x-attempt": 2, **route()}
    # it counts as an attempt: once the policy's are used up, it is dead-lettered
    last = await run_handler(handler, b"x", attempt=4)
    assert (last.outcome, last.destination, last.delay) == ("dead_letter", "orders.dlq", None)
    assert last.headers["x-error-type"] == "strictconsume.RetryLater"
    assert last.headers["x-attempt"] == 4


async def test_retry_later_without_a_delay_takes_the_policy_delay() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        raise sc.RetryLater(reason="gateway busy")

    result = await run_handler(handler, b"x", attempt=2)
    assert (result.outcome, result.delay, result.destination) == (
        "retry",
        10.0,
        "orders.retry.10000",
    )
    assert result.reason == "strictconsume.RetryLater: gateway busy"
    assert result.headers == {"x-attempt": 3, **route()}


async def test_requeue() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        raise sc.Requeue()

    # not an attempt: also on the last one it is requeued, not dead-lettered
    for attempt in (1, 4):
        result = await run_handler(handler, b"x", attempt=attempt)
        assert result.outcome == "requeue"
        assert isinstance(result.error, sc.Requeue)
        assert (result.delay, result.destination, result.headers) == (None, None, {})


async def test_exception_group_of_one_requeue_requeues() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        async with anyio.create_task_group() as tg:  # a task group wraps what it raises

            async def child() -> None:
                raise sc.Requeue()

            tg.start_soon(child)

    result = await run_handler(handler, b"x")
    assert result.outcome == "requeue"
    assert isinstance(result.error, ExceptionGroup)
    assert (result.delay, result.destination, result.headers) == (None, None, {})


async def test_nested_exception_groups_of_one_are_unwrapped() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def requeues(msg: sc.Message) -> None:
        raise ExceptionGroup("outer", [ExceptionGroup("inner", [sc.Requeue()])])

    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def rejects(msg: sc.Message) -> None:
        raise ExceptionGroup("outer", [sc.Reject("no")])

    assert (await run_handler(requeues, b"x")).outcome == "requeue"
    result = await run_handler(rejects, b"x")
    assert (result.outcome, result.reason) == ("dead_letter", "strictconsume.Reject: no")


async def test_exception_group_of_two_requeues_is_an_error() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        raise ExceptionGroup("two", [sc.Requeue(), sc.Requeue()])

    result = await run_handler(handler, b"x")
    assert (result.outcome, result.delay, result.destination) == (
        "retry",
        1.0,
        "orders.retry.1000",
    )
    assert result.reason == "ExceptionGroup: two (2 sub-exceptions)"


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_base_exceptions_propagate(exc_type: type[BaseException]) -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        raise exc_type("stop")

    with pytest.raises(exc_type, match=r"^stop$"):
        await run_handler(handler, b"x")


# -- 2. timeouts on trio's virtual clock --------------------------------------------------


@autojump()
async def test_timeout_retries_with_a_timeout_error_after_exactly_the_timeout(
    anyio_backend: Any,
) -> None:
    cancelled: list[float] = []

    @sc.consumer(QUEUE, timeout=30.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            cancelled.append(trio.current_time())
            raise

    start = trio.current_time()
    result = await run_handler(handler, b"slow")
    assert trio.current_time() - start == 30.0
    assert cancelled == [start + 30.0]
    assert result.outcome == "retry"
    assert type(result.error) is TimeoutError
    assert str(result.error) == "the handler exceeded its timeout of 30 s"
    assert result.reason == "TimeoutError: the handler exceeded its timeout of 30 s"
    assert (result.delay, result.destination) == (1.0, "orders.retry.1000")
    assert result.headers == {"x-attempt": 2, **route()}


@autojump()
async def test_timeout_on_the_last_attempt_dead_letters(anyio_backend: Any) -> None:
    @sc.consumer(QUEUE, timeout=30.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        await anyio.sleep(60)

    start = trio.current_time()
    result = await run_handler(handler, b"slow", attempt=4)
    assert trio.current_time() - start == 30.0
    assert (result.outcome, result.destination) == ("dead_letter", "orders.dlq")
    assert result.headers["x-error-type"] == "TimeoutError"
    assert result.headers["x-error-message"] == "the handler exceeded its timeout of 30 s"


@autojump()
@pytest.mark.parametrize("swallow", ["trio.Cancelled", "anyio"])
async def test_a_handler_that_swallows_the_cancellation_still_timed_out(
    anyio_backend: Any, swallow: str
) -> None:
    returned: list[float] = []
    cancelled_class = trio.Cancelled if swallow == "trio.Cancelled" else None

    @sc.consumer(QUEUE, timeout=30.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        catch = cancelled_class or anyio.get_cancelled_exc_class()
        try:
            await anyio.sleep(60)
        except catch:
            returned.append(trio.current_time())
            return  # swallowed: it returns as if it had finished

    start = trio.current_time()
    result = await run_handler(handler, b"slow")
    assert returned == [start + 30.0]
    assert trio.current_time() - start == 30.0
    assert result.outcome == "retry"
    assert type(result.error) is TimeoutError
    assert str(result.error) == "the handler exceeded its timeout of 30 s"


@autojump()
async def test_a_handler_under_its_timeout_acks(anyio_backend: Any) -> None:
    @sc.consumer(QUEUE, timeout=30.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        await anyio.sleep(29.5)

    start = trio.current_time()
    result = await run_handler(handler, b"x")
    assert trio.current_time() - start == 29.5
    assert result.outcome == "ack"
    assert result.error is None


@autojump()
async def test_timeout_override(anyio_backend: Any) -> None:
    @sc.consumer(QUEUE, timeout=30.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        await anyio.sleep(60)

    start = trio.current_time()
    shorter = await run_handler(handler, b"x", timeout=2.5)
    assert trio.current_time() - start == 2.5
    assert str(shorter.error) == "the handler exceeded its timeout of 2.5 s"
    # timeout=None: no timeout at all, the handler runs its 60 s and acks
    start = trio.current_time()
    unlimited = await run_handler(handler, b"x", timeout=None)
    assert trio.current_time() - start == 60.0
    assert unlimited.outcome == "ack"


@autojump()
async def test_an_undecorated_handler_has_no_timeout(anyio_backend: Any) -> None:
    async def handler(msg: sc.Message) -> None:
        await anyio.sleep(3600)

    start = trio.current_time()
    result = await run_handler(handler, b"x")
    assert trio.current_time() - start == 3600.0
    assert result.outcome == "ack"


async def test_a_cancellation_from_outside_propagates() -> None:
    ran: list[bool] = []

    @sc.consumer(QUEUE, timeout=30.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        ran.append(True)
        await anyio.sleep_forever()

    with anyio.move_on_after(0.05) as scope:
        await run_handler(handler, b"x")
        pytest.fail("run_handler returned although it was cancelled")  # pragma: no cover
    assert scope.cancelled_caught
    assert ran == [True]


# -- 3. the message: codec, properties, attempts ------------------------------------------


async def seen_by(
    queue_type: Literal["classic", "quorum"] = "classic", **options: Any
) -> tuple[HandlerResult, list[sc.Message]]:
    """Run a handler that records its message; the result and what it saw."""
    seen: list[sc.Message] = []

    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY, queue_type=queue_type)
    async def handler(msg: sc.Message) -> None:
        seen.append(msg)

    result = await run_handler(handler, **options)
    assert result.outcome == "ack"
    return result, seen


async def test_headers_go_through_the_amqp_codec() -> None:
    headers: FieldTable = {
        "float": 1.1,
        "bytes": b"\x00\xff",
        "str": "héllo",
        "int": 7,
        "big": 2**40,
        "negative": -5,
        "bool": True,
        "none": None,
        "decimal": decimal.Decimal("1.25"),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "table": {"inner": b"in", "deeper": {"x": b"y", "f": 0.1}},
        "list": [b"a", 1, "s", 2.5, [b"b"], {"k": b"v"}],
    }
    original = dict(headers)
    result, [msg] = await seen_by(body=b"x", headers=headers)
    assert result.message is msg
    assert msg.headers == {
        "float": 1.1,
        "bytes": bytearray(b"\x00\xff"),
        "str": "héllo",
        "int": 7,
        "big": 2**40,
        "negative": -5,
        "bool": True,
        "none": None,
        "decimal": decimal.Decimal("1.25"),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "table": {"inner": bytearray(b"in"), "deeper": {"x": bytearray(b"y"), "f": 0.1}},
        "list": [bytearray(b"a"), 1, "s", 2.5, [bytearray(b"b")], {"k": bytearray(b"v")}],
    }
    assert msg.headers["float"] == 1.1  # a double, as the App publishes it
    assert type(msg.headers["bytes"]) is bytearray
    nested = msg.headers["table"]
    assert isinstance(nested, dict)
    assert type(nested["inner"]) is bytearray
    # the caller's dict is left alone, bytes and all
    assert headers == original
    assert type(headers["bytes"]) is bytes
    table = headers["table"]
    assert isinstance(table, dict)
    assert type(table["inner"]) is bytes


async def test_properties_reach_the_message_and_are_not_mutated() -> None:
    stamp = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    caller_headers: FieldTable = {"a": b"x", "both": "from properties"}
    properties = Properties(
        message_id="m-1",
        content_type="text/plain",
        correlation_id="c-1",
        reply_to="replies",
        timestamp=stamp,
        app_id="shop",
        priority=3,
        headers=caller_headers,
    )
    _, [msg] = await seen_by(
        body=b"x", properties=properties, headers={"both": "from headers", "b": 2}
    )
    assert (msg.message_id, msg.content_type, msg.correlation_id, msg.reply_to) == (
        "m-1",
        "text/plain",
        "c-1",
        "replies",
    )
    assert msg.timestamp == stamp
    assert (msg.properties.app_id, msg.properties.priority) == ("shop", 3)
    assert msg.headers == {"a": bytearray(b"x"), "both": "from headers", "b": 2}
    # the caller's object: same headers dict, same contents, same values
    assert properties.headers is caller_headers
    assert caller_headers == {"a": b"x", "both": "from properties"}
    assert type(caller_headers["a"]) is bytes
    assert (properties.message_id, properties.content_type) == ("m-1", "text/plain")
    assert msg.properties is not properties


async def test_message_id_and_content_type_override_the_properties() -> None:
    properties = Properties(message_id="m-1", content_type="text/plain")
    _, [msg] = await seen_by(
        body=b"x", properties=properties, message_id="m-2", content_type="application/xml"
    )
    assert (msg.message_id, msg.content_type) == ("m-2", "application/xml")
    assert (properties.message_id, properties.content_type) == ("m-1", "text/plain")


async def test_json_sets_the_body_and_the_content_type() -> None:
    value = {"id": 7, "quantity": -1, "name": "thé"}
    _, [msg] = await seen_by(json=value)
    assert msg.body == b'{"id": 7, "quantity": -1, "name": "th\\u00e9"}'
    assert msg.content_type == "application/json"
    assert msg.json() == value
    _, [other] = await seen_by(json=[1], content_type="application/vnd.shop+json")
    assert (other.body, other.content_type) == (b"[1]", "application/vnd.shop+json")
    _, [null] = await seen_by(json=None)
    assert (null.body, null.content_type) == (b"null", "application/json")


async def test_a_str_body_is_utf8_and_no_content_type_is_made_up() -> None:
    _, [msg] = await seen_by(body="héllo ✓")
    assert msg.body == "héllo ✓".encode()
    assert msg.text() == "héllo ✓"
    assert msg.content_type is None
    assert msg.properties.headers is None
    assert msg.headers == {}


async def test_attempt_travels_in_x_attempt() -> None:
    _, [msg] = await seen_by(body=b"x", attempt=3)
    assert msg.attempt == 3
    assert msg.headers == {"x-attempt": 3}
    assert msg.redelivered is False
    _, [first] = await seen_by(body=b"x")
    assert (first.attempt, first.headers) == (1, {})
    # a garbled header counts as the first attempt, as for a real delivery
    _, [garbled] = await seen_by(body=b"x", headers={"x-attempt": "two"})
    assert garbled.attempt == 1


async def test_delivery_count_counts_on_a_quorum_queue_only() -> None:
    _, [quorum] = await seen_by("quorum", body=b"x", delivery_count=2)
    assert quorum.attempt == 3
    assert quorum.redelivered is True
    assert quorum.headers == {"x-delivery-count": 2}
    _, [classic] = await seen_by("classic", body=b"x", delivery_count=2)
    assert classic.attempt == 1
    _, [both] = await seen_by("quorum", body=b"x", attempt=2, delivery_count=2)
    assert both.attempt == 4


async def test_a_quorum_copy_counts_the_deliveries_in_x_attempt() -> None:
    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY, queue_type="quorum")
    async def handler(msg: sc.Message) -> None:
        raise ValueError("boom")

    result = await run_handler(handler, b"x", delivery_count=2)
    assert result.message.attempt == 3
    assert (result.outcome, result.delay, result.destination) == (
        "retry",
        60.0,
        "orders.retry.60000",
    )
    # x-delivery-count is not carried over: it is in x-attempt already
    assert result.headers == {"x-attempt": 4, **route()}
    last = await run_handler(handler, b"x", delivery_count=3)
    assert (last.outcome, last.headers["x-attempt"]) == ("dead_letter", 4)
    assert "x-delivery-count" not in last.headers


async def test_routing_key_defaults_to_the_queue() -> None:
    _, [msg] = await seen_by(body=b"x")
    assert (msg.exchange, msg.routing_key, msg.redelivered, msg.queue) == ("", QUEUE, False, QUEUE)
    assert msg.consumer_tag == "strictconsume.testing"
    _, [routed] = await seen_by(
        body=b"x", exchange="shop", routing_key="order.created", redelivered=True
    )
    assert (routed.exchange, routed.routing_key, routed.redelivered) == (
        "shop",
        "order.created",
        True,
    )


async def test_a_retried_copy_keeps_its_original_route() -> None:
    headers: FieldTable = {
        "x-attempt": 2,
        "x-original-exchange": "shop",
        "x-original-routing-key": "order.created",
    }
    result = await run_handler(boom, b"x", headers=headers)
    assert (result.message.exchange, result.message.routing_key) == ("shop", "order.created")
    assert result.message.attempt == 2
    assert result.headers == {"x-attempt": 3, **route("order.created", "shop")}
    routed = await run_handler(boom, b"x", exchange="shop", routing_key="order.created")
    assert routed.headers == {"x-attempt": 2, **route("order.created", "shop")}


async def test_a_plain_function_runs_on_queue_test() -> None:
    seen: list[sc.Message] = []

    async def handler(msg: sc.Message) -> None:
        seen.append(msg)
        if msg.body == b"fail":
            raise RuntimeError("nope")

    ok = await run_handler(handler, b"x")
    assert ok.outcome == "ack"
    assert (seen[0].queue, seen[0].routing_key) == ("test", "test")
    failed = await run_handler(handler, b"fail")
    # the default policy: Retry() retries after 1 s first
    assert (failed.outcome, failed.delay, failed.destination) == ("retry", 1.0, "test.retry.1000")
    assert failed.headers == {"x-attempt": 2, **route("test")}
    last = await run_handler(handler, b"fail", attempt=sc.Retry().max_attempts)
    assert (last.outcome, last.destination) == ("dead_letter", "test.dlq")
    assert last.headers["x-failed-queue"] == "test"
    named = await run_handler(handler, b"fail", queue="invoices")
    assert (named.destination, named.message.queue) == ("invoices.retry.1000", "invoices")


async def test_an_async_generator_is_refused() -> None:
    async def handler(msg: sc.Message) -> AsyncIterator[None]:
        yield

    with pytest.raises(TypeError, match="must be an 'async def' or a plain 'def' function"):
        await run_handler(handler, b"x")


async def test_queue_and_retry_overrides() -> None:
    result = await run_handler(boom, b"x", queue="invoices", retry=sc.Retry(delays=(0.5,)))
    assert result.message.queue == "invoices"
    assert result.message.routing_key == "invoices"
    assert (result.outcome, result.delay, result.destination) == (
        "retry",
        0.5,
        "invoices.retry.500",
    )
    assert result.headers == {"x-attempt": 2, **route("invoices")}
    second = await run_handler(
        boom, b"x", queue="invoices", retry=sc.Retry(delays=(0.5,)), attempt=2
    )
    assert (second.outcome, second.destination) == ("dead_letter", "invoices.dlq")
    assert second.headers["x-failed-queue"] == "invoices"
    at_once = await run_handler(boom, b"x", retry=sc.Retry(delays=()))
    assert (at_once.outcome, at_once.destination) == ("dead_letter", "orders.dlq")
    # the decorated function's own spec is left as it was
    assert (await run_handler(boom, b"x")).destination == "orders.retry.1000"


async def test_a_consumer_spec_is_a_handler() -> None:
    async def handler(msg: sc.Message) -> None:
        raise ValueError("boom")

    spec = sc.ConsumerSpec(queue="specs", handler=handler, retry=sc.Retry(delays=(2.0,)))
    result = await run_handler(spec, b"x")
    assert (result.outcome, result.destination, result.message.queue) == (
        "retry",
        "specs.retry.2000",
        "specs",
    )


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_run_handler_sync(backend: Any) -> None:
    libraries: list[str] = []

    @sc.consumer(QUEUE, timeout=5.0, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        libraries.append(sniffio.current_async_library())
        await anyio.lowlevel.checkpoint()
        if msg.json()["fail"]:
            raise ValueError("boom")

    ok = run_handler_sync(handler, json={"fail": False}, backend=backend)
    assert ok.outcome == "ack"
    failed = run_handler_sync(handler, b'{"fail": true}', backend=backend, attempt=3)
    assert (failed.outcome, failed.delay, failed.destination) == (
        "retry",
        60.0,
        "orders.retry.60000",
    )
    assert failed.headers == {"x-attempt": 4, **route()}
    assert libraries == [backend, backend]


def test_run_handler_sync_times_out() -> None:
    @sc.consumer(QUEUE, timeout=0.05, retry=POLICY)
    async def handler(msg: sc.Message) -> None:
        await anyio.sleep(5)

    result = run_handler_sync(handler, b"x", backend="asyncio")
    assert result.outcome == "retry"
    assert str(result.error) == "the handler exceeded its timeout of 0.05 s"


# -- 3b. attempt, content type and reasons, as the App has them ---------------------------


async def test_an_explicit_attempt_overrides_the_header_and_must_be_positive() -> None:
    async def handle(msg: sc.Message) -> None:
        pass

    result = await run_handler(handle, headers={"x-attempt": 5}, attempt=1)
    assert result.message.attempt == 1
    assert (await run_handler(handle, headers={"x-attempt": 5})).message.attempt == 5
    for wrong in (0, -2, True):
        with pytest.raises(ValueError, match="attempt must be an int >= 1"):
            await run_handler(handle, attempt=wrong)


async def test_json_keeps_the_content_type_of_the_properties() -> None:
    async def handle(msg: sc.Message) -> None:
        pass

    vendor = Properties(content_type="application/vnd.shop+json")
    result = await run_handler(handle, json=[1], properties=vendor)
    assert result.message.content_type == "application/vnd.shop+json"
    assert result.message.json() == [1]


async def test_reasons_are_worded_as_the_app_logs_them() -> None:
    async def bare(msg: sc.Message) -> None:
        raise ValueError()

    result = await run_handler(bare, retry=sc.Retry(delays=()))
    assert (result.outcome, result.reason) == ("dead_letter", "ValueError")

    async def grouped(msg: sc.Message) -> None:
        raise ExceptionGroup("g", [sc.Requeue()])

    result = await run_handler(grouped)
    assert (result.outcome, result.reason) == ("requeue", "strictconsume.Requeue")


# -- 4. equivalence with the App on a real broker ------------------------------------------

#: The retry delay of the equivalence consumers, and the one RetryLater asks for (long,
#: so that the copy is still in its retry queue when pika looks).
RETRY_DELAY = 0.2
LATER_DELAY = 60.0
#: How long any awaited condition may take before the test fails.
DEADLINE = 15.0


def _publish(url: str, queue: str, messages: list[tuple[bytes, str, FieldTable | None]]) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        for body, message_id, headers in messages:
            properties = pika.BasicProperties(message_id=message_id, headers=headers)
            ch.basic_publish("", queue, body, properties, mandatory=True)


def _get_all(url: str, queue: str) -> list[OracleMessage]:
    got: list[OracleMessage] = []
    with pika_channel(url) as ch:
        while (message := get_from(ch, queue)) is not None:
            got.append(message)
    return got


@attrs.frozen
class Seen:
    """One delivery as the App's handler saw it."""

    body: bytes
    attempt: int
    redelivered: bool
    message_id: str | None
    headers: FieldTable
    exchange: str
    routing_key: str


@pytest.fixture
def oracle(broker_url: str) -> Oracle:
    return Oracle(broker_url)


@pytest.fixture
def queues(oracle: Oracle) -> Iterator[list[str]]:
    """Unique queue names; each is deleted afterwards with its .dlq and retry queues."""
    made: list[str] = []
    yield made
    for queue in made:
        for ms in (round(RETRY_DELAY * 1000), round(LATER_DELAY * 1000)):
            oracle.delete_now(f"{queue}.retry.{ms}")
        oracle.delete_now(f"{queue}.dlq")
        oracle.delete_now(queue)


def new_queue(queues: list[str]) -> str:
    name = f"sc-testing-{uuid.uuid4().hex}"
    queues.append(name)
    return name


async def wait_for_outcomes(app: sc.App, queue: str, count: int) -> None:
    try:
        with anyio.fail_after(DEADLINE):
            while True:
                if sum(n for (q, _), n in app.outcomes.items() if q == queue) >= count:
                    return
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not {count} outcomes within {DEADLINE} s: {app.outcomes}") from None


def record(seen: list[Seen], msg: sc.Message) -> None:
    seen.append(
        Seen(
            body=msg.body,
            attempt=msg.attempt,
            redelivered=msg.redelivered,
            message_id=msg.message_id,
            headers=dict(msg.headers),
            exchange=msg.exchange,
            routing_key=msg.routing_key,
        )
    )


def plain(headers: dict[str, Any] | FieldTable) -> dict[str, Any]:
    """Header values compared across pika and pamqp (bytes vs bytearray)."""
    return {k: bytes(v) if isinstance(v, bytearray) else v for k, v in headers.items()}


async def predict(handler: Callable[[sc.Message], Any], delivery: Seen) -> HandlerResult:
    """run_handler on what the App's handler was given."""
    return await run_handler(
        handler,
        delivery.body,
        headers=delivery.headers,
        message_id=delivery.message_id,
        redelivered=delivery.redelivered,
    )


#: What each body makes the handler do, and the App's outcome of each delivery.
CASES: dict[bytes, list[str]] = {
    b"ack": ["ack"],
    b"raise": ["retry", "dead_letter"],
    b"reject": ["dead_letter"],
    b"garbage{": ["dead_letter"],
    b"later": ["retry"],
    b"requeue": ["requeue", "ack"],
    b"slow": ["retry", "dead_letter"],
}


@pytest.mark.broker
async def test_run_handler_decides_as_the_app(
    broker_url: str, oracle: Oracle, queues: list[str]
) -> None:
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=1.0)
    seen: list[Seen] = []

    @app.consumer(queue, retry=sc.Retry(delays=(RETRY_DELAY,)), timeout=0.5)
    async def handle(msg: sc.Message) -> None:
        record(seen, msg)
        if msg.body == b"ack":
            return
        if msg.body == b"raise":
            raise ValueError(f"boom on attempt {msg.attempt}")
        if msg.body == b"reject":
            raise sc.Reject("not wanted")
        if msg.body == b"later":
            raise sc.RetryLater(delay=LATER_DELAY)
        if msg.body == b"requeue":
            if not msg.redelivered:
                raise sc.Requeue()
            return
        if msg.body == b"slow":
            await anyio.sleep(10)
        msg.json()

    messages: list[tuple[bytes, str, FieldTable | None]] = [
        (body, f"mid-{body.decode()}", {"case": body.decode(), "n": i})
        for i, body in enumerate(CASES)
    ]
    async with app.running():
        await anyio.to_thread.run_sync(_publish, broker_url, queue, messages)
        await wait_for_outcomes(app, queue, sum(len(v) for v in CASES.values()))

    # -- what the App did, as pika and the App's counters see it
    real = list(seen)
    later_ms = round(LATER_DELAY * 1000)
    assert await oracle.message_count(queue) == 0
    assert await oracle.message_count(f"{queue}.retry.{round(RETRY_DELAY * 1000)}") == 0
    retried = await anyio.to_thread.run_sync(_get_all, broker_url, f"{queue}.retry.{later_ms}")
    dead = await anyio.to_thread.run_sync(_get_all, broker_url, f"{queue}.dlq")
    assert [m.body for m in retried] == [b"later"]
    assert sorted(m.body for m in dead) == sorted([b"raise", b"reject", b"garbage{", b"slow"])
    expected_counts = Counter(
        {
            (queue, outcome): n
            for outcome, n in Counter(o for outcomes in CASES.values() for o in outcomes).items()
        }
    )
    assert +app.outcomes == expected_counts

    # -- run_handler on each delivery the App's handler saw
    by_body: dict[bytes, list[tuple[Seen, HandlerResult]]] = {}
    for delivery in real:
        by_body.setdefault(delivery.body, []).append((delivery, await predict(handle, delivery)))
    assert {body: [r.outcome for _, r in runs] for body, runs in by_body.items()} == CASES
    predicted_counts = Counter((queue, r.outcome) for runs in by_body.values() for _, r in runs)
    assert predicted_counts == +app.outcomes
    for runs in by_body.values():
        for delivery, result in runs:
            assert result.message.attempt == delivery.attempt
            assert (result.message.exchange, result.message.routing_key) == (
                delivery.exchange,
                delivery.routing_key,
            )

    # a retry: the copy run_handler predicts is what the App's handler got next
    (first, retry), (second, _) = by_body[b"raise"]
    assert (retry.destination, retry.delay) == (f"{queue}.retry.200", RETRY_DELAY)
    assert (first.attempt, second.attempt) == (1, 2)
    # the broker adds its dead-lettering headers on the way back from the retry queue
    broker_added = ("x-death", "x-first-death-", "x-last-death-")
    assert {k: v for k, v in second.headers.items() if not k.startswith(broker_added)} == (
        retry.headers
    )
    assert retry.headers == {"case": "raise", "n": 1, "x-attempt": 2, **route(queue)}
    (_, slow_retry), _ = by_body[b"slow"]
    assert slow_retry.destination == f"{queue}.retry.200"
    assert type(slow_retry.error) is TimeoutError

    # RetryLater(delay=60): the copy sits in <q>.retry.60000 with the predicted headers
    [(_, later)] = by_body[b"later"]
    assert later.destination == f"{queue}.retry.{later_ms}"
    assert later.delay == LATER_DELAY
    assert retried[0].headers == plain(later.headers)
    assert retried[0].properties.message_id == "mid-later"

    # the dead letters: what pika reads in <q>.dlq is what run_handler predicted
    for letter in dead:
        last = by_body[letter.body][-1][1]
        assert last.outcome == "dead_letter"
        assert last.destination == f"{queue}.dlq"
        headers = letter.headers or {}
        assert FAILED_AT.match(str(headers["x-failed-at"])), headers["x-failed-at"]
        for key in (
            "x-error-type",
            "x-error-message",
            "x-attempt",
            "x-failed-queue",
            "x-original-exchange",
            "x-original-routing-key",
            "case",
            "n",
        ):
            assert headers[key] == last.headers[key], (letter.body, key)
        assert set(headers) == set(last.headers), letter.body
        assert last.reason == f"{headers['x-error-type']}: {headers['x-error-message']}"
        assert letter.properties.message_id == f"mid-{letter.body.decode()}"

    reasons = {letter.body: (letter.headers or {})["x-error-type"] for letter in dead}
    assert reasons == {
        b"raise": "ValueError",
        b"reject": "strictconsume.Reject",
        b"garbage{": "strictconsume.DecodeError",
        b"slow": "TimeoutError",
    }
    attempts = {letter.body: (letter.headers or {})["x-attempt"] for letter in dead}
    assert attempts == {b"raise": 2, b"reject": 1, b"garbage{": 1, b"slow": 2}
    messages_of = {letter.body: (letter.headers or {})["x-error-message"] for letter in dead}
    assert messages_of == {
        b"raise": "boom on attempt 2",
        b"reject": "not wanted",
        b"garbage{": f"the body of message 'mid-garbage{{' from queue {queue!r} is not JSON: "
        "Expecting value at line 1 column 1",
        b"slow": "the handler exceeded its timeout of 0.5 s",
    }

    # the requeue: requeued once, then acked on the redelivery
    [(first_run, requeued), (second_run, acked)] = by_body[b"requeue"]
    assert (first_run.redelivered, second_run.redelivered) == (False, True)
    assert (requeued.outcome, requeued.destination, requeued.headers) == ("requeue", None, {})
    assert acked.outcome == "ack"


@pytest.mark.broker
async def test_run_handler_counts_quorum_deliveries_as_the_app(
    broker_url: str, broker_version: tuple[int, int, int], oracle: Oracle, queues: list[str]
) -> None:
    """Two requeues, then a failure with no retries left. Before RabbitMQ 4.3 each
    requeue raised x-delivery-count and so the attempt (the failure is attempt 3);
    from 4.3 a requeue does not count (every run is attempt 1). ``run_handler``
    predicts the same from the deliveries' headers, and from ``delivery_count=``."""
    queue = new_queue(queues)
    app = sc.App(url=broker_url, grace_period=1.0)
    seen: list[Seen] = []

    @app.consumer(queue, retry=sc.Retry(delays=()), timeout=5.0, queue_type="quorum")
    async def handle(msg: sc.Message) -> None:
        record(seen, msg)
        # the returns so far: x-delivery-count counts them before 4.3, x-acquired-count
        # from 4.3 (where x-delivery-count counts failures only)
        returns = msg.headers.get("x-delivery-count") or msg.headers.get("x-acquired-count")
        if not isinstance(returns, int) or returns < 2:
            raise sc.Requeue()
        raise ValueError(f"boom on attempt {msg.attempt}")

    messages: list[tuple[bytes, str, FieldTable | None]] = [(b"q", "mid-q", {"case": "quorum"})]
    async with app.running():
        await anyio.to_thread.run_sync(_publish, broker_url, queue, messages)
        await wait_for_outcomes(app, queue, 3)

    real = list(seen)
    counts = nack_counts_as_delivery(broker_version)
    assert [(d.attempt, d.redelivered, d.headers.get("x-delivery-count")) for d in real] == (
        [(1, False, None), (2, True, 1), (3, True, 2)]
        if counts
        else [(1, False, None), (1, True, None), (1, True, None)]
    )
    assert +app.outcomes == Counter({(queue, "requeue"): 2, (queue, "dead_letter"): 1})
    assert await oracle.message_count(queue) == 0
    [letter] = await anyio.to_thread.run_sync(_get_all, broker_url, f"{queue}.dlq")

    # given the real deliveries' headers, and given delivery_count= instead
    for run, delivery in enumerate(real):
        count = run if counts else 0
        predicted = await predict(handle, delivery)
        assert predicted.message.attempt == delivery.attempt
        assert predicted.outcome == ("requeue" if run < 2 else "dead_letter")
        acquired = {} if counts or not run else {"x-acquired-count": run}
        given = await run_handler(
            handle,
            b"q",
            message_id="mid-q",
            headers={"case": "quorum", **acquired},
            delivery_count=count,
        )
        assert given.message.attempt == delivery.attempt
        assert given.outcome == ("requeue" if run < 2 else "dead_letter")
    last = await predict(handle, real[-1])
    headers = dict(letter.headers or {})
    # The .dlq of a quorum consumer is a quorum queue: before 4.0 a basic.get from it
    # carries the broker's own x-delivery-count 0, which the copy itself does not hold.
    if broker_version[:2] < (4, 0):
        assert headers.pop("x-delivery-count") == 0
    assert set(headers) == set(last.headers)
    assert "x-delivery-count" not in last.headers
    for key in ("x-error-type", "x-error-message", "x-attempt", "x-failed-queue", "case"):
        assert headers[key] == last.headers[key], key
    attempt = 3 if counts else 1
    assert (headers["x-attempt"], headers["x-error-message"]) == (
        attempt,
        f"boom on attempt {attempt}",
    )
