"""Calling a consumer's handler, through its pipeline (:mod:`._pipeline`): within its
timeout, on the running loop's own primitives, with an exception as the result rather
than raised.

One consumer's handlers share one timeout, so their deadlines come due in the order
they started. Rather than a cancel scope with a deadline per call (a registration and
a removal in trio's deadline heap, a timer handle on asyncio, per message), the
dispatcher gives each channel one :class:`TimeoutWatcher`: a task that keeps the
calls' (deadline, scope) pairs in a deque in deadline order, sleeps until the first
comes due and cancels the scopes whose deadline passed. A call then costs a cancel
scope without a deadline and a deque append. Without a watcher (``testing.run_handler``)
the call gets a scope with its deadline, as before.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections import deque
from typing import TYPE_CHECKING

import anyio

from ._native import Native
from .amqp import asyncio_cancel_requested

if TYPE_CHECKING:
    import trio

    from ._consumer import ConsumerSpec
    from ._message import Message
    from ._pipeline import Pipeline

__all__ = ["TimeoutWatcher", "call_handler"]

#: Finished calls a watcher's deque may hold beyond twice the running ones before it
#: drops them (they wait behind a call that runs long; see :meth:`TimeoutWatcher.done`).
SLACK = 32


class Watched:
    """One handler call under a :class:`TimeoutWatcher`: its deadline and its scope
    (None once the call finished or was cancelled)."""

    __slots__ = ("deadline", "scope")

    def __init__(self, deadline: float, scope: trio.CancelScope | anyio.CancelScope) -> None:
        self.deadline = deadline
        self.scope: trio.CancelScope | anyio.CancelScope | None = scope


def _deadline(watched: Watched) -> float:
    return watched.deadline


class TimeoutWatcher:
    """Cancels the handler calls of one channel whose deadline passed: one task and a
    deque instead of a deadline per call.

    :meth:`watch` registers a call's scope, :meth:`done` takes it back when the call
    ends (it is never cancelled afterwards), :meth:`run` is the task. The deque is in
    deadline order: a call that starts its timeout late (the idempotency guard starts
    it once the key is claimed) and so comes due before calls already watched is
    inserted in its place, and wakes the watcher when it comes first. Finished calls
    are dropped from the front at once, and from anywhere once they outnumber the
    running ones (plus :data:`SLACK`), so the deque stays in proportion to the calls
    running, not to how many finished behind a slow one.
    """

    __slots__ = ("_entries", "_live", "_native", "_sleep", "_wake_at")

    def __init__(self, native: Native) -> None:
        self._native = native
        self._entries: deque[Watched] = deque()
        #: Entries in the deque whose call still runs.
        self._live = 0
        #: The watcher's sleep (None while it is not sleeping) and when it ends.
        self._sleep: trio.CancelScope | anyio.CancelScope | None = None
        self._wake_at = math.inf

    def __len__(self) -> int:
        """How many calls the deque holds (running or finished, not yet dropped)."""
        return len(self._entries)

    def watch(self, deadline: float, scope: trio.CancelScope | anyio.CancelScope) -> Watched:
        """Cancel ``scope`` at ``deadline`` unless :meth:`done` was called first."""
        watched = Watched(deadline, scope)
        entries = self._entries
        if not entries or deadline >= entries[-1].deadline:
            entries.append(watched)
        else:  # started its timeout after calls that come due later
            bisect.insort_right(entries, watched, key=_deadline)
        self._live += 1
        if deadline < self._wake_at:  # the first to come due: wake earlier
            self._wake_at = deadline
            if self._sleep is not None:
                self._sleep.deadline = deadline
        return watched

    def done(self, watched: Watched) -> None:
        """The call ended: never cancel its scope."""
        if watched.scope is None:
            return  # cancelled by the watcher, already out of the deque
        watched.scope = None
        self._live -= 1
        entries = self._entries
        while entries and entries[0].scope is None:
            entries.popleft()
        if len(entries) > 2 * self._live + SLACK:
            kept = [entry for entry in entries if entry.scope is not None]
            entries.clear()
            entries.extend(kept)

    async def run(self) -> None:
        """Cancel each call whose deadline passed, sleeping until the next one."""
        native = self._native
        entries = self._entries
        while True:
            now = native.current_time()
            while entries and entries[0].deadline <= now:
                watched = entries.popleft()
                scope = watched.scope
                if scope is not None:
                    watched.scope = None
                    self._live -= 1
                    scope.cancel()
            self._wake_at = entries[0].deadline if entries else math.inf
            with native.cancel_scope(deadline=self._wake_at) as sleep:
                self._sleep = sleep
                try:
                    await anyio.sleep_forever()
                finally:
                    self._sleep = None


async def call_handler(
    spec: ConsumerSpec,
    msg: Message,
    *,
    pipeline: Pipeline,
    started: float | None = None,
    native: Native | None = None,
    timeouts: TimeoutWatcher | None = None,
) -> Exception | None:
    """Run ``spec``'s handler, through its ``pipeline``, on ``msg`` within its timeout,
    counted from ``started`` (``anyio.current_time()``; default: now). ``native``: the
    running loop's primitives, when the caller has them already; ``timeouts``: the
    channel's watcher, which then enforces the timeout (else a deadline of the call's
    own scope does).

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
        if timeouts is None:
            with native.cancel_scope(deadline=started + spec.timeout) as scope:
                await pipeline(msg)
        else:
            scope = native.cancel_scope()
            watched = timeouts.watch(started + spec.timeout, scope)
            try:
                with scope:
                    await pipeline(msg)
            finally:
                timeouts.done(watched)
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
