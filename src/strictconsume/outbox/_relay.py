"""The relay: publishes an outbox's pending rows, in order, with confirms.

One round::

    fetch up to `batch` pending rows in id order (PostgreSQL: locked, SKIP LOCKED)
    for each row, in order:
        not due yet (a failed row waiting for its retry)   -> stop the round here
        publish it (confirms, mandatory) and wait for the confirm
            confirmed                                       -> sent
            returned, nacked, channel error, no confirm     -> attempt counted; retried
                in time                                        after the App's backoff, or
                                                               'failed' after max_attempts
            the connection lost                             -> stop the round (no attempt:
                                                               it is published again)
    mark the sent and the failed in one transaction, commit (the locks end)

Order comes first: a row that failed holds back the rows after it until it is sent
or given up (its attempts are bounded). A row whose publish was confirmed but whose
mark did not commit (the relay killed in between) is published again by the next
round: a duplicate with the same ``message_id``, which an idempotent consumer drops.

Between rounds the relay waits for PostgreSQL's ``NOTIFY`` (sent by ``add`` at
commit) or the polling interval, whichever comes first; SQLite is polled.
"""

from __future__ import annotations

import logging
import math
import random as random_module
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.to_thread
import attrs

from .._backoff import DEFAULT_BACKOFF, Backoff
from ..amqp import AMQPError, ConnectionLost

if TYPE_CHECKING:
    from .._app import App
    from .._publisher import Publisher
    from .._shutdown import Shutdown
    from ._table import OutboxRow, OutboxTable

__all__ = ["Relay", "RelayStats"]

logger = logging.getLogger("strictconsume")

T = TypeVar("T")

#: Seconds a publish may wait for its confirm before it counts as a failed attempt.
PUBLISH_TIMEOUT = 30.0


class Publish(Protocol):
    async def __call__(self, row: OutboxRow) -> None: ...


@attrs.define
class RelayStats:
    """What a relay counted; ``/metrics`` shows it."""

    published: int = 0
    failed: int = 0
    #: ``created_at`` of the oldest pending row seen in the last round (None: none).
    oldest_pending: float | None = None
    rounds: int = 0


class Relay:
    """Publishes the rows of ``outbox``: inside an App (:meth:`attach`), or on its own
    (``python -m strictconsume relay MODULE:ATTR``, ATTR naming the Relay).

    Args:
        outbox: A :class:`SQLiteOutbox` or :class:`PostgresOutbox`.
        batch: Rows per round (and per database transaction).
        poll_interval: Seconds between looks at the table when nothing wakes the
            relay (PostgreSQL's NOTIFY does; a lost notification is caught here).
        max_attempts: Publishes of one row before it is given up (status
            ``failed``, an ERROR line, ``strictconsume_outbox_failed_total``).
        retention: Seconds a sent row is kept before it is deleted.
        backoff: Delays between a row's attempts (the App's reconnect policy).
    """

    def __init__(
        self,
        outbox: OutboxTable,
        *,
        batch: int = 100,
        poll_interval: float = 1.0,
        max_attempts: int = 10,
        retention: float = 24 * 3600.0,
        backoff: Backoff = DEFAULT_BACKOFF,
        random: random_module.Random | None = None,
    ) -> None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, not {batch!r}")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, not {max_attempts!r}")
        for name, value in (("poll_interval", poll_interval), ("retention", retention)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value!r}")
        self.outbox = outbox
        self.batch = batch
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.retention = retention
        self.backoff = backoff
        self.stats = RelayStats()
        self._random = random or random_module.Random()
        self._limiter = anyio.CapacityLimiter(1)
        self._last_purge = -math.inf
        self._conn: Any = None
        self._rounds_at_failure = 0

    def __repr__(self) -> str:
        return f"<strictconsume.outbox.Relay {self.outbox.name}>"

    # -- running ---------------------------------------------------------------------------

    def attach(self, app: App) -> None:
        """Run this relay inside ``app``: a task of its task group once it started,
        publishing through its publishing connection (and waiting while it
        reconnects), stopping with its graceful shutdown; its metrics join the App's
        ``/metrics``."""
        app.add_task(self._run_in_app(app))
        app.metrics.collectors.append(self.collector())

    def standalone_app(self) -> App:
        """An App with no consumers that runs this relay: what
        ``python -m strictconsume relay MODULE:ATTR`` runs (settings from the
        environment and the command line, as for any App)."""
        from .._app import App

        app = App()
        self.attach(app)
        return app

    def _run_in_app(self, app: App) -> Callable[[Shutdown], Coroutine[Any, Any, None]]:
        async def run(shutdown: Shutdown) -> None:
            async with app.publisher() as publisher:
                await self.run(_publish_with(publisher), stopped=shutdown.wait)

        return run

    async def run(self, publish: Publish, *, stopped: Callable[[], Awaitable[None]]) -> None:
        """Publish rounds until ``stopped()`` returns; the round in progress ends
        first (its confirmed rows are marked). A database that fails (unreachable,
        restarted, a full disk) is logged and tried again with the backoff; the
        rows wait in the table meanwhile."""
        outbox = self.outbox
        wake = anyio.Event()  # set when stopped() returned

        async def watch() -> None:
            await stopped()
            wake.set()

        logger.info("outbox relay for %s started", outbox.name, extra={"event": "relay_started"})
        failures = 0
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                while not wake.is_set():
                    try:
                        await self._serve(publish, wake)
                    except outbox.driver_errors() as exc:
                        if self.stats.rounds > self._rounds_at_failure:
                            failures = 0  # it worked in between: start the backoff again
                        delay = self.backoff.delay(min(failures, 30), self._random.random())
                        failures += 1
                        self._rounds_at_failure = self.stats.rounds
                        logger.error(
                            "outbox %s: the database failed: %s: %s; the relay tries again "
                            "in %.1f s (the rows wait in the table)",
                            outbox.name,
                            type(exc).__name__,
                            exc,
                            delay,
                            extra={"event": "relay_database_failed", "error": str(exc)},
                        )
                        with anyio.move_on_after(delay):
                            await wake.wait()
                tg.cancel_scope.cancel()
        finally:
            logger.info(
                "outbox relay for %s stopped (published %d, failed %d)",
                outbox.name,
                self.stats.published,
                self.stats.failed,
                extra={"event": "relay_stopped"},
            )

    async def _serve(self, publish: Publish, wake: anyio.Event) -> None:
        """Open the relay's connections and run rounds until ``wake`` is set."""
        outbox = self.outbox
        listen = None
        try:
            self._conn = await anyio.to_thread.run_sync(self._open, limiter=self._limiter)
            listen = await anyio.to_thread.run_sync(outbox.listen_connection)
            while not wake.is_set():
                more, wait = await self._round(publish, wake.is_set)
                if wake.is_set():
                    break
                if not more:
                    interval = self.poll_interval if wait is None else wait
                    await self._idle(listen, min(interval, self.poll_interval), wake)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close, listen, limiter=self._limiter)

    async def _idle(self, listen: Any, wait: float, wake: anyio.Event) -> None:
        """Wait ``wait`` seconds, or less: until a NOTIFY or ``wake`` (a stop)."""
        error: BaseException | None = None
        with anyio.move_on_after(max(wait, 0.0)):
            async with anyio.create_task_group() as waiter:

                async def notified() -> None:
                    nonlocal error
                    try:
                        woke = await anyio.to_thread.run_sync(
                            self.outbox.wait_for_rows, listen, wait, abandon_on_cancel=True
                        )
                    except self.outbox.driver_errors() as exc:  # raised plain, below
                        error, woke = exc, True
                    if woke:
                        waiter.cancel_scope.cancel()

                if listen is not None:
                    waiter.start_soon(notified)
                await wake.wait()
                waiter.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _round(
        self, publish: Publish, stopping: Callable[[], bool]
    ) -> tuple[bool, float | None]:
        """One round; returns (a full batch was sent: go on at once, seconds until the
        head row's next attempt if it is waiting)."""
        outbox = self.outbox
        rows = await self._db(lambda c: outbox.fetch(c, self.batch))
        sent: list[int] = []
        failures: list[tuple[int, int, float, str, str]] = []
        wait: float | None = None
        complete = True
        for row in rows:
            now = time.time()
            if row.next_attempt_at > now:
                wait = row.next_attempt_at - now
                complete = False
                break
            if stopping():
                complete = False
                break
            try:
                with anyio.fail_after(PUBLISH_TIMEOUT):
                    await publish(row)
            except ConnectionLost as exc:
                logger.warning(
                    "outbox %s: row %d (message %r) not published, the connection was lost: "
                    "%s; it is published again after the reconnect",
                    outbox.name,
                    row.id,
                    row.message_id,
                    exc,
                    extra={"event": "relay_publish_failed", "message_id": row.message_id},
                )
                wait, complete = 0.5, False
                break
            except (AMQPError, TimeoutError, ValueError) as exc:
                failures.append(self._failed(row, exc))
                if failures[-1][3] == "pending":
                    wait = failures[-1][2] - time.time()
                    complete = False
                    break
                continue
            sent.append(row.id)
        now = time.time()
        await self._db(lambda c: outbox.finish(c, sent, failures, now))
        self.stats.published += len(sent)
        self.stats.rounds += 1
        if now - self._last_purge >= min(self.retention, 60.0):
            self._last_purge = now
            before = now - self.retention
            await self._db(lambda c: outbox.purge_sent(c, before))
        self.stats.oldest_pending = await self._db(outbox.oldest_pending)
        return complete and len(rows) == self.batch, wait

    def _failed(self, row: OutboxRow, exc: BaseException) -> tuple[int, int, float, str, str]:
        attempts = row.attempts + 1
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if attempts >= self.max_attempts:
            self.stats.failed += 1
            logger.error(
                "outbox %s: row %d (message %r to exchange %r, routing key %r) failed %d "
                "time(s) and is given up (status 'failed'): %s",
                self.outbox.name,
                row.id,
                row.message_id,
                row.exchange,
                row.routing_key,
                attempts,
                error,
                extra={"event": "relay_row_failed", "message_id": row.message_id, "error": error},
            )
            return (row.id, attempts, 0.0, "failed", error)
        delay = self.backoff.delay(attempts - 1, self._random.random())
        logger.warning(
            "outbox %s: row %d (message %r) not published (attempt %d of %d): %s; "
            "retried in %.1f s",
            self.outbox.name,
            row.id,
            row.message_id,
            attempts,
            self.max_attempts,
            error,
            delay,
            extra={"event": "relay_publish_failed", "message_id": row.message_id},
        )
        return (row.id, attempts, time.time() + delay, "pending", error)

    # -- the database, in a worker thread --------------------------------------------------

    def _open(self) -> Any:
        conn = self.outbox.connect()
        self.outbox.create(conn)
        return conn

    def _close(self, listen: Any) -> None:
        conn, self._conn = self._conn, None
        for c in (conn, listen):
            if c is not None:
                try:
                    c.close()
                except Exception as exc:  # closing is best effort
                    logger.debug("closing %s: %s", self.outbox.name, exc)

    async def _db(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` in the relay's worker thread, one call at a time."""
        conn = self._conn
        return await anyio.to_thread.run_sync(lambda: fn(conn), limiter=self._limiter)

    # -- metrics ---------------------------------------------------------------------------

    def collector(self) -> Any:
        """A Prometheus collector of this relay's metrics (for ``/metrics``)."""
        return _Collector(self)


class _Collector:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        relay = self.relay
        name = relay.outbox.name
        stats = relay.stats
        lag = GaugeMetricFamily(
            "strictconsume_outbox_lag_seconds",
            "Age of the oldest pending outbox row (0 when none), by outbox.",
            labels=["outbox"],
        )
        oldest = stats.oldest_pending
        lag.add_metric([name], 0.0 if oldest is None else max(0.0, time.time() - oldest))
        yield lag
        published = CounterMetricFamily(
            "strictconsume_outbox_published",
            "Outbox rows published and confirmed, by outbox.",
            labels=["outbox"],
        )
        published.add_metric([name], stats.published)
        yield published
        failed = CounterMetricFamily(
            "strictconsume_outbox_failed",
            "Outbox rows given up after their last attempt (status failed), by outbox.",
            labels=["outbox"],
        )
        failed.add_metric([name], stats.failed)
        yield failed


def _publish_with(publisher: Publisher) -> Publish:
    async def publish(row: OutboxRow) -> None:
        await publisher.publish(
            row.body,
            exchange=row.exchange,
            routing_key=row.routing_key,
            headers=row.headers,
            message_id=row.message_id,
            content_type=row.content_type,
            persistent=row.persistent,
            mandatory=True,
        )

    return publish
