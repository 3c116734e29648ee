"""One consumer on one channel: each delivery becomes a handler task, each outcome a frame.

Structure (design sections 3 to 5)::

    Dispatcher.run                      one consumer, for the life of a connection
      conn.channel()                    its own channel: prefetch and failure domain
        task group "handlers"           owns the acker and one task per delivery
          intake (a cancel scope)       basic.consume; cancelled by a shutdown
          timeout watcher               cancels the handlers past their timeout
          handler task                  a cancel scope around the handler (the
                                        watcher's), then a shielded settlement

This module is the channel loop and the logging of outcomes; the pieces it drives
each have a module: the App's stop (``_shutdown.py``), the handler call
(``_handler.py``), the acks and nacks of a channel and when to send them
(``_acks.py``), the settlement of a message not simply acked (``_settle.py``) and
the headers and properties of its copies (``_copies.py``).

A settlement is an ack (through the :class:`~._acks.AckTracker`, coalesced), a nack
with requeue, or a confirmed publish of a copy to the retry queue or the dead-letter
queue followed by the ack of the original. Settlements are shielded from cancellation
and bounded by :data:`SETTLE_TIMEOUT`; a copy that could not be published leaves the
original requeued rather than acked, so the worst case is a duplicate, never a loss.
Frames for a channel are only ever sent on that channel object: a replaced channel
has a new tracker and the old one's handlers are cancelled before it closes.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ._acks import ACK_DELAY, SETTLE_TIMEOUT, ChannelAcks, ack_batch
from ._backoff import DEFAULT_BACKOFF, Backoff
from ._copies import copy_headers
from ._copies import copy_properties as _copy_properties
from ._handler import TimeoutWatcher, call_handler
from ._message import Message
from ._native import HandlerGroup, Native
from ._outcome import Outcome, OutcomeKind, decide, error_type
from ._pipeline import Pipeline, build_pipeline
from ._retry import dead_letter_queue_name
from ._settle import SETTLE_FAILURE_PAUSE, Settlement
from ._shutdown import Shutdown
from ._topology import TopologyError, declare_consumer
from ._versions import Version, consumer_timeout_argument, consumer_timeout_cancels
from .amqp import AMQPError, ChannelClosed, ConsumerCancelled, Flag
from .idempotency._core import guard, log_duplicate

if TYPE_CHECKING:
    import random as random_module

    from pamqp.common import FieldTable

    from ._consumer import ConsumerSpec
    from ._publisher import PublishChannelSlot
    from .amqp import Channel, Connection, Delivery

# ACK_DELAY, SETTLE_TIMEOUT, SETTLE_FAILURE_PAUSE, ack_batch, Shutdown, copy_headers and
# _copy_properties live in the modules of their concern; named here for the callers
# that knew them here.
__all__ = [
    "ACK_DELAY",
    "SETTLE_FAILURE_PAUSE",
    "SETTLE_TIMEOUT",
    "Dispatcher",
    "Shutdown",
    "_copy_properties",
    "ack_batch",
    "call_handler",
    "copy_headers",
]

logger = logging.getLogger("strictconsume")

OutcomeHook = Callable[[str, OutcomeKind, float], None]

#: RabbitMQ's default consumer_timeout, in seconds (30 minutes).
DEFAULT_CONSUMER_TIMEOUT = 1800.0
#: A broker-sent cancel is taken for a consumer timeout when a delivery has been held
#: at least this share of the timeout (the broker checks on its own clock).
CONSUMER_TIMEOUT_SLACK = 0.9


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
        self.acks = ChannelAcks(ch, prefetch)
        #: The channel's ack tracker (the acks' own).
        self.tracker = self.acks.tracker
        self.inflight = 0
        self.idle = Flag(set=True)
        #: Set when the handlers are being cancelled (grace over, channel lost): a
        #: handler that swallows the cancellation and returns is requeued, not acked.
        self.cancelling = False
        self.limit = anyio.Semaphore(concurrency) if concurrency else None
        #: The handlers running: delivery tag -> (when it started, message id), to
        #: name the message a broker's consumer timeout took back.
        self.running: dict[int, tuple[float, str | None]] = {}
        #: Enforces the handlers' timeout (None: the consumer has none).
        self.timeouts: TimeoutWatcher | None = None

    def started(self) -> None:
        if self.inflight == 0:
            self.idle.clear()
        self.inflight += 1

    def ended(self) -> None:
        self.inflight -= 1
        if self.limit is not None:
            self.limit.release()
        if self.inflight == 0:
            self.idle.set()

    async def acked(self, delivery_tag: int, duration: float | None = None) -> None:
        """The message of ``delivery_tag`` is done: ack it, coalesced with others
        (``duration``: its handler's, for the ack hold)."""
        await self.acks.acked(delivery_tag, alone=self.inflight == 1, duration=duration)

    async def flush(self) -> None:
        """Send the acks the tracker has ready (see :meth:`ChannelAcks.flush`)."""
        await self.acks.flush()

    async def requeue(self, delivery_tag: int) -> None:
        """Nack with requeue: the message goes back to its queue."""
        await self.acks.requeue(delivery_tag)

    async def reject(self, delivery_tag: int) -> None:
        """Nack without requeue: the broker dead-letters it (the queue's DLX arguments)."""
        await self.acks.reject(delivery_tag)


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
        on_message: Callable[[Message], None] = lambda msg: None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.spec = spec
        self._on_message = on_message  # a handler starts: the message age (_queue_stats)
        #: How the handler is called (built by the App with its middleware and
        #: replies; by default the bare handler's).
        self.pipeline = pipeline if pipeline is not None else build_pipeline(spec)
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
        self._settlement = Settlement(spec)
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
        self._settlement.publishing = publishing
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
                handlers.start_soon(state.acks.acker)
                if self.spec.timeout is not None:
                    state.timeouts = TimeoutWatcher(native)
                    handlers.start_soon(state.timeouts.run)
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
        tracing = self.pipeline.tracing
        if tracing is None:
            await self._process(state, delivery, msg)
        else:  # the consumer span, current for the call, the settlement and the logs
            with tracing.delivery(msg):
                await self._process(state, delivery, msg)

    async def _process(self, state: _ChannelState, delivery: Delivery, msg: Message) -> None:
        spec = self.spec
        self._on_message(msg)
        native = self._native
        started = native.current_time()
        error: BaseException | None = None
        state.running[delivery.delivery_tag] = (started, msg.message_id)
        try:
            try:
                if spec.idempotency is None:
                    error = await call_handler(
                        spec,
                        msg,
                        pipeline=self.pipeline,
                        started=started,
                        native=native,
                        timeouts=state.timeouts,
                    )
                else:  # skip a handled key; the handler's timeout starts once claimed
                    run = functools.partial(
                        call_handler,
                        spec,
                        msg,
                        pipeline=self.pipeline,
                        native=native,
                        timeouts=state.timeouts,
                    )
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
            ended = None
            if outcome.kind is OutcomeKind.ACK or outcome.kind is OutcomeKind.DUPLICATE:
                ended = native.current_time()
                await state.acked(delivery.delivery_tag, ended - started)
            else:
                with anyio.CancelScope(shield=True):
                    outcome = await self._settlement.settle(state, msg, outcome)
            self._record(msg, outcome, started, error, ended)
        finally:
            del state.running[delivery.delivery_tag]
            state.ended()

    def _record(
        self,
        msg: Message,
        outcome: Outcome,
        started: float,
        error: BaseException | None,
        ended: float | None = None,
    ) -> None:
        duration = (self._native.current_time() if ended is None else ended) - started
        self._on_outcome(self.queue, outcome.kind, duration)
        if self.pipeline.tracing is not None:
            self.pipeline.tracing.outcome(outcome, error)
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
