"""One consumer on one channel: each delivery becomes a handler task, each outcome a frame.

Structure (design sections 3 to 5)::

    Dispatcher.run                      one consumer, for the life of a connection
      conn.channel()                    its own channel: prefetch and failure domain
        task group "handlers"           owns the acker and one task per delivery
          intake (a cancel scope)       basic.consume; cancelled by a shutdown
          handler task                  move_on_after(timeout) around the handler,
                                        then a shielded settlement

A settlement is an ack (through the :class:`~._acks.AckTracker`, coalesced), a nack
with requeue, or a confirmed publish of a copy to the retry queue or the dead-letter
queue followed by the ack of the original. Settlements are shielded from cancellation
and bounded by :data:`SETTLE_TIMEOUT`; a copy that could not be published leaves the
original requeued rather than acked, so the worst case is a duplicate, never a loss.
Frames for a channel are only ever sent on that channel object: a replaced channel
has a new tracker and the old one's handlers are cancelled before it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import attrs

from ._acks import AckTracker
from ._backoff import DEFAULT_BACKOFF, Backoff
from ._message import (
    ATTEMPT_HEADER,
    BROKER_COUNT_HEADERS,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    Message,
)
from ._native import HandlerGroup, Native
from ._outcome import Outcome, OutcomeKind, decide, error_type
from ._publisher import COPIES
from ._retry import AD_HOC_LEASE_RENEWAL, dead_letter_queue_name, retry_queue_name
from ._topology import TopologyError, dead_letter_arguments, declare_consumer, retry_arguments
from ._versions import Version, consumer_timeout_argument, consumer_timeout_cancels
from .amqp import (
    AMQPError,
    ChannelClosed,
    ConnectionLost,
    ConsumerCancelled,
    MessageReturned,
    Properties,
)
from .amqp._codec import Headers
from .amqp._connection import asyncio_cancel_requested
from .idempotency._core import guard, log_duplicate

if TYPE_CHECKING:
    import random as random_module

    from pamqp.common import FieldTable

    from ._consumer import ConsumerSpec
    from ._publisher import PublishChannelSlot
    from .amqp import Channel, Connection, Delivery

__all__ = ["ACK_DELAY", "SETTLE_TIMEOUT", "Dispatcher", "Shutdown", "ack_batch"]

logger = logging.getLogger("strictconsume")

#: Seconds a settlement (a retry or dead-letter publish and its confirm, then the ack)
#: may take before the original is requeued instead.
SETTLE_TIMEOUT = 10.0
#: Seconds to hold a message whose copy could not be published before requeueing it,
#: so that a broker refusing every copy does not turn into a busy redelivery loop.
SETTLE_FAILURE_PAUSE = 1.0

#: Seconds a finished message may wait for others to share its ack (design section 4).
ACK_DELAY = 0.002

OutcomeHook = Callable[[str, OutcomeKind, float], None]

#: RabbitMQ's default consumer_timeout, in seconds (30 minutes).
DEFAULT_CONSUMER_TIMEOUT = 1800.0
#: A broker-sent cancel is taken for a consumer timeout when a delivery has been held
#: at least this share of the timeout (the broker checks on its own clock).
CONSUMER_TIMEOUT_SLACK = 0.9


def ack_batch(prefetch: int) -> int:
    """How many finished messages are acked at once without waiting for
    :data:`ACK_DELAY`: an eighth of the prefetch window (1 below a prefetch of 16).

    Acking each message as it finishes makes the broker refill the window one or two
    messages at a time, and the consumer spends its time on small reads and writes
    (0.7 ack frames per message at prefetch 100); a batch lets the broker send a
    burst. An eighth keeps the window at least 7/8 full while a batch gathers. Below
    a prefetch of 16 the window is too small to hold messages back: what finished in
    one scheduler round is acked at the end of it.
    """
    return max(1, prefetch // 8)


@attrs.define(eq=False)
class Shutdown:
    """The App's graceful stop, shared by its dispatchers (design section 5).

    :meth:`request` stops intake everywhere and starts the grace period; a second
    request (:meth:`force`) ends the grace period at once.
    """

    #: Seconds handlers get to finish when intake stops (the App's setting).
    grace_period: float = 30.0
    requested: bool = False
    forced: bool = False
    #: When the grace period ends (anyio.current_time() clock); inf before a request.
    deadline: float = math.inf
    _intakes: set[anyio.CancelScope] = attrs.Factory(set)
    _graces: set[anyio.CancelScope] = attrs.Factory(set)
    _event: anyio.Event = attrs.Factory(anyio.Event)

    def request(self, grace_period: float) -> None:
        if self.requested:
            self.force()
            return
        self.requested = True
        self.deadline = anyio.current_time() + grace_period
        for scope in self._graces:
            scope.deadline = self.deadline
        for scope in list(self._intakes):
            scope.cancel()
        self._event.set()

    def force(self) -> None:
        self.forced = True
        self.deadline = -math.inf
        for scope in list(self._graces):
            scope.cancel()

    async def wait(self) -> None:
        await self._event.wait()

    def intake_scope(self) -> anyio.CancelScope:
        """A cancel scope for intake; cancelled at once if a stop was requested."""
        scope = anyio.CancelScope()
        if self.requested:
            scope.cancel()
        self._intakes.add(scope)
        return scope

    def grace_scope(self) -> anyio.CancelScope:
        """A cancel scope that ends with the grace period."""
        scope = anyio.CancelScope(deadline=self.deadline)
        if self.forced:
            scope.cancel()
        self._graces.add(scope)
        return scope

    @contextlib.contextmanager
    def intake(self) -> Iterator[anyio.CancelScope]:
        """:meth:`intake_scope`, entered, and forgotten on the way out however the
        block ends (a connection lost while it waits cancels it from outside)."""
        scope = self.intake_scope()
        try:
            with scope:
                yield scope
        finally:
            self.discard(scope)

    def discard(self, scope: anyio.CancelScope) -> None:
        self._intakes.discard(scope)
        self._graces.discard(scope)


def _refused(error: Exception) -> bool:
    """A refusal that retrying will not fix: 403 on basic.consume, or a declaration
    the broker refused (406 other arguments, 403 no configure permission)."""
    if isinstance(error, ChannelClosed):
        return error.reply_code == 403
    return isinstance(error, TopologyError) and error.reply_code in (403, 406)


class _Unreadable(Exception):
    """A delivery the client could not decode (see ``Delivery.properties_error``)."""


class _ChannelState:
    """What one dispatcher tracks for one channel."""

    def __init__(self, ch: Channel, prefetch: int, concurrency: int | None) -> None:
        self.ch = ch
        self.tracker = AckTracker()
        self.ack_batch = ack_batch(prefetch)
        self.inflight = 0
        self.idle = anyio.Event()
        self.idle.set()
        self.ack_wanted = anyio.Event()
        self.batch_full = anyio.Event()
        #: Set when the handlers are being cancelled (grace over, channel lost): a
        #: handler that swallows the cancellation and returns is requeued, not acked.
        self.cancelling = False
        self.limit = anyio.Semaphore(concurrency) if concurrency else None
        #: The handlers running: delivery tag -> (when it started, message id), to
        #: name the message a broker's consumer timeout took back.
        self.running: dict[int, tuple[float, str | None]] = {}

    def started(self) -> None:
        if self.inflight == 0:
            self.idle = anyio.Event()
        self.inflight += 1

    def ended(self) -> None:
        self.inflight -= 1
        if self.limit is not None:
            self.limit.release()
        if self.inflight == 0:
            self.idle.set()

    async def acker(self) -> None:
        """Flush once the handlers that finished in a scheduler round have all run: at
        once for a batch of :attr:`ack_batch` or more, else up to :data:`ACK_DELAY`
        later, unless a batch fills meanwhile (design section 4)."""
        while True:
            await self.ack_wanted.wait()
            self.ack_wanted = anyio.Event()
            if self.tracker.pending < self.ack_batch:
                self.batch_full = anyio.Event()
                with anyio.move_on_after(ACK_DELAY):
                    await self.batch_full.wait()
            await self.flush()

    async def acked(self, delivery_tag: int) -> None:
        """The message of ``delivery_tag`` is done: ack it, coalesced with others."""
        tracker = self.tracker
        tracker.finished(delivery_tag)
        if self.ack_batch == 1 and self.inflight == 1:
            await self.flush()  # nothing else running: no batch to wait for
            return
        self.ack_wanted.set()
        if tracker.pending >= self.ack_batch:
            self.batch_full.set()

    async def flush(self) -> None:
        """Send the acks the tracker has ready, in order.

        Every ack taken from the tracker is queued for the socket before anything
        is awaited, so acks go out in the order taken and none is ever dropped: a
        socket that stays backed up (a broker that stopped reading) delays them, it
        never loses them. Then one wait, shielded and bounded by
        :data:`SETTLE_TIMEOUT`, lets the writer drain the backlog (backpressure for
        the handlers that follow).
        """
        if not self.tracker.pending:
            return
        ch = self.ch
        try:
            while acks := self.tracker.flush():
                if not ch.is_open:
                    return  # the broker requeues everything of a closed channel
                for ack in acks:
                    ch.ack_nowait(ack.delivery_tag, multiple=ack.multiple)
            with anyio.CancelScope(shield=True) as scope:
                scope.deadline = anyio.current_time() + SETTLE_TIMEOUT
                await ch.wait_writable()
        except AMQPError as exc:
            logger.debug("acks not sent: %s", exc)

    async def requeue(self, delivery_tag: int) -> None:
        """Nack with requeue: the message goes back to its queue."""
        await self._nack(delivery_tag, requeue=True)

    async def reject(self, delivery_tag: int) -> None:
        """Nack without requeue: the broker dead-letters it (the queue's DLX arguments)."""
        await self._nack(delivery_tag, requeue=False)

    async def _nack(self, delivery_tag: int, *, requeue: bool) -> None:
        self.tracker.settled(delivery_tag)
        if not self.ch.is_open:
            return
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + SETTLE_TIMEOUT
            try:
                await self.ch.nack(delivery_tag, requeue=requeue)
            except AMQPError as exc:
                logger.debug("nack of %d not sent: %s", delivery_tag, exc)


async def call_handler(
    spec: ConsumerSpec, msg: Message, *, started: float | None = None, native: Native | None = None
) -> Exception | None:
    """Run ``spec``'s handler on ``msg`` within its timeout, counted from ``started``
    (``anyio.current_time()``; default: now). ``native``: the running loop's
    primitives, when the caller has them already.

    Returns the exception the handler raised (a :class:`TimeoutError` when it ran out
    of time), or None when it returned. A cancellation from outside, and exceptions
    that are not an ``Exception`` (``KeyboardInterrupt``, ...), propagate.
    """
    try:
        if spec.timeout is None:
            await spec.handler(msg)
            return None
        native = native or Native()
        if started is None:
            started = native.current_time()
        with native.cancel_scope(deadline=started + spec.timeout) as scope:
            await spec.handler(msg)
    except Exception as exc:
        return exc
    except asyncio.CancelledError as exc:
        # On asyncio a handler can raise CancelledError of its own accord: it awaited
        # a future or task that something else cancelled. Only a request to cancel
        # this task is a cancellation; anything else (on trio: always) is a failure.
        if asyncio_cancel_requested():
            raise
        error = RuntimeError(
            "the handler raised asyncio.CancelledError while nothing was cancelling it "
            "(it awaited a future or task that was cancelled elsewhere)"
        )
        error.__cause__ = exc
        return error
    # cancel_called, not cancelled_caught: a handler that swallowed the cancellation
    # and returned still ran out of time.
    if scope.cancel_called:
        return TimeoutError(f"the handler exceeded its timeout of {spec.timeout:g} s")
    return None


def _original_route(msg: Message) -> FieldTable:
    """Where ``msg`` was first published, for a copy (unless it carries that already)."""
    if ORIGINAL_ROUTING_KEY_HEADER in msg.headers:
        return {}
    return {ORIGINAL_EXCHANGE_HEADER: msg.exchange, ORIGINAL_ROUTING_KEY_HEADER: msg.routing_key}


def retry_headers(msg: Message) -> FieldTable:
    """The headers a retry copy of ``msg`` gets (over the original's)."""
    return {ATTEMPT_HEADER: msg.attempt + 1, **_original_route(msg)}


def dead_letter_headers(msg: Message, outcome: Outcome) -> FieldTable:
    """The headers a dead-letter copy of ``msg`` gets: the reason, where and when."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        "x-error-type": outcome.error_type,
        "x-error-message": outcome.error_message,
        "x-failed-queue": msg.queue,
        ATTEMPT_HEADER: msg.attempt,
        "x-failed-at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        **_original_route(msg),
    }


def copy_headers(original: FieldTable | None, headers: FieldTable) -> FieldTable:
    """The headers of a retry or dead-letter copy: the original's, updated.

    The original's headers as received (``Headers``) stay ``Headers``, so that the
    copy carries each of their entries as it was encoded (design section 3)."""
    merged = original.copy() if isinstance(original, Headers) else dict(original or {})
    # The copy is a new message: the broker's counts of the original's deliveries are
    # in its x-attempt already, and would otherwise be counted again.
    for name in BROKER_COUNT_HEADERS:
        merged.pop(name, None)
    merged.update(headers)
    return merged


def _copy_properties(properties: Properties, headers: FieldTable) -> Properties:
    """The properties of a retry or dead-letter copy: the original's plus ``headers``,
    persistent, and without ``expiration`` (as the broker's own dead-lettering does:
    a per-message TTL would silently drop the copy from the dead-letter queue, or cut
    a retry delay short). Every other property is the original's: re-encoded, each
    gives the same bytes (a timestamp too, whatever its size: see ``amqp._codec``)."""
    copy = Properties(
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        headers=copy_headers(properties.headers, headers),
        delivery_mode=2,
        priority=properties.priority,
        correlation_id=properties.correlation_id,
        reply_to=properties.reply_to,
        message_id=properties.message_id,
        timestamp=properties.timestamp,
        message_type=properties.message_type,
        user_id=properties.user_id,
        app_id=properties.app_id,
    )
    copy.cluster_id = properties.cluster_id  # pamqp's constructor refuses one
    return copy


class Dispatcher:
    """Runs one consumer (a :class:`ConsumerSpec`) on a connection."""

    def __init__(
        self,
        spec: ConsumerSpec,
        *,
        prefetch: int,
        shutdown: Shutdown,
        on_outcome: OutcomeHook,
        on_subscribed: Callable[[str, bool], None],
        on_fatal: Callable[[BaseException], None],
        random: random_module.Random,
        backoff: Backoff = DEFAULT_BACKOFF,
        consumer_timeout: float = DEFAULT_CONSUMER_TIMEOUT,
        on_consumer_timeout: Callable[[str], None] = lambda queue: None,
    ) -> None:
        self.spec = spec
        self.queue = spec.queue
        self.prefetch = prefetch
        self.shutdown = shutdown
        #: The broker's consumer timeout for this consumer, in seconds: its own
        #: ``consumer_timeout=``, else the broker's setting as the App was told it.
        self.consumer_timeout = spec.broker_consumer_timeout(consumer_timeout)
        self._on_consumer_timeout = on_consumer_timeout
        self._on_outcome = on_outcome
        self._on_subscribed = on_subscribed
        self._on_fatal = on_fatal
        self._random = random
        self._backoff = backoff
        self._state: _ChannelState | None = None
        #: When this consumer last declared each ad-hoc retry queue (a bounded set).
        self._leases: dict[str, float] = {}
        #: The running loop's primitives; set when a channel is served.
        self._native: Native

    @property
    def inflight(self) -> int:
        """Handlers running now (on the current channel)."""
        return self._state.inflight if self._state is not None else 0

    # -- the channel loop ---------------------------------------------------------------

    async def run(
        self,
        conn: Connection,
        publishing: PublishChannelSlot,
        *,
        startup: bool = False,
        declared: bool = True,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume until a shutdown drained this consumer.

        Signals ``task_status`` once subscribed; reopens its channel after a channel
        error and resubscribes after a broker-sent cancel, with backoff, whatever the
        other consumers do: each consumer is its own failure domain. Connection
        errors propagate: the supervisor owns reconnecting.

        Args:
            startup: The App has not been ready yet. A refusal that retrying cannot
                fix (403 on basic.consume, a topology mismatch) before the first
                subscription is then raised, for the supervisor to make it a
                start-up error; after start-up it is retried like any error.
            declared: The supervisor declared this consumer's topology just before
                (else the consumer declares it on its own channel first).
        """
        self._publishing = publishing
        status: anyio.abc.TaskStatus[None] | None = task_status
        failures = 0
        declare = not declared
        while not self.shutdown.requested:
            subscribed_at = math.inf

            def subscribed() -> None:
                nonlocal status, subscribed_at
                subscribed_at = anyio.current_time()
                logger.info(
                    "subscribed to queue %r (prefetch %d)",
                    self.queue,
                    self.prefetch,
                    extra={"event": "subscribed", "queue": self.queue},
                )
                self._on_subscribed(self.queue, True)
                if status is not None:
                    status.started()
                    status = None

            error: Exception | None = None
            try:
                async with conn.channel() as ch:
                    # A stop cancels the set-up (the broker may never answer it; each
                    # call also has its deadline), as it cancels the subscription.
                    setup = self.shutdown.intake_scope()
                    try:
                        with setup:
                            await ch.qos(self.prefetch)
                            if declare:
                                await declare_consumer(ch, self.spec)
                    finally:
                        self.shutdown.discard(setup)
                    if not setup.cancel_called:
                        error = await self._serve(ch, subscribed, conn.server_version)
            except (AMQPError, TopologyError) as exc:
                error = exc
            self._on_subscribed(self.queue, False)
            if error is None:
                break
            if not conn.is_open:
                raise error  # the supervisor reconnects
            if startup and status is not None and _refused(error):
                # Never subscribed at start-up, and refused (no read permission, a
                # queue held by an exclusive consumer, other arguments): the
                # supervisor makes it a start-up error. After start-up it is retried.
                raise error
            if anyio.current_time() - subscribed_at >= self._backoff.reset_after:
                failures = 0
            delay = self._backoff.delay(failures, self._random.random())
            failures += 1
            declare = True
            logger.warning(
                "consumer of queue %r stopped: %s; subscribing again in %.1f s",
                self.queue,
                error,
                delay,
                extra={"event": "resubscribing", "queue": self.queue, "delay": round(delay, 3)},
            )
            with self.shutdown.intake():
                await anyio.sleep(delay)
        if status is not None:  # stopped before it ever subscribed
            status.started()

    def _consume_arguments(self, version: Version) -> FieldTable | None:
        """basic.consume's arguments: the consumer's own consumer timeout, where the
        broker honours it."""
        spec = self.spec
        if spec.consumer_timeout is None:
            return None
        if not consumer_timeout_argument(version, spec.queue_type):
            return None
        return {"x-consumer-timeout": round(spec.consumer_timeout * 1000)}

    async def _serve(
        self, ch: Channel, subscribed: Callable[[], None], version: Version
    ) -> AMQPError | None:
        """Consume on ``ch`` until a shutdown (returns None) or an error (returned)."""
        state = self._state = _ChannelState(ch, self.prefetch, self.spec.concurrency)
        native = self._native = Native()
        error: AMQPError | None = None
        try:
            async with native.task_group() as handlers:
                handlers.start_soon(state.acker)
                intake = self.shutdown.intake_scope()

                def take(delivery: Delivery) -> bool:
                    # Called by the connection's reader: one task switch less per
                    # message than iterating. Not once a stop was requested: those
                    # deliveries are nacked back when the consumer is cancelled.
                    if self.shutdown.requested:
                        return False
                    state.tracker.received(delivery.delivery_tag)
                    state.started()
                    handlers.start_soon(self._handle, state, delivery)
                    return True

                # With a concurrency limit, intake waits for a free slot: iterate.
                limited = state.limit is not None
                try:
                    with intake:
                        async with ch.consume(
                            self.queue,
                            arguments=self._consume_arguments(version),
                            on_delivery=None if limited else take,
                        ) as consumer:
                            subscribed()
                            if not limited:
                                await consumer.wait()
                            async for delivery in consumer:
                                await self._start(state, handlers, delivery)
                except AMQPError as exc:  # channel closed, broker-sent cancel
                    error = exc
                    self._note_consumer_timeout(state, exc, version)
                finally:
                    self.shutdown.discard(intake)
                if error is None and state.inflight:
                    await self._grace(state)
                elif isinstance(error, ConsumerCancelled) and ch.is_open and state.inflight:
                    await self._let_finish(state)
                state.cancelling = True
                handlers.cancel()
        finally:
            await state.flush()
        return error

    def _note_consumer_timeout(
        self, state: _ChannelState, error: AMQPError, version: Version
    ) -> None:
        """Count and log, once, a delivery the broker took back because it stayed
        unacked past the consumer timeout (see :mod:`._versions`): before RabbitMQ 4.3
        the broker says so as it closes the channel (406); from 4.3 it cancels the
        consumer without a reason, which a delivery held about that long explains (a
        cancel without one is a deleted queue or a lost node)."""
        now = self._native.current_time()
        held = max(
            (
                (now - started, tag, message_id)
                for tag, (started, message_id) in state.running.items()
            ),
            default=None,
        )
        if isinstance(error, ChannelClosed):
            if not (error.reply_code == 406 and "timed out" in error.reply_text):
                return
        elif not (
            isinstance(error, ConsumerCancelled)
            and consumer_timeout_cancels(version)
            and held is not None
            and self.consumer_timeout is not None
            and held[0] >= self.consumer_timeout * CONSUMER_TIMEOUT_SLACK
        ):
            return
        self._on_consumer_timeout(self.queue)
        what = (
            "a delivery"
            if held is None
            else (f"message {held[2]!r} (delivery_tag {held[1]}), unacked for {held[0]:.1f} s")
        )
        logger.warning(
            "queue %r: the broker took back %s, past its consumer timeout (%s s here), "
            "and %s; the message is delivered again. Give the handler a timeout below "
            "the consumer timeout, or raise it for this consumer with consumer_timeout=",
            self.queue,
            what,
            "?" if self.consumer_timeout is None else f"{self.consumer_timeout:g}",
            "closed the channel" if isinstance(error, ChannelClosed) else "cancelled the consumer",
            extra={
                "event": "consumer_timeout",
                "queue": self.queue,
                "message_id": None if held is None else held[2],
                "delivery_tag": None if held is None else held[1],
                "duration": None if held is None else round(held[0], 3),
            },
        )

    async def _start(
        self, state: _ChannelState, handlers: HandlerGroup, delivery: Delivery
    ) -> None:
        """Start a handler once the concurrency limit has a free slot."""
        assert state.limit is not None
        state.tracker.received(delivery.delivery_tag)
        try:
            await state.limit.acquire()
        except BaseException:  # intake stopped while waiting: give it back
            await state.requeue(delivery.delivery_tag)
            raise
        state.started()
        handlers.start_soon(self._handle, state, delivery)

    async def _grace(self, state: _ChannelState) -> None:
        remaining = self.shutdown.deadline - anyio.current_time()
        logger.info(
            "queue %r: waiting up to %.1f s for %d handler(s) still running",
            self.queue,
            max(remaining, 0.0),
            state.inflight,
            extra={"event": "draining", "queue": self.queue},
        )
        await self._wait_idle(state)
        if state.inflight:
            logger.warning(
                "queue %r: grace period over; cancelling %d handler(s), their messages "
                "go back to the queue",
                self.queue,
                state.inflight,
                extra={"event": "grace_over", "queue": self.queue},
            )

    async def _let_finish(self, state: _ChannelState) -> None:
        """After a broker-sent cancel (queue deleted, node gone) the channel still
        works: the handlers running get the grace period to finish and be acked
        before the consumer subscribes again (a shutdown meanwhile may end it)."""
        grace = self.shutdown.grace_period
        logger.info(
            "queue %r: waiting up to %.1f s for %d handler(s) still running before "
            "subscribing again",
            self.queue,
            grace,
            state.inflight,
            extra={"event": "draining", "queue": self.queue},
        )
        await self._wait_idle(state, until=anyio.current_time() + grace)

    async def _wait_idle(self, state: _ChannelState, *, until: float = math.inf) -> None:
        """Wait until no handler runs, at most until ``until`` and the end of a
        shutdown's grace period (a forced stop ends it at once)."""
        scope = self.shutdown.grace_scope()
        scope.deadline = min(scope.deadline, until)
        try:
            with scope:
                await state.idle.wait()
        finally:
            self.shutdown.discard(scope)

    # -- one delivery -------------------------------------------------------------------

    async def _handle(self, state: _ChannelState, delivery: Delivery) -> None:
        spec = self.spec
        try:
            if delivery.properties_error is not None:
                raise _Unreadable(delivery.properties_error)
            msg = Message.from_delivery(
                delivery, spec.queue, delivery_count=spec.queue_type == "quorum"
            )
        except Exception as exc:  # the broker dead-letters it to the .dlq, as it is
            logger.error(
                "queue %r: delivery %d is unreadable: %s; it is rejected, so the broker "
                "dead-letters it to %r with its properties as they are",
                self.queue,
                delivery.delivery_tag,
                exc,
                dead_letter_queue_name(self.queue),
                exc_info=not isinstance(exc, _Unreadable),  # else never expected
                extra={
                    "event": "message_failed",
                    "queue": self.queue,
                    "delivery_tag": delivery.delivery_tag,
                    "outcome": OutcomeKind.DEAD_LETTER.value,
                    "error": str(exc),
                },
            )
            await state.reject(delivery.delivery_tag)
            self._on_outcome(self.queue, OutcomeKind.DEAD_LETTER, 0.0)
            state.ended()
            return
        native = self._native
        started = native.current_time()
        error: BaseException | None = None
        state.running[delivery.delivery_tag] = (started, msg.message_id)
        try:
            try:
                if spec.idempotency is None:
                    error = await call_handler(spec, msg, started=started, native=native)
                else:  # skip a handled key; the handler's timeout starts once claimed
                    run = functools.partial(call_handler, spec, msg, native=native)
                    error = await guard(spec.idempotency, msg, run, handler_timeout=spec.timeout)
            except anyio.get_cancelled_exc_class():
                # shutdown after the grace period, or the channel/connection is gone
                await state.requeue(delivery.delivery_tag)
                self._record(msg, Outcome(OutcomeKind.CANCELLED), started, None)
                raise
            except BaseException as exc:  # KeyboardInterrupt, SystemExit, ...
                await state.requeue(delivery.delivery_tag)
                self._record(msg, Outcome(OutcomeKind.REQUEUE), started, exc)
                logger.error(
                    "queue %r: the handler raised %s; stopping the App (the message goes "
                    "back to the queue)",
                    self.queue,
                    error_type(exc),
                )
                self._on_fatal(exc)
                return
            if state.cancelling:  # it swallowed the cancellation: it did not finish
                await state.requeue(delivery.delivery_tag)
                self._record(msg, Outcome(OutcomeKind.CANCELLED), started, None)
                return
            outcome = decide(error, attempt=msg.attempt, retry=spec.retry)
            if outcome.kind is OutcomeKind.ACK or outcome.kind is OutcomeKind.DUPLICATE:
                await state.acked(delivery.delivery_tag)
            else:
                with anyio.CancelScope(shield=True):
                    outcome = await self._settle(state, msg, outcome)
            self._record(msg, outcome, started, error)
        finally:
            del state.running[delivery.delivery_tag]
            state.ended()

    async def _settle(self, state: _ChannelState, msg: Message, outcome: Outcome) -> Outcome:
        """Carry out ``outcome``; returns what was actually done."""
        tag = msg.delivery_tag
        kind = outcome.kind
        if kind is OutcomeKind.REQUEUE:
            await state.requeue(tag)
            return outcome
        published = False
        connection_lost = False  # the publishing connection broke: no refusal
        with anyio.move_on_after(SETTLE_TIMEOUT):
            try:
                if kind is OutcomeKind.RETRY:
                    await self._publish_retry(msg, outcome)
                else:
                    await self._publish_dead_letter(msg, outcome)
                published = True
            except AMQPError as exc:
                if isinstance(exc, ChannelClosed) and exc.message_too_large:
                    # over the broker's max_message_size: no retry will help
                    return await self._reject_uncopyable(state, msg, exc)
                connection_lost = isinstance(exc, ConnectionLost)
                logger.error(
                    "queue %r: could not publish message %r (delivery_tag %d) to its %s "
                    "queue: %s; it goes back to the queue",
                    self.queue,
                    msg.message_id,
                    tag,
                    "retry" if kind is OutcomeKind.RETRY else "dead-letter",
                    exc,
                )
            except ValueError as exc:  # the copy cannot be encoded: no retry will help
                return await self._reject_uncopyable(state, msg, exc)
        if not published:
            if state.ch.is_open and not connection_lost:  # refused or no confirm in time
                await anyio.sleep(SETTLE_FAILURE_PAUSE)
            # (on a closed channel the broker requeues it itself; and a lost publishing
            # connection is no refusal: its loss often comes with the consumers' own,
            # whose reconnect this shielded pause would hold up)
            await state.requeue(tag)
            return Outcome(OutcomeKind.REQUEUE, error_type=outcome.error_type)
        await state.acked(tag)
        return outcome

    async def _reject_uncopyable(
        self, state: _ChannelState, msg: Message, exc: Exception
    ) -> Outcome:
        """A copy of ``msg`` can never be published (it cannot be encoded, or it is
        larger than the broker accepts): reject the original, so that the broker
        dead-letters it as it is, instead of requeueing it forever."""
        logger.error(
            "queue %r: message %r (delivery_tag %d) cannot be copied: %s; it is "
            "rejected, so the broker dead-letters it as it is (without x-error "
            "headers)",
            self.queue,
            msg.message_id,
            msg.delivery_tag,
            exc,
        )
        await state.reject(msg.delivery_tag)
        return Outcome(OutcomeKind.DEAD_LETTER, error_type=error_type(exc))

    async def _publish_retry(self, msg: Message, outcome: Outcome) -> None:
        delay = outcome.delay
        assert delay is not None
        queue = retry_queue_name(self.queue, delay)
        arguments = retry_arguments(self.spec, delay)
        if self.spec.retry.is_ad_hoc(delay):
            # An ad-hoc queue expires when unused; publishing does not renew its
            # lease, declaring does: declare it when our last declaration is old.
            now = anyio.current_time()
            if now - self._leases.get(queue, -math.inf) >= AD_HOC_LEASE_RENEWAL:
                await self._publishing.declare_queue(
                    queue, arguments, durable=self.spec.durable, purpose=COPIES
                )
                self._leases[queue] = now
        await self._publish_copy(msg, queue, arguments, retry_headers(msg))

    async def _publish_copy(
        self, msg: Message, queue: str, arguments: FieldTable | None, headers: FieldTable
    ) -> None:
        """Publish a confirmed copy of ``msg`` to ``queue``; when no such queue exists
        (a delay outside the policy, or a queue deleted on the broker) declare it and
        publish once more."""
        publishing = self._publishing
        publish = functools.partial(
            publishing.publish,
            msg.body,
            purpose=COPIES,
            exchange="",
            routing_key=queue,
            properties=_copy_properties(msg.properties, headers),
            mandatory=True,
        )
        try:
            await publish()
        except MessageReturned:
            await publishing.declare_queue(
                queue, arguments, durable=self.spec.durable, purpose=COPIES
            )
            await publish()

    async def _publish_dead_letter(self, msg: Message, outcome: Outcome) -> None:
        await self._publish_copy(
            msg,
            dead_letter_queue_name(self.queue),
            dead_letter_arguments(self.spec),
            dead_letter_headers(msg, outcome),
        )

    def _record(
        self, msg: Message, outcome: Outcome, started: float, error: BaseException | None
    ) -> None:
        duration = self._native.current_time() - started
        self._on_outcome(self.queue, outcome.kind, duration)
        if outcome.kind is OutcomeKind.ACK or outcome.kind is OutcomeKind.CANCELLED:
            return
        if outcome.kind is OutcomeKind.DUPLICATE:
            log_duplicate(msg, error, duration)
            return
        if outcome.kind is OutcomeKind.RETRY:
            action = f"retry in {outcome.delay:g} s"
        elif outcome.kind is OutcomeKind.DEAD_LETTER:
            action = f"dead-lettered to {dead_letter_queue_name(self.queue)!r}"
        else:
            action = "requeued"
        reason = error_type(error) if error is not None else outcome.error_type or "Requeue"
        if error is not None and str(error):
            reason = f"{reason}: {error}"
        logger.warning(
            "queue %r: message %r (delivery_tag %d, attempt %d) failed after %.3f s: %s; %s",
            self.queue,
            msg.message_id,
            msg.delivery_tag,
            msg.attempt,
            duration,
            reason,
            action,
            extra={
                "event": "message_failed",
                "error": reason,
                "queue": self.queue,
                "message_id": msg.message_id,
                "delivery_tag": msg.delivery_tag,
                "attempt": msg.attempt,
                "duration": duration,
                "outcome": outcome.kind.value,
            },
        )
