"""Queue depth and message age: what an operator of a fleet of consumers watches.

Three sets of series beside the App's own counters (design section 7):

``strictconsume_queue_messages{queue}``      messages ready in the queue
``strictconsume_queue_consumers{queue}``     consumers subscribed to it (every process)
``strictconsume_message_age_seconds{queue}`` how old a message was when its handler
                                             started: now minus its ``timestamp``
``strictconsume_ready``                      1 while connected with every consumer
                                             subscribed (``/health/ready``), else 0

The counts come from a passive ``queue.declare`` of each consumed queue, its
``.dlq`` and its retry queues, every ``queue_stats_interval`` seconds (15; 0 turns
the polling off) from the first scrape of ``/metrics`` on (an App whose metrics
nobody reads asks nothing), on a channel of its own on the consumers' connection: a queue
that is missing (404) closes only that channel, never a consumer's. The broker
answers a passive declare with the messages *ready* (not those delivered and
unacked) and the consumers of every connection, so every process of a fleet reports
the same numbers for a queue: aggregate them with ``max by (queue)``, not ``sum``.
While the connection is down the counts are not known and their series are absent
(an alert on them then holds its state; the readiness alert is the one that fires).

The age needs the publisher to set the AMQP ``timestamp`` property (whole seconds,
so a fresh message is 0 to 1 s old); a message without one is not observed. The age
of a retried message includes its retry delays (a copy keeps the original's
timestamp): it is the delay from publish to this run of the handler. A timestamp in
the future (clocks apart) counts as 0.
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import anyio
import attrs

from ._metrics import Histogram
from ._retry import dead_letter_queue_name, retry_queue_name
from .amqp import AMQPError, ChannelClosed

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ._consumer import ConsumerSpec
    from ._message import Message
    from .amqp import Connection

__all__ = ["AGE_BUCKETS", "DEFAULT_INTERVAL", "QueueStats", "watched_queues"]

logger = logging.getLogger("strictconsume")

#: Seconds between two polls of the queues' counts.
DEFAULT_INTERVAL = 15.0

#: Upper bounds (seconds) of the message age histogram: timestamps are whole
#: seconds, so nothing finer than a second; up to a day of backlog.
AGE_BUCKETS: tuple[float, ...] = (
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
    math.inf,
)


def watched_queues(specs: Iterable[ConsumerSpec]) -> tuple[str, ...]:
    """Each consumed queue, then its ``.dlq`` and its retry queues (the policy's; the
    ad-hoc ones of ``RetryLater(delay=...)`` come and go and are left out)."""
    names: dict[str, None] = {}
    for spec in specs:
        names[spec.queue] = None
        names[dead_letter_queue_name(spec.queue)] = None
        for delay in spec.retry.delays:
            names[retry_queue_name(spec.queue, delay)] = None
    return tuple(names)


def _epoch_seconds(value: object) -> float | None:
    """The ``timestamp`` property as seconds since 1970, or None when it is absent or
    outside what a datetime holds (a "never" sentinel is no publish time)."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    return None


@attrs.define(eq=False)
class QueueStats:
    """The queue counts and message ages of one App, and the task that polls them."""

    #: Seconds between polls; 0 polls never.
    interval: float = DEFAULT_INTERVAL
    #: Read when scraped: is the App ready.
    ready: Callable[[], bool] = lambda: False
    #: Wall-clock seconds since 1970 (the time a timestamp property is in).
    wall_clock: Callable[[], float] = time.time
    #: The queues polled, in order (:func:`watched_queues`).
    queues: tuple[str, ...] = ()
    #: Queue -> (messages ready, consumers) at the last poll; absent when not known.
    counts: dict[str, tuple[int, int]] = attrs.Factory(dict)
    #: Consumed queue -> ages of the messages its handler started.
    ages: dict[str, Histogram] = attrs.Factory(dict)
    #: Whether ``/metrics`` was ever scraped: until then nobody reads the counts, and
    #: the broker is not asked for them.
    scraped: bool = False
    _first_scrape: anyio.Event | None = None

    def watch(self, specs: Iterable[ConsumerSpec]) -> None:
        """Poll the queues of ``specs``; start their age series at 0."""
        specs = tuple(specs)
        self.queues = watched_queues(specs)
        for spec in specs:
            self.ages.setdefault(spec.queue, Histogram(AGE_BUCKETS))
        for queue in set(self.counts) - set(self.queues):
            del self.counts[queue]

    def message_started(self, msg: Message) -> None:
        """Observe the age of ``msg``, whose handler starts now (the message path: a
        few float operations)."""
        published = _epoch_seconds(msg.properties.timestamp)
        if published is None:
            return
        histogram = self.ages.get(msg.queue)
        if histogram is None:
            histogram = self.ages[msg.queue] = Histogram(AGE_BUCKETS)
        histogram.observe(max(0.0, self.wall_clock() - published))

    async def poll(self, conn: Connection) -> None:
        """Poll the counts on ``conn`` every :attr:`interval` seconds until cancelled
        (the consumers' session ends, or the App stops). Never raises: the counts are
        worth no consumer's failure."""
        if self.interval <= 0 or not self.queues:
            return
        if not self.scraped:
            self._first_scrape = anyio.Event()  # set by collect(), on this event loop
            await self._first_scrape.wait()
        try:
            while True:
                try:
                    await self._poll_once(conn)
                except (AMQPError, OSError) as exc:
                    # The connection is going: its session cancels this task soon.
                    logger.debug("queue statistics not read: %s", exc)
                    self.counts.clear()
                await anyio.sleep(self.interval)
        finally:
            self.counts.clear()  # not known while no connection is there to ask

    async def _poll_once(self, conn: Connection) -> None:
        """One passive declare of each queue, on a channel opened for it (again after a
        queue that is missing, 404, closed it)."""
        pending = list(self.queues)
        while pending:
            async with conn.channel() as ch:
                while pending:
                    queue = pending.pop(0)
                    try:
                        ok = await ch.queue_declare(queue, passive=True)
                    except ChannelClosed as exc:
                        if exc.reply_code != 404:
                            raise
                        self.counts.pop(queue, None)
                        break  # the broker closed the channel: open another
                    self.counts[queue] = (ok.message_count, ok.consumer_count)

    def collect(self) -> Iterator[Metric]:
        """The series (prometheus-client's collector protocol). The first call starts
        the polling: the counts of an App nobody scrapes are never asked for."""
        from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

        if not self.scraped:
            self.scraped = True
            if self._first_scrape is not None:
                self._first_scrape.set()

        messages = GaugeMetricFamily(
            "strictconsume_queue_messages",
            "Messages ready in the queue (passive queue.declare): each consumed queue, "
            "its .dlq and its retry queues.",
            labels=["queue"],
        )
        consumers = GaugeMetricFamily(
            "strictconsume_queue_consumers",
            "Consumers subscribed to the queue, from every connection (passive queue.declare).",
            labels=["queue"],
        )
        for queue in self.queues:
            counts = self.counts.get(queue)
            if counts is not None:
                messages.add_metric([queue], counts[0])
                consumers.add_metric([queue], counts[1])
        yield messages
        yield consumers
        ages = HistogramMetricFamily(
            "strictconsume_message_age_seconds",
            "Age of a message when its handler started (now minus its timestamp "
            "property), by queue.",
            labels=["queue"],
        )
        for queue, histogram in sorted(self.ages.items()):
            ages.add_metric([queue], histogram.exposition_buckets(), histogram.total)
        yield ages
        yield GaugeMetricFamily(
            "strictconsume_ready",
            "1 while connected with every consumer subscribed (/health/ready), else 0.",
            value=1 if self.ready() else 0,
        )
