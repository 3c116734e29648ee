"""The connection's lifetime: connect, declare, subscribe, and reconnect with backoff.

::

    Supervisor.run
      _publish_connection               the publishing connection, opened when first
                                        needed: retries, dead letters, app.publisher()
      the consumers' connection, one at a time
        connect(url)                    cycling through the URLs given (cluster nodes)
          declare every consumer's topology (406 -> TopologyError)
          Dispatcher.run, one per consumer

The two connections live apart (RabbitMQ's advice): a broker that blocks the
publishing connection in a memory or disk alarm never holds up the consumers' acks,
and each one reconnects on its own.

When the connection is lost, its task group cancels every handler on it (their
messages go back to the queue on the broker's side), and the loop connects again
after ``Backoff.delay(attempt, random)`` seconds: exponential, full jitter, reset once
a connection lived ``reset_after`` seconds. Readiness is false until every consumer
has subscribed again.

Errors that retrying cannot fix are fatal *at start-up* (before the first time every
consumer was subscribed): a refused login (403), an unknown vhost (530), a peer that
does not speak AMQP, a topology mismatch. They raise :class:`StartupError` with a
one-line reason. After start-up every error is retried, loudly, since a broker being
reconfigured or restarted is expected to come back.
"""

from __future__ import annotations

import logging
import random as random_module
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ._backoff import DEFAULT_BACKOFF, Backoff
from ._dispatch import DEFAULT_CONSUMER_TIMEOUT, Dispatcher, OutcomeHook
from ._outcome import sole_exception
from ._publisher import PublishChannelSlot
from ._shutdown import Shutdown
from ._topology import TopologyError, declare_consumer
from ._versions import describe
from .amqp import (
    AMQPError,
    ChannelClosed,
    Connection,
    ConnectionClosed,
    ConnectionParameters,
    RemoteProtocolError,
    UnsupportedSetting,
    connect,
)

if TYPE_CHECKING:
    from ._consumer import ConsumerSpec
    from ._pipeline import Pipeline

__all__ = ["StartupError", "Supervisor"]

logger = logging.getLogger("strictconsume")

Connect = Callable[[ConnectionParameters], AbstractAsyncContextManager[Connection]]

#: Reply codes of a connection.close that retrying will not fix at start-up.
FATAL_REPLY_CODES = frozenset({403, 530})


class StartupError(Exception):
    """The App cannot start and retrying would not help (wrong credentials, unknown
    vhost, not an AMQP broker, a queue that exists with other arguments)."""


def _connect(params: ConnectionParameters) -> AbstractAsyncContextManager[Connection]:
    return connect(params)


class Supervisor:
    """Keeps an App's consumers connected and subscribed until the shutdown."""

    def __init__(
        self,
        specs: Sequence[ConsumerSpec],
        parameters: Sequence[ConnectionParameters],
        *,
        prefetch: int,
        shutdown: Shutdown,
        publishing: PublishChannelSlot,
        on_outcome: OutcomeHook,
        on_fatal: Callable[[BaseException], None],
        on_reconnect: Callable[[], None] = lambda: None,
        on_connected: Callable[[Connection], None] = lambda conn: None,
        on_consumer_timeout: Callable[[str], None] = lambda queue: None,
        consumer_timeout: float = DEFAULT_CONSUMER_TIMEOUT,
        random: random_module.Random | None = None,
        backoff: Backoff = DEFAULT_BACKOFF,
        connect: Connect = _connect,
        pipelines: Mapping[str, Pipeline] | None = None,
    ) -> None:
        if not parameters:
            raise ValueError("at least one URL is needed")
        self.specs = tuple(specs)
        self.parameters = tuple(parameters)
        self.shutdown = shutdown
        self.backoff = backoff
        self.random = random if random is not None else random_module.Random()
        self._connect = connect
        self._on_reconnect = on_reconnect
        self._on_connected = on_connected
        self._publishing = publishing
        self._publishing_idle = anyio.CancelScope()
        self.connected = False
        self.ever_ready = False
        self.reconnects = 0
        self.subscribed: set[str] = set()
        self.dispatchers = [
            Dispatcher(
                spec,
                prefetch=spec.prefetch or prefetch,
                shutdown=shutdown,
                on_outcome=on_outcome,
                on_subscribed=self._on_subscribed,
                on_fatal=on_fatal,
                random=self.random,
                backoff=backoff,
                consumer_timeout=consumer_timeout,
                on_consumer_timeout=on_consumer_timeout,
                pipeline=None if pipelines is None else pipelines[spec.queue],
            )
            for spec in self.specs
        ]

    @property
    def ready(self) -> bool:
        """Connected, and every consumer subscribed."""
        return self.connected and len(self.subscribed) == len(self.specs)

    def _on_subscribed(self, queue: str, subscribed: bool) -> None:
        if subscribed:
            self.subscribed.add(queue)
        else:
            self.subscribed.discard(queue)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until a shutdown finished; ``task_status`` is signalled once every
        consumer is subscribed for the first time (or the App is stopping).

        Raises:
            StartupError: a fatal error before the first full subscription.
        """
        error: BaseException | None = None
        self._publishing.start()
        done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._publish_connection, done)
            try:
                await self._consume(task_status)
            except BaseException as exc:  # re-raised below, outside the task group
                error = exc
            finally:
                # The consumers have drained: close the publishing connection cleanly
                # (a connection being made finishes first, within its timeout).
                done.set()
                self._publishing_idle.cancel()
        if error is not None:
            raise error

    async def _consume(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The consumers' connection, made again until the shutdown."""
        attempt = 0
        index = 0
        try:
            while not self.shutdown.requested:
                params = self.parameters[index % len(self.parameters)]
                connected_at: float | None = None
                error: BaseException | None = None
                attempt_scope = self.shutdown.intake_scope()  # a stop cancels start-up
                try:
                    with attempt_scope:
                        async with self._connect(params) as conn:
                            connected_at = anyio.current_time()
                            self.connected = True
                            logger.info(
                                "connected to %s (%s)",
                                params.url,
                                describe(conn.server_version),
                                extra={"event": "connected"},
                            )
                            self._on_connected(conn)
                            await self._session(conn, task_status, attempt_scope)
                except Exception as exc:
                    error = sole_exception(exc)
                    self._check_fatal(error, params)
                finally:
                    self.shutdown.discard(attempt_scope)
                    self.connected = False
                    self.subscribed.clear()
                if self._stopping():
                    break
                if connected_at is not None:
                    self.reconnects += 1
                    self._on_reconnect()
                    if anyio.current_time() - connected_at >= self.backoff.reset_after:
                        attempt = 0
                delay = self.backoff.delay(attempt, self.random.random())
                attempt += 1
                index += 1
                following = self.parameters[index % len(self.parameters)].url
                if isinstance(error, AMQPError | OSError | TopologyError):
                    logger.warning(
                        "%s: %s; reconnecting in %.2f s to %s",
                        "connection lost" if connected_at is not None else "cannot connect",
                        error,
                        delay,
                        following,
                        extra={"event": "reconnecting", "delay": round(delay, 3)},
                    )
                else:
                    logger.error(
                        "unexpected error on the connection to %s; reconnecting in %.2f s",
                        params.url,
                        delay,
                        exc_info=error,
                        extra={"event": "reconnecting", "delay": round(delay, 3)},
                    )
                with self.shutdown.intake():
                    await anyio.sleep(delay)
        finally:
            if not self.ever_ready and self.shutdown.requested:
                task_status.started()  # stopped during start-up: nothing to wait for

    async def _publish_connection(self, done: anyio.Event) -> None:
        """The publishing connection: opened when something waits for it, cycling
        through the URLs, opened again with backoff when lost and needed; closed
        once ``done`` is set, after the consumers stopped (so that what finishes in
        the grace period can still be retried or dead-lettered)."""
        attempt = 0
        index = 0
        while not done.is_set():
            with self._idle_scope():
                await self._publishing.wait_wanted()
            if done.is_set():
                return
            params = self.parameters[index % len(self.parameters)]
            connected_at: float | None = None
            error: BaseException | None = None
            try:
                async with self._connect(params) as conn:
                    connected_at = anyio.current_time()
                    logger.info(
                        "publishing connection open to %s",
                        params.url,
                        extra={"event": "publisher_connected"},
                    )
                    await self._publishing.serve(conn, until=done)
            except Exception as exc:
                error = sole_exception(exc)
            if done.is_set():
                return
            if connected_at is not None and (
                anyio.current_time() - connected_at >= self.backoff.reset_after
            ):
                attempt = 0
            delay = self.backoff.delay(attempt, self.random.random())
            attempt += 1
            index += 1
            logger.warning(
                "publishing connection %s: %s; connecting again in %.2f s when needed",
                "lost" if connected_at is not None else "failed",
                error,
                delay,
                extra={"event": "publisher_reconnecting", "delay": round(delay, 3)},
            )
            with self._idle_scope():
                await anyio.sleep(delay)

    def _idle_scope(self) -> anyio.CancelScope:
        """A scope for a wait of the publishing loop, which the end of run() cancels."""
        self._publishing_idle = anyio.CancelScope()
        return self._publishing_idle

    def _stopping(self) -> bool:
        return self.shutdown.requested

    def _check_fatal(self, error: BaseException, params: ConnectionParameters) -> None:
        if self.ever_ready:
            return
        if isinstance(error, TopologyError):
            raise StartupError(str(error)) from error
        if isinstance(error, UnsupportedSetting):
            raise StartupError(f"{params.url}: {error}") from error
        if isinstance(error, ConnectionClosed) and (
            error.reply_code in FATAL_REPLY_CODES or error.deprecated_feature
        ):
            raise StartupError(str(error)) from error
        if isinstance(error, ChannelClosed) and error.reply_code == 403:
            raise StartupError(f"cannot consume: {error}") from error
        if isinstance(error, RemoteProtocolError):
            raise StartupError(
                f"{params.url} does not answer as an AMQP 0-9-1 broker: {error}"
            ) from error

    async def _session(
        self,
        conn: Connection,
        task_status: anyio.abc.TaskStatus[None],
        attempt_scope: anyio.CancelScope,
    ) -> None:
        """Declare, subscribe every consumer, serve until the shutdown drained them.

        The whole topology is declared first, so that at start-up a mismatch is an
        error before anything is consumed. Then every consumer subscribes on its
        own, at once: after start-up, one that cannot (its queue's node is down, a
        refusal, a declaration or subscribe that does not complete) retries with
        backoff while the others work, and readiness names it.
        """
        startup = not self.ever_ready
        undeclared = await self._declare(conn, startup=startup)
        # Declared: from here a stop drains the consumers gracefully instead of
        # cancelling the attempt (each dispatcher watches the shutdown itself).
        self.shutdown.discard(attempt_scope)
        all_started = anyio.Event()
        waiting = len(self.dispatchers)

        def one_started() -> None:
            nonlocal waiting
            waiting -= 1
            if waiting == 0:
                all_started.set()

        async with anyio.create_task_group() as consumers:
            for dispatcher in self.dispatchers:
                consumers.start_soon(
                    self._run_dispatcher,
                    dispatcher,
                    conn,
                    startup,
                    dispatcher.queue not in undeclared,
                    one_started,
                )
            if not self.dispatchers:  # an App used only to publish
                consumers.start_soon(self.shutdown.wait)
                all_started.set()
            await all_started.wait()
            if not self.shutdown.requested:
                logger.info(
                    "ready: consuming %s",
                    ", ".join(repr(spec.queue) for spec in self.specs) or "nothing",
                    extra={"event": "ready"},
                )
            if not self.ever_ready:
                self.ever_ready = True
                task_status.started()

    async def _declare(self, conn: Connection, *, startup: bool) -> set[str]:
        """Declare every consumer's topology on one channel (a fresh one after a
        refusal, which closes it); returns the queues whose declaration failed.

        Raises:
            TopologyError: at start-up, the broker refused a declaration.
        """
        undeclared: set[str] = set()
        pending = list(self.specs)
        while True:
            async with conn.channel() as ch:
                while pending:
                    spec = pending.pop(0)
                    try:
                        await declare_consumer(ch, spec)
                    except TopologyError as exc:
                        if startup:
                            raise
                        logger.warning(
                            "queue %r cannot be declared: %s; its consumer retries, the "
                            "others go on",
                            spec.queue,
                            exc,
                            extra={"event": "resubscribing", "queue": spec.queue},
                        )
                        undeclared.add(spec.queue)
                        break  # the broker closed the channel
            if not pending:
                return undeclared

    async def _run_dispatcher(
        self,
        dispatcher: Dispatcher,
        conn: Connection,
        startup: bool,
        declared: bool,
        started: Callable[[], None],
    ) -> None:
        await dispatcher.run(
            conn,
            self._publishing,
            startup=startup,
            declared=declared,
            task_status=_Started(started),
        )


class _Started:
    """A task status that calls back (the session counts its consumers started)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback

    def started(self, value: None = None) -> None:
        self._callback()
