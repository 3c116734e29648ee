"""What an App counts while it runs (design section 7), kept as plain numbers.

Recording is a few integer additions on the hot path; nothing here imports
prometheus-client. :mod:`._http` turns a :class:`Metrics` into the Prometheus text
format when ``/metrics`` is scraped (and only then).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ._outcome import OutcomeKind

__all__ = ["HANDLER_BUCKETS", "Histogram", "Metrics"]

#: Upper bounds (seconds) of the handler duration histogram: Prometheus' defaults,
#: extended to the minutes that a handler timeout allows.
HANDLER_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    30.0,
    60.0,
    300.0,
    math.inf,
)


@attrs.define
class Histogram:
    """Observations in the buckets of ``bounds`` (each count for its own bucket only;
    the last bound is infinity)."""

    bounds: tuple[float, ...] = HANDLER_BUCKETS
    counts: list[int] = attrs.Factory(lambda self: [0] * len(self.bounds), takes_self=True)
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` per bucket, as Prometheus wants."""
        running = 0
        buckets = []
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets

    def exposition_buckets(self) -> list[tuple[str, int]]:
        """:meth:`cumulative` with the bounds written as Prometheus' ``le`` labels."""
        return [
            ("+Inf" if math.isinf(bound) else repr(bound), count)
            for bound, count in self.cumulative()
        ]


@attrs.define
class Metrics:
    """Counters of one App, kept across its runs (a restarted App counts on)."""

    #: Messages handled, by (queue, outcome).
    messages: Counter[tuple[str, str]] = attrs.Factory(Counter)
    #: Handler durations, by queue.
    handler_seconds: dict[str, Histogram] = attrs.Factory(dict)
    reconnects: int = 0
    #: Deliveries the broker took back past its consumer timeout, by queue.
    consumer_timeouts: Counter[str] = attrs.Factory(Counter)
    #: Read when scraped: are we connected, and how many handlers run per queue.
    connected: Callable[[], bool] = lambda: False
    inflight: Callable[[], dict[str, int]] = dict
    #: prometheus-client collectors scraped beside these counters (``collect()``
    #: yielding metric families): the queue statistics of :mod:`._queue_stats`, an
    #: outbox relay's.
    collectors: list[Any] = attrs.Factory(list)

    def add_queues(self, queues: Iterable[str]) -> None:
        """Start every series of ``queues`` at 0, so that a rate() works from the start
        and a dashboard shows the outcomes that never happened as 0, not missing."""
        for queue in queues:
            self.handler_seconds.setdefault(queue, Histogram())
            self.consumer_timeouts[queue] += 0
            for kind in OutcomeKind:
                self.messages[queue, kind.value] += 0

    def record(self, queue: str, kind: OutcomeKind, duration: float) -> None:
        self.messages[queue, kind.value] += 1
        histogram = self.handler_seconds.get(queue)
        if histogram is None:
            histogram = self.handler_seconds[queue] = Histogram()
        histogram.observe(duration)
