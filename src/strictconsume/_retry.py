"""The retry policy and the queues that carry retries and dead letters.

For a consumer of queue ``q`` (section 3 of the design):

- ``q`` itself is declared with ``x-dead-letter-exchange=""`` and
  ``x-dead-letter-routing-key=q.dlq``, so that what the broker dead-letters on its
  own (an expired message, a length limit, a quorum delivery limit) lands in ``q.dlq``;
- ``q.retry.<ms>`` for each delay holds a retried copy for ``<ms>`` milliseconds
  (``x-message-ttl``), then the broker dead-letters it back to ``q`` through the
  default exchange (``x-dead-letter-routing-key=q``). No plugin is needed;
- ``q.dlq`` holds what will not be retried, with the reason in ``x-error-*`` headers.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
from pamqp.common import FieldTable

__all__ = [
    "Retry",
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
