"""The event loop's own primitives, for the path every delivery takes.

anyio makes one code base run on trio and asyncio, at a price paid per call: on trio
each ``TaskGroup.start_soon`` wraps the task in a handle with a cancel scope and an
event of its own, and each ``anyio.CancelScope()`` or ``anyio.current_time()`` looks
the backend up again. Per delivery that was about a quarter of the consumer's CPU
time. So the dispatcher picks, once per channel, the running loop's own nursery,
cancel scope and clock: trio's when it runs on trio, anyio's (which are asyncio's
own) otherwise. The semantics are the same; anyio's scopes on trio *are* trio's
scopes, so native and anyio scopes nest freely.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import sniffio

if TYPE_CHECKING:
    import trio

__all__ = ["HandlerGroup", "Native"]


class HandlerGroup:
    """A task group's two operations the dispatcher uses, as plain attributes."""

    __slots__ = ("cancel", "start_soon")

    def __init__(self, start_soon: Callable[..., object], cancel: Callable[[], None]) -> None:
        self.start_soon = start_soon
        self.cancel = cancel


class Native:
    """The running loop's clock, cancel scopes and task groups, looked up once."""

    __slots__ = ("_trio", "current_time")

    def __init__(self) -> None:
        # Imported here: an App on asyncio never loads trio (about 5 MB of RSS).
        on_trio = sniffio.current_async_library() == "trio"
        self._trio = importlib.import_module("trio") if on_trio else None
        # The loop's own clock (what anyio.current_time() returns, without its
        # backend lookup, which on asyncio under Python 3.11 costs a getpid()).
        self.current_time: Callable[[], float] = (
            self._trio.current_time
            if self._trio is not None
            else importlib.import_module("asyncio").get_running_loop().time
        )

    def cancel_scope(self, *, deadline: float = math.inf) -> trio.CancelScope | anyio.CancelScope:
        if self._trio is not None:
            scope: trio.CancelScope = self._trio.CancelScope(deadline=deadline)
            return scope
        return anyio.CancelScope(deadline=deadline)

    @asynccontextmanager
    async def task_group(self) -> AsyncIterator[HandlerGroup]:
        if self._trio is not None:
            async with self._trio.open_nursery() as nursery:
                yield HandlerGroup(nursery.start_soon, nursery.cancel_scope.cancel)
        else:
            async with anyio.create_task_group() as tg:
                yield HandlerGroup(tg.start_soon, tg.cancel_scope.cancel)
