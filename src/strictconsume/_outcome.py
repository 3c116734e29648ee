"""From what a handler did to what the broker is told: the outcome table.

=========================================  ===========================================
the handler ...                            outcome
=========================================  ===========================================
returns                                    ``ack``
raises ``Reject(reason)``                  ``dead_letter`` now, no retry
raises ``RetryLater(delay=None)``          ``retry`` (an attempt; dead_letter when the
                                           policy's attempts are used up)
raises ``Requeue()``                       ``requeue``: nack with requeue, no attempt
raises ``DecodeError`` (``msg.json()``,    ``dead_letter`` now: bad input is not retried
an ``InvalidBody`` typed body)
raises any other exception, or times out   ``retry`` per policy, then ``dead_letter``
is cancelled (shutdown after the grace)    ``cancelled``: nack with requeue
is skipped, its key handled already        ``duplicate``: ack (see ``idempotency``)
raises ``Duplicate`` (``Idempotency.mark``) ``duplicate``: ack
=========================================  ===========================================

A handler that loses its channel or connection mid-way is cancelled too; its message
cannot be settled any more and the broker redelivers it.

:func:`decide` is pure: the dispatcher and :mod:`strictconsume.testing` share it.
"""

from __future__ import annotations

import enum

import attrs

from ._message import DecodeError
from ._retry import Retry

__all__ = [
    "Duplicate",
    "Outcome",
    "OutcomeKind",
    "Reject",
    "Requeue",
    "RetryLater",
    "decide",
    "error_type",
    "sole_exception",
]

#: The longest ``x-error-message`` header written to a dead letter.
MAX_ERROR_MESSAGE = 4096


class Reject(Exception):
    """Raise to dead-letter the message at once, with ``reason`` in its headers."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):
    """Raise to retry the message after ``delay`` seconds (by default the policy's next
    delay). It counts as an attempt: when the attempts are used up, it is dead-lettered."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        if delay is not None and not 0.001 <= delay <= 2**31 / 1000:
            raise ValueError(f"RetryLater delay must be between 0.001 s and 2147483 s: {delay!r}")
        super().__init__(reason or (f"retry in {delay:g} s" if delay is not None else "retry"))
        self.delay = delay
        self.reason = reason


class Requeue(Exception):
    """Raise to put the message back in its queue (nack with requeue); not an attempt."""


class Duplicate(Exception):
    """The message's idempotency key was handled already: it is acked without doing
    the handler's work again (the outcome ``duplicate``). ``Idempotency.mark`` raises
    it inside the handler's own transaction: let it propagate (rolling the
    transaction back) and out of the handler."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} was handled already")
        self.key = key


class OutcomeKind(enum.Enum):
    """What happens to a message; the values are the ``outcome`` label of the metrics."""

    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    REQUEUE = "requeue"
    CANCELLED = "cancelled"
    DUPLICATE = "duplicate"


@attrs.frozen
class Outcome:
    """The decision for one handler run."""

    kind: OutcomeKind
    #: For RETRY: seconds in the retry queue.
    delay: float | None = None
    #: For RETRY and DEAD_LETTER: the error, as it goes into the headers and the log.
    error_type: str = ""
    error_message: str = ""


def error_type(exc: BaseException) -> str:
    """``module.QualName`` of an exception (just the name for builtins)."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _error_message(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[: MAX_ERROR_MESSAGE - 3] + "..."
    return text


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, else the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def decide(error: BaseException | None, *, attempt: int, retry: Retry) -> Outcome:
    """The outcome of a handler run that returned (``error`` None) or raised ``error``.

    Cancellation is not decided here: the dispatcher knows whether its handler was
    cancelled by a shutdown (``CANCELLED``) or by a lost channel (nothing to send).
    """
    if error is None:
        return Outcome(OutcomeKind.ACK)
    error = sole_exception(error)
    if isinstance(error, Duplicate):
        return Outcome(OutcomeKind.DUPLICATE)
    if isinstance(error, Requeue):
        return Outcome(OutcomeKind.REQUEUE)
    kind, message = error_type(error), _error_message(error)
    if isinstance(error, Reject | DecodeError):
        return Outcome(OutcomeKind.DEAD_LETTER, error_type=kind, error_message=message)
    delay = retry.delay_after(attempt)
    if isinstance(error, RetryLater) and error.delay is not None and delay is not None:
        delay = retry.queue_delay(error.delay)  # a bounded set of retry queues
    if delay is None:
        return Outcome(OutcomeKind.DEAD_LETTER, error_type=kind, error_message=message)
    return Outcome(OutcomeKind.RETRY, delay=delay, error_type=kind, error_message=message)
