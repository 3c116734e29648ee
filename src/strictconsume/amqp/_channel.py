"""The channel API: declarations, consuming, acknowledging and publishing.

Synchronous AMQP methods (declare, bind, qos, consume, cancel...) are answered in the
order they were sent on a channel, so each channel keeps a FIFO of waiters and the
reader resolves the oldest one with each reply. A caller cancelled while waiting
leaves its waiter in place, so that the late reply still lines up with it. Every
synchronous call has a deadline (:data:`CALL_TIMEOUT`, ``Channel.call_timeout``): a
broker that keeps the connection alive but never answers must not hang its caller.
Past it the call raises :class:`ReplyTimeout` and the channel is closed, since the
late reply could no longer be matched.

Acks, nacks and rejects are written without waiting for a round trip (AMQP has no
reply for them); a delivery tag belongs to its channel, and a channel object that
was closed refuses every call, so an old tag can never be acked on a new channel.

Consumers get our own consumer tags (``sc-<channel>-<n>``) so that deliveries that
arrive right after basic.consume-ok, in the same read, already have a home.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import anyio
import attrs
from pamqp import commands
from pamqp.common import Arguments

from ._errors import (
    AMQPError,
    ChannelClosed,
    ConsumerCancelled,
    LocalProtocolError,
    MessageReturned,
    PublishNacked,
    ReplyTimeout,
)
from ._protocol import (
    ChannelCloseCompleted,
    ChannelClosedByBroker,
    ChannelFlow,
    ChannelOpened,
    ChannelState,
    ConsumerCancelledByBroker,
    Delivery,
    GetResult,
    MethodReceived,
    PublishConfirmed,
    Returned,
)
from ._waiter import Waiter

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from pamqp.base import Frame

    from ._link import ConnectionLink

__all__ = ["Channel", "Consumer", "QueueDeclareOk"]

logger = logging.getLogger("strictconsume.amqp")

Properties = commands.Basic.Properties

#: Above this many queued bytes, publishers and ackers wait for the writer.
WRITE_HIGH_WATER = 4 * 1024 * 1024
#: How long closing a channel, cancelling a consumer or closing the connection may
#: take before we give up on the broker's answer.
CLOSE_TIMEOUT = 5.0
#: How long a synchronous call (qos, declare, bind, consume, get...) may wait for the
#: broker's reply before its channel is given up (quorum declarations under load take
#: seconds, never this long).
CALL_TIMEOUT = 30.0


@attrs.frozen
class QueueDeclareOk:
    """What queue.declare answered: the queue's name and its counts at that moment."""

    queue: str
    message_count: int
    consumer_count: int


class Consumer:
    """The deliveries of one basic.consume; iterate it with ``async for``.

    The iteration ends with :class:`ConsumerCancelled` when the broker cancels the
    consumer (queue deleted, node lost), after every delivery that arrived before the
    cancel was yielded; with :class:`ChannelClosed` or :class:`ConnectionLost` when the
    channel or connection goes away.

    With ``on_delivery`` (see :meth:`Channel.consume`) deliveries are handed to that
    callback as they are read instead, and :meth:`wait` ends the way the iteration
    would.
    """

    def __init__(
        self,
        channel: Channel,
        queue: str,
        consumer_tag: str,
        on_delivery: Callable[[Delivery], bool] | None = None,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self.consumer_tag = consumer_tag
        self._on_delivery = on_delivery
        send, receive = anyio.create_memory_object_stream[Delivery](math.inf)
        self._send: MemoryObjectSendStream[Delivery] = send
        self._receive: MemoryObjectReceiveStream[Delivery] = receive
        self._error: BaseException | None = None
        self._ended = anyio.Event()

    def __repr__(self) -> str:
        return f"<Consumer {self.consumer_tag!r} on queue {self.queue!r}>"

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Delivery:
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            pass
        # Raised outside the except block: the error object is shared (by every
        # consumer and the connection), so it must keep its own __cause__.
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def wait(self) -> None:
        """With ``on_delivery``: wait until the consumer ends; raises what would end
        the iteration (nothing after a cancel of ours)."""
        await self._ended.wait()
        if self._error is not None:
            raise self._error

    def _deliver(self, delivery: Delivery) -> None:
        callback = self._on_delivery
        if callback is None or not callback(delivery):
            self._send.send_nowait(delivery)

    def _end(self, error: BaseException | None) -> None:
        if self._error is None:
            self._error = error
        self._send.close()
        self._ended.set()

    def _drain(self) -> list[Delivery]:
        """Take every delivery that arrived but was not yielded, and close the stream."""
        left = []
        while True:
            try:
                left.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        self._receive.close()
        return left


class Channel:
    """An AMQP channel; open one with ``async with conn.channel() as ch``."""

    def __init__(self, link: ConnectionLink, channel_id: int) -> None:
        self._link = link
        self.channel_id = channel_id
        self._core = link.core
        self._replies: deque[Waiter[Frame | GetResult]] = deque()
        self._open_waiter: Waiter[None] | None = None
        self._close_waiter: Waiter[None] | None = None
        self._consumers: dict[str, Consumer] = {}
        self._confirming = False
        self._confirms: dict[int, Waiter[bool]] = {}
        #: Tags of no-ack consumers until their cancel-ok: a delivery for one that
        #: arrives after we stopped listening must not be nacked (it is acked already).
        self._no_ack_tags: set[str] = set()
        self._returned: dict[int, Returned] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._consumer_count = 0
        self.flow_active = True
        #: Seconds a synchronous call waits for its reply (see :data:`CALL_TIMEOUT`).
        self.call_timeout = CALL_TIMEOUT
        #: Resolved by the close-ok of a channel.close sent after an unanswered call.
        self._given_up: Waiter[None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<strictconsume.amqp.Channel {self.channel_id} {state}>"

    @property
    def is_open(self) -> bool:
        return not self._closed and self._link.error() is None

    def _can_settle(self) -> bool:
        """True while acks and nacks can still go out on this channel (our own
        housekeeping must not raise when the broker has just closed it)."""
        return self.is_open and self._core.channel_state(self.channel_id) is ChannelState.OPEN

    # -- calls --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise LocalProtocolError(f"channel {self.channel_id} is closed")
        self._link.check_open()

    async def _call(self, method: Frame) -> Frame | GetResult:
        """Send a synchronous method and wait for its reply, at most
        :attr:`call_timeout` seconds.

        Raises:
            ReplyTimeout: no reply in time; the channel is being closed.
        """
        self._check_open()
        waiter: Waiter[Frame | GetResult] = Waiter()
        self._replies.append(waiter)
        self._core.send_method(self.channel_id, method)
        self._link.wake_writer()
        limit = self.call_timeout
        with anyio.move_on_after(limit):
            return await waiter.wait()
        error = ReplyTimeout(
            f"the broker at {self._link.url} did not answer {method.name} on "
            f"channel {self.channel_id} within {limit:g} s; the channel is closed (the "
            "broker or the queue's node is overloaded or partitioned)"
        )
        self._give_up(error)
        raise error

    def _give_up(self, error: BaseException) -> None:
        """Close this channel after an unanswered call: channel.close goes out now (the
        broker's late replies are dropped until its close-ok, which closing the
        channel then waits for), every waiter fails."""
        if not self._closed and self._can_settle():
            self._core.close_channel(self.channel_id, 200, "no reply in time")
            self._link.wake_writer()
            self._given_up = Waiter()
        self._fail(error)

    async def qos(self, prefetch_count: int, *, global_: bool = False) -> None:
        """Limit unacked deliveries to ``prefetch_count`` per consumer (0: no limit).

        With ``global_=True`` RabbitMQ applies the limit to the whole channel instead.
        """
        if not isinstance(prefetch_count, int) or not 0 <= prefetch_count <= 65535:
            raise ValueError(f"prefetch_count must be an int in 0..65535, not {prefetch_count!r}")
        await self._call(commands.Basic.Qos(prefetch_count=prefetch_count, global_=global_))

    async def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        *,
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: Arguments = None,
    ) -> None:
        """Declare an exchange (406 PRECONDITION_FAILED closes the channel if it
        exists with other settings)."""
        await self._call(
            commands.Exchange.Declare(
                exchange=exchange,
                exchange_type=exchange_type,
                passive=passive,
                durable=durable,
                auto_delete=auto_delete,
                internal=internal,
                arguments=arguments,
            )
        )

    async def exchange_delete(self, exchange: str, *, if_unused: bool = False) -> None:
        await self._call(commands.Exchange.Delete(exchange=exchange, if_unused=if_unused))

    async def exchange_bind(
        self, destination: str, source: str, routing_key: str = "", arguments: Arguments = None
    ) -> None:
        await self._call(
            commands.Exchange.Bind(
                destination=destination,
                source=source,
                routing_key=routing_key,
                arguments=arguments,
            )
        )

    async def exchange_unbind(
        self, destination: str, source: str, routing_key: str = "", arguments: Arguments = None
    ) -> None:
        await self._call(
            commands.Exchange.Unbind(
                destination=destination,
                source=source,
                routing_key=routing_key,
                arguments=arguments,
            )
        )

    async def queue_declare(
        self,
        queue: str = "",
        *,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: Arguments = None,
    ) -> QueueDeclareOk:
        """Declare a queue; ``queue=""`` asks the broker for a generated name.

        Returns:
            The queue's name and its message and consumer counts.
        """
        reply = await self._call(
            commands.Queue.Declare(
                queue=queue,
                passive=passive,
                durable=durable,
                exclusive=exclusive,
                auto_delete=auto_delete,
                arguments=arguments,
            )
        )
        assert isinstance(reply, commands.Queue.DeclareOk)
        return QueueDeclareOk(
            reply.queue or "", reply.message_count or 0, reply.consumer_count or 0
        )

    async def queue_bind(
        self, queue: str, exchange: str, routing_key: str = "", arguments: Arguments = None
    ) -> None:
        await self._call(
            commands.Queue.Bind(
                queue=queue, exchange=exchange, routing_key=routing_key, arguments=arguments
            )
        )

    async def queue_unbind(
        self, queue: str, exchange: str, routing_key: str = "", arguments: Arguments = None
    ) -> None:
        await self._call(
            commands.Queue.Unbind(
                queue=queue, exchange=exchange, routing_key=routing_key, arguments=arguments
            )
        )

    async def queue_purge(self, queue: str) -> int:
        """Remove every ready message from ``queue``; returns how many were removed."""
        reply = await self._call(commands.Queue.Purge(queue=queue))
        assert isinstance(reply, commands.Queue.PurgeOk)
        return reply.message_count or 0

    async def queue_delete(
        self, queue: str, *, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Delete ``queue``; returns how many messages it held."""
        reply = await self._call(
            commands.Queue.Delete(queue=queue, if_unused=if_unused, if_empty=if_empty)
        )
        assert isinstance(reply, commands.Queue.DeleteOk)
        return reply.message_count or 0

    async def recover(self, *, requeue: bool = True) -> None:
        """Ask the broker to redeliver every unacked message of this channel."""
        await self._call(commands.Basic.Recover(requeue=requeue))

    async def flow(self, active: bool) -> bool:
        """Ask the broker to pause (False) or resume (True) deliveries on this channel.

        RabbitMQ answers a pause with 540 NOT_IMPLEMENTED (use :meth:`qos` instead),
        which closes the channel.
        """
        reply = await self._call(commands.Channel.Flow(active=active))
        assert isinstance(reply, commands.Channel.FlowOk)
        return bool(reply.active)

    # -- consuming ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def consume(
        self,
        queue: str,
        *,
        no_ack: bool = False,
        exclusive: bool = False,
        consumer_tag: str = "",
        arguments: Arguments = None,
        on_delivery: Callable[[Delivery], bool] | None = None,
    ) -> AsyncIterator[Consumer]:
        """Subscribe to ``queue``; iterate the yielded :class:`Consumer` for deliveries.

        On exit the consumer is cancelled (basic.cancel, waiting for cancel-ok), and
        deliveries that arrived but were never yielded are nacked with requeue, so
        nothing stays unacked behind a consumer that is gone.

        ``on_delivery``, when given, is called with each delivery as the connection's
        reader decodes it (so it must not block or raise), sparing a task switch per
        message; it returns False for a delivery it does not take, which then waits
        to be nacked like an unyielded one. Wait with :meth:`Consumer.wait` instead
        of iterating. The callback is dropped as soon as the consumer is being
        cancelled.
        """
        self._check_open()
        if not consumer_tag:
            self._consumer_count += 1
            consumer_tag = f"sc-{self.channel_id}-{self._consumer_count}"
        if consumer_tag in self._consumers:
            raise LocalProtocolError(f"consumer tag {consumer_tag!r} is in use on this channel")
        consumer = Consumer(self, queue, consumer_tag, on_delivery)
        self._consumers[consumer_tag] = consumer
        if no_ack:
            self._no_ack_tags.add(consumer_tag)
        try:
            await self._call(
                commands.Basic.Consume(
                    queue=queue,
                    consumer_tag=consumer_tag,
                    no_ack=no_ack,
                    exclusive=exclusive,
                    arguments=arguments,
                )
            )
        except BaseException:
            # basic.consume is on its way: the broker may already have a consumer
            # (consume-ok still in flight), so cancel it there too.
            await self._cancel_consumer(consumer, requeue_unyielded=not no_ack)
            raise
        try:
            yield consumer
        finally:
            await self._cancel_consumer(consumer, requeue_unyielded=not no_ack)

    async def _cancel_consumer(self, consumer: Consumer, *, requeue_unyielded: bool) -> None:
        consumer._on_delivery = None  # what arrives from now on is nacked below
        with anyio.CancelScope(shield=True):
            if consumer.consumer_tag in self._consumers and self.is_open:
                with anyio.move_on_after(CLOSE_TIMEOUT), contextlib.suppress(AMQPError):
                    await self._call(commands.Basic.Cancel(consumer_tag=consumer.consumer_tag))
                    # cancel-ok: no delivery for this tag can follow any more
                    self._no_ack_tags.discard(consumer.consumer_tag)
            self._consumers.pop(consumer.consumer_tag, None)
            consumer._end(None)
            left = consumer._drain()
            if requeue_unyielded and left and self._can_settle():
                for delivery in left:
                    self._core.nack(self.channel_id, delivery.delivery_tag, requeue=True)
                self._link.wake_writer()

    async def get(self, queue: str, *, no_ack: bool = False) -> GetResult | None:
        """Fetch one message from ``queue`` (basic.get); None when it is empty."""
        reply = await self._call(commands.Basic.Get(queue=queue, no_ack=no_ack))
        if isinstance(reply, GetResult):
            return reply
        return None

    # -- acknowledging -----------------------------------------------------------------

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        """Acknowledge a delivery (and every earlier one with ``multiple``).

        Written without waiting for a round trip; waits only when the socket is
        backed up. An unknown tag makes the broker close this channel
        (406 PRECONDITION_FAILED), which later calls report.
        """
        self.ack_nowait(delivery_tag, multiple=multiple)
        await self._backpressure()

    def ack_nowait(self, delivery_tag: int, *, multiple: bool = False, batch: bool = False) -> None:
        """Queue a basic.ack for the socket and return at once, however backed up
        the socket is; :meth:`wait_writable` waits for the backlog to shrink.

        An ack queued is sent as soon as the socket takes it (or never, when the
        connection breaks first; the broker then requeues the message itself).
        With ``batch=True`` it is only queued: the caller ends its batch of acks with
        :meth:`send_queued`.
        """
        self._check_open()
        self._core.ack(self.channel_id, delivery_tag, multiple=multiple)
        if not batch:
            self._link.wake_writer()

    def send_queued(self) -> None:
        """Send what is queued for the socket now, from this task, when the
        connection's writer is idle and the socket takes it without waiting (plain
        TCP); the writer sends whatever is left, as it would have sent it all.

        Saves the hand-over to the writer task (a scheduler round) for a frame that
        ends a step of work, such as the acks of the handlers that just finished.
        Never waits and never raises: a broken socket fails the connection through
        the writer.
        """
        self._link.send_now()

    @property
    def writable(self) -> bool:
        """True while at most ``WRITE_HIGH_WATER`` bytes are queued for the socket:
        :meth:`wait_writable` would return at once."""
        return self._core.bytes_pending() <= WRITE_HIGH_WATER

    async def wait_writable(self) -> None:
        """Wait while more than ``WRITE_HIGH_WATER`` bytes are queued for the socket."""
        await self._backpressure()

    async def nack(
        self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True
    ) -> None:
        """Negatively acknowledge: requeue (default) or drop/dead-letter the delivery."""
        self._check_open()
        self._core.nack(self.channel_id, delivery_tag, multiple=multiple, requeue=requeue)
        self._link.wake_writer()
        await self._backpressure()

    async def reject(self, delivery_tag: int, *, requeue: bool = True) -> None:
        """Reject one delivery: requeue (default) or drop/dead-letter it."""
        self._check_open()
        self._core.reject(self.channel_id, delivery_tag, requeue=requeue)
        self._link.wake_writer()
        await self._backpressure()

    async def _backpressure(self) -> None:
        if self._core.bytes_pending() > WRITE_HIGH_WATER:
            await self._link.wait_writable()

    # -- publishing ---------------------------------------------------------------------

    async def _enable_confirms(self) -> None:
        await self._call(commands.Confirm.Select())
        self._confirming = True

    @property
    def confirms(self) -> bool:
        """True when the channel is in publisher-confirm mode."""
        return self._confirming

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str = "",
        routing_key: str = "",
        properties: Properties | None = None,
        mandatory: bool = False,
    ) -> None:
        """Publish a message.

        On a channel opened with ``confirms=True`` this returns once the broker
        confirmed the message, and raises :class:`PublishNacked` when the broker
        refused it or :class:`MessageReturned` when ``mandatory`` is set and no queue
        took it. Without confirms it returns once the message is queued for the
        socket; a mandatory message that comes back is then only logged.
        """
        if not isinstance(body, bytes | bytearray | memoryview):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        self._check_open()
        await self._backpressure()
        self._check_open()
        tag = self._core.publish(
            self.channel_id,
            exchange=exchange,
            routing_key=routing_key,
            body=bytes(body),
            properties=properties,
            mandatory=mandatory,
        )
        self._link.wake_writer()
        if tag is None:
            return
        waiter: Waiter[bool] = Waiter()
        self._confirms[tag] = waiter
        try:
            acked = await waiter.wait()
        finally:
            if not waiter.done:  # cancelled: nobody will look at this tag's outcome
                del self._confirms[tag]
        returned = self._returned.pop(tag, None)
        if returned is not None:
            raise MessageReturned(
                returned.reply_code, returned.reply_text, returned.exchange, returned.routing_key
            )
        if not acked:
            raise PublishNacked(exchange, routing_key)

    # -- events from the reader ----------------------------------------------------------

    def _expect_open(self) -> Waiter[None]:
        self._open_waiter = Waiter()
        return self._open_waiter

    def _on_opened(self, event: ChannelOpened) -> None:
        if self._open_waiter is not None:
            self._open_waiter.resolve(None)

    def _on_method(self, event: MethodReceived) -> None:
        method = event.method
        if isinstance(method, commands.Basic.CancelOk):
            consumer = self._consumers.pop(method.consumer_tag or "", None)
            if consumer is not None:
                consumer._end(None)
        if self._replies:
            self._replies.popleft().resolve(method)

    def _on_get_result(self, result: GetResult) -> None:
        if self._replies:
            self._replies.popleft().resolve(result)

    def _on_delivery(self, delivery: Delivery) -> None:
        consumer = self._consumers.get(delivery.consumer_tag)
        if consumer is not None:
            consumer._deliver(delivery)
        elif delivery.consumer_tag not in self._no_ack_tags and self._can_settle():
            # A delivery for a consumer we no longer listen to (cancelled, its
            # iterator gone): give it back so it is not stuck until the channel closes.
            logger.debug(
                "requeueing delivery %d for unknown consumer %r on channel %d",
                delivery.delivery_tag,
                delivery.consumer_tag,
                self.channel_id,
            )
            self._core.nack(self.channel_id, delivery.delivery_tag, requeue=True)

    def _on_confirm(self, event: PublishConfirmed) -> None:
        for tag in event.publish_tags:
            waiter = self._confirms.pop(tag, None)
            if waiter is not None:
                waiter.resolve(event.ack)
            else:
                self._returned.pop(tag, None)

    def _on_return(self, event: Returned) -> None:
        if event.publish_tag is not None and event.publish_tag in self._confirms:
            self._returned[event.publish_tag] = event
        else:
            logger.warning(
                "the broker returned a message published to exchange %r with routing key %r: %d %s",
                event.exchange,
                event.routing_key,
                event.reply_code,
                event.reply_text,
            )

    def _on_consumer_cancelled(self, event: ConsumerCancelledByBroker) -> None:
        tag = event.consumer_tag
        self._no_ack_tags.discard(tag)  # the broker sends nothing for it after this
        consumer = self._consumers.pop(tag, None)
        if consumer is not None:
            consumer._end(ConsumerCancelled(tag, consumer.queue))

    def _on_flow(self, event: ChannelFlow) -> None:
        self.flow_active = event.active

    def _on_closed_by_broker(self, event: ChannelClosedByBroker) -> None:
        self._fail(
            ChannelClosed(
                event.reply_code,
                event.reply_text,
                event.class_id,
                event.method_id,
                channel_id=self.channel_id,
            )
        )

    def _on_close_completed(self, event: ChannelCloseCompleted) -> None:
        if self._close_waiter is not None:
            self._close_waiter.resolve(None)
        if self._given_up is not None:
            self._given_up.resolve(None)

    def _start_close(self) -> Waiter[None] | None:
        """Mark the channel closing; the waiter resolves on close-ok (None if closed)."""
        if self._closed:
            return None
        self._closed = True
        self._close_waiter = Waiter()
        return self._close_waiter

    def _fail(self, error: BaseException) -> None:
        """The channel is gone: fail every waiter, end every consumer."""
        if self._error is None:
            self._error = error
        self._closed = True
        if self._open_waiter is not None:
            self._open_waiter.fail(error)
        while self._replies:
            self._replies.popleft().fail(error)
        for waiter in self._confirms.values():
            waiter.fail(error)
        self._confirms.clear()
        self._returned.clear()
        for consumer in self._consumers.values():
            consumer._end(error)
        self._consumers.clear()
        if self._close_waiter is not None:
            self._close_waiter.resolve(None)
