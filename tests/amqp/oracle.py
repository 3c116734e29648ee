"""The independent client for broker tests: pika's BlockingConnection as an oracle.

Every call opens its own short-lived pika connection and closes it cleanly, so the
calls are thread-safe and can run from trio or asyncio tests through
:func:`anyio.to_thread.run_sync` (pika's BlockingConnection must never block an event
loop). :class:`Oracle` wraps them as coroutines.

pika and pamqp (our codec) map field-table values differently; see
``tests/amqp/test_broker.py`` (the headers tests) for the exact mapping.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import anyio.to_thread
import attrs
import pika

__all__ = ["Oracle", "OracleMessage", "get_from", "pika_channel"]

P = ParamSpec("P")
T = TypeVar("T")


@attrs.frozen
class OracleMessage:
    """A message as pika saw it."""

    body: bytes
    headers: dict[str, Any] | None
    properties: Any  # pika.BasicProperties
    redelivered: bool
    message_count: int


@contextlib.contextmanager
def pika_channel(url: str) -> Iterator[Any]:
    """A pika channel on a connection of its own, closed on exit (blocking: call it from
    a worker thread)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def _message_count(url: str, queue: str) -> int:
    with pika_channel(url) as ch:
        return int(ch.queue_declare(queue, passive=True).method.message_count)


def _consumer_count(url: str, queue: str) -> int:
    with pika_channel(url) as ch:
        return int(ch.queue_declare(queue, passive=True).method.consumer_count)


def _queue_exists(url: str, queue: str) -> bool:
    try:
        _message_count(url, queue)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return False
        raise
    return True


def _declare(url: str, queue: str, arguments: dict[str, Any] | None) -> None:
    with pika_channel(url) as ch:
        ch.queue_declare(queue, arguments=arguments)


def _delete(url: str, queue: str) -> None:
    with pika_channel(url) as ch:
        ch.queue_delete(queue)


def _publish(
    url: str, queue: str, body: bytes, headers: dict[str, Any] | None, message_id: str | None
) -> None:
    with pika_channel(url) as ch:
        ch.confirm_delivery()
        properties = pika.BasicProperties(headers=headers, message_id=message_id)
        ch.basic_publish("", queue, body, properties, mandatory=True)


def get_from(ch: Any, queue: str) -> OracleMessage | None:
    """basic.get with auto-ack on the pika channel ``ch``: the next message, or None."""
    method, properties, body = ch.basic_get(queue, auto_ack=True)
    if method is None:
        return None
    return OracleMessage(
        body=bytes(body),
        headers=properties.headers,
        properties=properties,
        redelivered=bool(method.redelivered),
        message_count=int(method.message_count),
    )


def _declare_durable(url: str, queue: str, arguments: dict[str, Any] | None) -> None:
    with pika_channel(url) as ch:
        ch.queue_declare(queue, durable=True, arguments=arguments)


def _has_arguments(url: str, queue: str, arguments: dict[str, Any]) -> bool:
    try:
        _declare_durable(url, queue, arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:
            return False
        raise
    return True


def _get(url: str, queue: str) -> OracleMessage | None:
    with pika_channel(url) as ch:
        return get_from(ch, queue)


@attrs.frozen
class Oracle:
    """pika against the broker at ``url``; every method runs in a worker thread."""

    url: str

    async def _run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs))

    async def message_count(self, queue: str) -> int:
        """The number of ready messages in ``queue`` (a passive queue.declare)."""
        return await self._run(_message_count, self.url, queue)

    async def consumer_count(self, queue: str) -> int:
        return await self._run(_consumer_count, self.url, queue)

    async def queue_exists(self, queue: str) -> bool:
        return await self._run(_queue_exists, self.url, queue)

    async def declare(self, queue: str, *, arguments: dict[str, Any] | None = None) -> None:
        await self._run(_declare, self.url, queue, arguments)

    async def declare_durable(self, queue: str, arguments: dict[str, Any] | None) -> None:
        await self._run(_declare_durable, self.url, queue, arguments)

    async def has_arguments(self, queue: str, arguments: dict[str, Any]) -> bool:
        """Whether the existing durable ``queue`` was declared with exactly
        ``arguments``: the broker accepts a redeclaration only when it is equivalent
        (else 406)."""
        return await self._run(_has_arguments, self.url, queue, arguments)

    async def delete(self, queue: str) -> None:
        await self._run(_delete, self.url, queue)

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish to ``queue`` through the default exchange, confirmed and mandatory."""
        await self._run(_publish, self.url, queue, body, headers, message_id)

    async def get(self, queue: str) -> OracleMessage | None:
        """basic.get with auto-ack; None when the queue is empty."""
        return await self._run(_get, self.url, queue)

    def delete_now(self, queue: str) -> None:
        """Delete ``queue`` synchronously (for fixture teardown)."""
        _delete(self.url, queue)
