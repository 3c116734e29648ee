"""The App's graceful stop, shared by its dispatchers (design section 5): intake stops
everywhere at once, then handlers get the grace period to finish."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import anyio
import attrs

__all__ = ["Shutdown"]


@attrs.define(eq=False)
class Shutdown:
    """The App's graceful stop, shared by its dispatchers (design section 5).

    :meth:`request` stops intake everywhere and starts the grace period; a second
    request (:meth:`force`) ends the grace period at once.
    """

    #: Seconds handlers get to finish when intake stops (the App's setting).
    grace_period: float = 30.0
    requested: bool = False
    forced: bool = False
    #: When the grace period ends (anyio.current_time() clock); inf before a request.
    deadline: float = math.inf
    _intakes: set[anyio.CancelScope] = attrs.Factory(set)
    _graces: set[anyio.CancelScope] = attrs.Factory(set)
    _event: anyio.Event = attrs.Factory(anyio.Event)

    def request(self, grace_period: float) -> None:
        if self.requested:
            self.force()
            return
        self.requested = True
        self.deadline = anyio.current_time() + grace_period
        for scope in self._graces:
            scope.deadline = self.deadline
        for scope in list(self._intakes):
            scope.cancel()
        self._event.set()

    def force(self) -> None:
        self.forced = True
        self.deadline = -math.inf
        for scope in list(self._graces):
            scope.cancel()

    async def wait(self) -> None:
        await self._event.wait()

    def intake_scope(self) -> anyio.CancelScope:
        """A cancel scope for intake; cancelled at once if a stop was requested."""
        scope = anyio.CancelScope()
        if self.requested:
            scope.cancel()
        self._intakes.add(scope)
        return scope

    def grace_scope(self) -> anyio.CancelScope:
        """A cancel scope that ends with the grace period."""
        scope = anyio.CancelScope(deadline=self.deadline)
        if self.forced:
            scope.cancel()
        self._graces.add(scope)
        return scope

    @contextlib.contextmanager
    def intake(self) -> Iterator[anyio.CancelScope]:
        """:meth:`intake_scope`, entered, and forgotten on the way out however the
        block ends (a connection lost while it waits cancels it from outside)."""
        scope = self.intake_scope()
        try:
            with scope:
                yield scope
        finally:
            self.discard(scope)

    def discard(self, scope: anyio.CancelScope) -> None:
        self._intakes.discard(scope)
        self._graces.discard(scope)
