"""Calling a consumer's handler, through its pipeline (:mod:`._pipeline`): within its
timeout, on the running loop's own primitives, with an exception as the result rather
than raised."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ._native import Native
from .amqp import asyncio_cancel_requested

if TYPE_CHECKING:
    from ._consumer import ConsumerSpec
    from ._message import Message
    from ._pipeline import Pipeline

__all__ = ["call_handler"]


async def call_handler(
    spec: ConsumerSpec,
    msg: Message,
    *,
    pipeline: Pipeline,
    started: float | None = None,
    native: Native | None = None,
) -> Exception | None:
    """Run ``spec``'s handler, through its ``pipeline``, on ``msg`` within its timeout,
    counted from ``started`` (``anyio.current_time()``; default: now). ``native``: the
    running loop's primitives, when the caller has them already.

    Returns the exception the handler raised (a :class:`TimeoutError` when it ran out
    of time), or None when it returned. A cancellation from outside, and exceptions
    that are not an ``Exception`` (``KeyboardInterrupt``, ...), propagate.
    """
    try:
        if spec.timeout is None:
            await pipeline(msg)
            return None
        native = native or Native()
        if started is None:
            started = native.current_time()
        with native.cancel_scope(deadline=started + spec.timeout) as scope:
            await pipeline(msg)
    except Exception as exc:
        return exc
    except BaseException as exc:
        # On asyncio a handler can raise CancelledError of its own accord: it awaited
        # a future or task that something else cancelled. Only a request to cancel
        # this task is a cancellation; anything else (on trio: always) is a failure.
        # (asyncio is looked up, not imported: on trio the App does not load it.)
        asyncio = sys.modules.get("asyncio")
        if (
            asyncio is None
            or not isinstance(exc, asyncio.CancelledError)
            or asyncio_cancel_requested()
        ):
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
        thread = " (its worker thread runs on; what it returns is ignored)"
        return TimeoutError(
            f"the handler exceeded its timeout of {spec.timeout:g} s"
            + (thread if pipeline.blocking else "")
        )
    return None
