"""Unit-test handlers without a broker: feed a message, get the outcome back.

::

    from strictconsume.testing import run_handler

    async def test_a_bad_quantity_is_dead_lettered():
        result = await run_handler(handle_order, json={"id": 7, "quantity": -1})
        assert result.outcome == "dead_letter"
        assert result.reason == "ValueError: quantity must be positive"

The outcome is decided by the code the App runs (:func:`decide` over the handler's
exception, the consumer's :class:`Retry` policy and the message's attempt), the
handler runs under its ``timeout`` as in the App, and the properties go through the
AMQP codec first, so headers arrive as they would from a publisher using this
package (a ``float`` as a double, ``bytes`` arrive as ``bytearray``, a
timestamp as a ``datetime`` in UTC; see the README's "Header and property types").
:func:`run_handler_sync` is the same for tests that are not async.

Not modelled: what the broker does on its own, such as a quorum queue's delivery
limit dead-lettering a message that was returned too often. ``delivery_count=`` sets
the ``x-delivery-count`` a redelivery would carry; what raises it depends on the
broker: a lost connection always, a ``Requeue`` before RabbitMQ 4.3 only (from 4.3
a requeue leaves it, and the attempt, as they were).
"""

from __future__ import annotations

import functools
import json as json_module
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs

from ._consumer import SPEC_ATTRIBUTE, ConsumerSpec
from ._copies import copy_headers, dead_letter_headers, retry_headers
from ._handler import call_handler
from ._message import ATTEMPT_HEADER, DELIVERY_COUNT_HEADER, Message
from ._outcome import OutcomeKind, decide, error_type, sole_exception
from ._pipeline import build_pipeline
from ._reply import Reply
from ._retry import Retry, dead_letter_queue_name, retry_queue_name
from .amqp import Delivery, Properties, decode_properties, encode_properties

if TYPE_CHECKING:
    from pamqp.common import FieldTable

    from ._app import App
    from ._middleware import CallNext, Middleware

__all__ = ["HandlerResult", "run_handler", "run_handler_sync"]

_MISSING: Any = object()


@attrs.frozen
class HandlerResult:
    """What the App would do with the message after the handler ran."""

    #: ``"ack"``, ``"retry"``, ``"dead_letter"`` or ``"requeue"``.
    outcome: Literal["ack", "retry", "dead_letter", "requeue", "duplicate"]
    #: The message as the handler saw it.
    message: Message
    #: What the handler raised (a ``TimeoutError`` when it ran out of time), else None.
    error: Exception | None = None
    #: Seconds before the retry (``"retry"`` only).
    delay: float | None = None
    #: ``"ValueError: boom"`` (``x-error-type: x-error-message`` of a dead letter).
    reason: str | None = None
    #: The queue the copy would be published to (``<queue>.retry.<ms>``, ``.dlq``).
    destination: str | None = None
    #: The headers the copy would carry (the original's, updated), else empty.
    headers: FieldTable = attrs.field(factory=dict)
    #: What the handler returned (after the middleware), when it returned.
    value: Any = None
    #: The reply the App would publish (the message had ``reply_to``), else None.
    reply: Reply | None = None

    @property
    def acked(self) -> bool:
        return self.outcome == "ack"


def _spec_of(
    handler: Callable[..., Awaitable[Any]] | Callable[..., Any] | ConsumerSpec,
    queue: str | None,
    timeout: float | None,
    retry: Retry | None,
) -> ConsumerSpec:
    spec = handler if isinstance(handler, ConsumerSpec) else getattr(handler, SPEC_ATTRIBUTE, None)
    if not isinstance(spec, ConsumerSpec):
        if not callable(handler):
            raise TypeError(f"{handler!r} is not a handler")
        spec = ConsumerSpec(queue=queue or "test", handler=handler)
    changes: dict[str, Any] = {}
    if queue is not None:
        changes["queue"] = queue
    if timeout is not _MISSING:
        changes["timeout"] = timeout
    if retry is not None:
        changes["retry"] = retry
    return attrs.evolve(spec, **changes) if changes else spec


def _through_the_codec(properties: Properties) -> Properties:
    """``properties`` encoded as we publish them and decoded as a delivery's are."""
    return decode_properties(encode_properties(properties))


def _make_message(
    spec: ConsumerSpec,
    body: bytes | str = b"",
    *,
    json: Any = _MISSING,
    headers: FieldTable | None = None,
    properties: Properties | None = None,
    message_id: str | None = None,
    content_type: str | None = None,
    attempt: int | None = None,
    delivery_count: int = 0,
    routing_key: str | None = None,
    exchange: str = "",
    redelivered: bool = False,
    delivery_tag: int = 1,
) -> Message:
    """The :class:`Message` the App would hand the handler of ``spec``."""
    props = Properties() if properties is None else _copy_of(properties)
    if json is not _MISSING:
        body = json_module.dumps(json).encode()
        content_type = content_type or props.content_type or "application/json"
    data = body.encode() if isinstance(body, str) else bytes(body)
    merged: FieldTable = dict(props.headers or {})
    merged.update(headers or {})
    if attempt is not None:
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1, not {attempt!r}")
        merged[ATTEMPT_HEADER] = attempt
    if delivery_count:
        merged[DELIVERY_COUNT_HEADER] = delivery_count
        redelivered = True
    props.headers = merged or None
    if message_id is not None:
        props.message_id = message_id
    if content_type is not None:
        props.content_type = content_type
    delivery = Delivery(
        channel_id=1,
        consumer_tag="strictconsume.testing",
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=spec.queue if routing_key is None else routing_key,
        properties=_through_the_codec(props),
        body=data,
    )
    return Message.from_delivery(delivery, spec.queue, delivery_count=spec.queue_type == "quorum")


def _copy_of(properties: Properties) -> Properties:
    """A copy of pamqp's properties object (the caller's is left alone)."""
    copy = Properties()
    for name in Properties.attributes():
        setattr(copy, name, getattr(properties, name))
    return copy


async def run_handler(
    handler: Callable[..., Awaitable[Any]] | Callable[..., Any] | ConsumerSpec,
    body: bytes | str = b"",
    *,
    json: Any = _MISSING,
    headers: FieldTable | None = None,
    properties: Properties | None = None,
    message_id: str | None = None,
    content_type: str | None = None,
    attempt: int | None = None,
    delivery_count: int = 0,
    routing_key: str | None = None,
    exchange: str = "",
    redelivered: bool = False,
    queue: str | None = None,
    timeout: float | None = _MISSING,  # noqa: ASYNC109 (the handler's, as in @consumer)
    retry: Retry | None = None,
    reply_to: str | None = None,
    correlation_id: str | None = None,
    middleware: Sequence[Middleware] = (),
    app: App | None = None,
) -> HandlerResult:
    """Run ``handler`` on one message and return what the App would do with it.

    Args:
        handler: A function decorated with ``@consumer`` / ``@app.consumer`` (its
            queue, timeout, retry policy and middleware apply), a
            :class:`ConsumerSpec`, or a plain function (queue ``"test"``, no timeout,
            the default retry policy). It is called as the App calls it: its typed
            body decoded, a plain ``def`` in a worker thread, inside the middleware.
        body: The body (``str`` is encoded as UTF-8); or ``json=`` a value to encode
            (content type ``application/json``).
        headers, properties, message_id, content_type: The message's properties.
        attempt: Which attempt this delivery is, from 1 (sets ``x-attempt``, which a
            retried copy carries; default: the headers', else 1).
        delivery_count: A quorum queue's ``x-delivery-count`` (returns before this).
        routing_key, exchange, redelivered: As delivered (routing key: the queue).
        queue, timeout, retry: Override the consumer's.
        reply_to, correlation_id: Make the message a request: the handler's return
            value becomes :attr:`HandlerResult.reply` (what the App would publish).
        middleware: The App's middleware, around the consumer's own.
        app: Take the App's middleware (``middleware=`` comes inside it).

    Raises:
        BaseException: what the handler raised that is not an ``Exception``
            (``KeyboardInterrupt``, ``SystemExit``): the App would requeue the
            message and stop.
    """
    spec = _spec_of(handler, queue, timeout, retry)
    replies: list[Reply] = []

    async def capture(reply: Reply) -> None:
        replies.append(reply)

    returned: list[Any] = []

    async def keep(msg: Message, call_next: CallNext) -> Any:
        value = await call_next(msg)
        returned.append(value)
        return value

    outer = (*app.middleware, *middleware) if app is not None else tuple(middleware)
    pipeline = build_pipeline(spec, middleware=(keep, *outer), reply=capture)

    if reply_to is not None or correlation_id is not None:
        properties = _copy_of(properties) if properties is not None else Properties()
        properties.reply_to = reply_to if reply_to is not None else properties.reply_to
        if correlation_id is not None:
            properties.correlation_id = correlation_id
    msg = _make_message(
        spec,
        body,
        json=json,
        headers=headers,
        properties=properties,
        message_id=message_id,
        content_type=content_type,
        attempt=attempt,
        delivery_count=delivery_count,
        routing_key=routing_key,
        exchange=exchange,
        redelivered=redelivered,
    )
    error = await call_handler(spec, msg, pipeline=pipeline)
    outcome = decide(error, attempt=msg.attempt, retry=spec.retry)
    kind = outcome.kind
    reason = outcome.error_type or None
    if reason and outcome.error_message:
        reason = f"{reason}: {outcome.error_message}"
    destination: str | None = None
    copy: FieldTable = {}
    if kind is OutcomeKind.RETRY:
        assert outcome.delay is not None
        destination = retry_queue_name(spec.queue, outcome.delay)
        copy = copy_headers(msg.headers, retry_headers(msg))
    elif kind is OutcomeKind.DEAD_LETTER:
        destination = dead_letter_queue_name(spec.queue)
        copy = copy_headers(msg.headers, dead_letter_headers(msg, outcome))
    elif kind is OutcomeKind.REQUEUE and error is not None:
        reason = error_type(sole_exception(error))
    return HandlerResult(
        outcome=kind.value,  # type: ignore[arg-type]  # CANCELLED never comes from decide
        message=msg,
        error=error,
        delay=outcome.delay,
        reason=reason,
        destination=destination,
        headers=copy,
        value=returned[0] if returned else None,
        reply=replies[0] if replies else None,
    )


def run_handler_sync(
    handler: Callable[..., Awaitable[Any]] | Callable[..., Any] | ConsumerSpec,
    body: bytes | str = b"",
    *,
    backend: Literal["trio", "asyncio"] = "trio",
    **options: Any,
) -> HandlerResult:
    """:func:`run_handler` in an event loop of its own, for tests that are not async."""
    return anyio.run(functools.partial(run_handler, handler, body, **options), backend=backend)
