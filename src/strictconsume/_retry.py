"""The retry policy and the queues that carry retries and dead letters.

For a consumer of queue ``q`` (section 3 of the design):

- ``q`` itself is declared with ``x-dead-letter-exchange=""`` and
  ``x-dead-letter-routing-key=q.dlq``, so that what the broker dead-letters on its
  own (an expired message, a length limit, a quorum delivery limit) lands in ``q.dlq``;
- ``q.retry.<ms>`` for each delay holds a retried copy for ``<ms>`` milliseconds
  (``x-message-ttl``), then the broker dead-letters it back to ``q`` through the
  default exchange (``x-dead-letter-routing-key=q``). No plugin is needed. It is a
  quorum queue with at-least-once dead-lettering for every consumer (see
  :mod:`._topology`), so a ``q`` that refuses the copy delays it instead of losing it;
- ``q.dlq`` holds what will not be retried, with the reason in ``x-error-*`` headers.

The set of retry queues is bounded. ``RetryLater(delay=d)`` with a ``d`` the policy
does not have is rounded to the nearest of ten steps per decade (1, 1.2, 1.5, 2, 2.5,
3, 4, 5, 6 and 8 times a power of ten, in milliseconds: within 16 % of ``d``), so
that jittered delays such as ``uniform(1, 60)`` use at most 19 queues instead of one
per millisecond. Such an ad-hoc queue is declared on first use with ``x-expires``
(its TTL plus two hours): once nothing has used it for that long the broker deletes
it. Publishing does not renew that lease, declaring does, so a consumer declares an
ad-hoc queue again before it publishes to it when its last declaration is more than
:data:`AD_HOC_LEASE_RENEWAL` old: a message in it always expires before the queue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
from pamqp.common import FieldTable

__all__ = [
    "AD_HOC_LEASE_RENEWAL",
    "Retry",
    "ad_hoc_queue_arguments",
    "dead_letter_queue_name",
    "delay_ms",
    "main_queue_arguments",
    "retry_queue_arguments",
    "retry_queue_name",
]


def _delays(value: Sequence[float]) -> tuple[float, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"delays must be a sequence of seconds, not {value!r}")
    delays = tuple(float(d) for d in value)
    for delay in delays:
        if not 0.001 <= delay <= 2**31 / 1000:  # x-message-ttl is at most 2**32-1 ms
            raise ValueError(
                f"each retry delay must be between 0.001 s and {2**31 // 1000} s, not {delay!r}"
            )
    return delays


@attrs.frozen
class Retry:
    """How a failing message is retried before it is dead-lettered.

    Args:
        delays: The wait before each retry, in seconds: ``(1.0, 10.0, 60.0)`` (the
            default) retries three times, after 1 s, 10 s and 60 s, so the handler
            runs at most four times; ``()`` dead-letters on the first failure.
    """

    delays: tuple[float, ...] = attrs.field(default=(1.0, 10.0, 60.0), converter=_delays)

    @property
    def max_attempts(self) -> int:
        """How many times the handler may run for one message."""
        return len(self.delays) + 1

    def delay_after(self, attempt: int) -> float | None:
        """The delay before retrying a message whose ``attempt``-th run failed;
        None when the attempts are used up."""
        if 1 <= attempt <= len(self.delays):
            return self.delays[attempt - 1]
        return None

    def queue_delay(self, delay: float) -> float:
        """The delay of the retry queue that serves ``delay``: the policy's own when
        it has one of that many milliseconds, else the nearest ad-hoc step."""
        if delay_ms(delay) in {delay_ms(d) for d in self.delays}:
            return delay
        stepped = ad_hoc_delay(delay)
        for own in self.delays:
            if delay_ms(own) == delay_ms(stepped):
                return own
        return stepped

    def is_ad_hoc(self, delay: float) -> bool:
        """True when ``delay`` (as :meth:`queue_delay` returns it) is not the policy's."""
        return delay_ms(delay) not in {delay_ms(d) for d in self.delays}


#: The ad-hoc delay steps of one decade (see the module's docstring).
AD_HOC_STEPS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
#: An ad-hoc retry queue lives this much longer than its TTL without use ...
AD_HOC_EXPIRES_MARGIN = 7200.0
#: ... and a consumer declares it again (renewing the lease) when its last declaration
#: is older than this, before it publishes to it.
AD_HOC_LEASE_RENEWAL = AD_HOC_EXPIRES_MARGIN / 2
_MAX_TTL_MS = 2**31


def ad_hoc_delay(delay: float) -> float:
    """``delay`` rounded to the nearest ad-hoc step (in log scale), in seconds."""
    ms = delay * 1000
    candidates = [
        step * 10**exponent
        for exponent in range(10)
        for step in AD_HOC_STEPS
        if step * 10**exponent <= _MAX_TTL_MS
    ]
    best = min(candidates, key=lambda c: abs(math.log(c / ms)))
    return float(round(best)) / 1000


def delay_ms(delay: float) -> int:
    """A delay in whole milliseconds (the unit of queue names and TTLs)."""
    return max(1, round(delay * 1000))


def retry_queue_name(queue: str, delay: float) -> str:
    return f"{queue}.retry.{delay_ms(delay)}"


def dead_letter_queue_name(queue: str) -> str:
    return f"{queue}.dlq"


def main_queue_arguments(queue: str) -> FieldTable:
    return {
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue_name(queue),
    }


def retry_queue_arguments(queue: str, delay: float) -> FieldTable:
    return {
        "x-message-ttl": delay_ms(delay),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
    }


def ad_hoc_queue_arguments(delay: float) -> FieldTable:
    """What an ad-hoc retry queue adds: it expires once unused for its TTL plus
    :data:`AD_HOC_EXPIRES_MARGIN`."""
    return {"x-expires": delay_ms(delay) + round(AD_HOC_EXPIRES_MARGIN * 1000)}
