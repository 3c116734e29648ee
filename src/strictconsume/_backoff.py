"""Exponential backoff with full jitter, as a pure function of the attempt number.

The reconnect loop sleeps ``Backoff().delay(n, random_fraction)`` seconds before its
n-th consecutive attempt (n = 0 for the first retry). With full jitter the delay is
drawn uniformly from ``[0, min(cap, base * factor**n)]``: clients that lost the same
broker at the same moment spread their reconnects out instead of arriving together.
Nothing here reads a clock or a random generator, so the tests can fix both.
"""

from __future__ import annotations

import attrs

__all__ = ["DEFAULT_BACKOFF", "Backoff"]


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen
class Backoff:
    """The reconnect policy: base 0.5 s, factor 2, cap 30 s; reset after 60 s of life."""

    base: float = attrs.field(default=0.5, validator=_positive)
    factor: float = attrs.field(default=2.0, validator=attrs.validators.ge(1.0))
    cap: float = attrs.field(default=30.0, validator=_positive)
    #: A connection that lived this long resets the attempt count to zero.
    reset_after: float = attrs.field(default=60.0, validator=_positive)

    def ceiling(self, attempt: int) -> float:
        """The largest delay the ``attempt``-th retry (from 0) may wait."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt!r}")
        # Compare exponents rather than computing factor**attempt, which overflows.
        ceiling = self.base
        for _ in range(attempt):
            ceiling *= self.factor
            if ceiling >= self.cap:
                return self.cap
        return min(ceiling, self.cap)

    def delay(self, attempt: int, random_fraction: float) -> float:
        """The delay before the ``attempt``-th retry, given a uniform draw in [0, 1)."""
        if not 0.0 <= random_fraction <= 1.0:
            raise ValueError(f"random_fraction must be in [0, 1], not {random_fraction!r}")
        return self.ceiling(attempt) * random_fraction


DEFAULT_BACKOFF = Backoff()
