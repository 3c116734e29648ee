"""The event loop's own primitives, for the path every delivery takes.

anyio makes one code base run on trio and asyncio, at a price paid per call: on trio
each ``TaskGroup.start_soon`` wraps the task in a handle with a cancel scope and an
event of its own, and each ``anyio.CancelScope()`` or ``anyio.current_time()`` looks
the backend up again. Per delivery that was about a quarter of the consumer's CPU
time. So the dispatcher picks, once per channel, the running loop's own nursery,
cancel scope and clock: trio's when it runs on trio; on asyncio the loop's clock,
anyio's cancel scope class for asyncio (constructed without the backend look-up) and
:class:`AsyncioHandlers`. The semantics are the same; anyio's scopes on trio *are*
trio's scopes, so native and anyio scopes nest freely.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

if TYPE_CHECKING:
    import asyncio

    import trio

__all__ = ["AsyncioHandlers", "HandlerGroup", "Native"]


class HandlerGroup:
    """A task group's two operations the dispatcher uses, as plain attributes."""

    __slots__ = ("cancel", "start_soon")

    def __init__(self, start_soon: Callable[..., object], cancel: Callable[[], None]) -> None:
        self.start_soon = start_soon
        self.cancel = cancel


class AsyncioHandlers:
    """asyncio's handler tasks: a task group with anyio's semantics, without its
    per-task price.

    anyio's ``TaskGroup.start_soon`` gives every task a handle with a cancel scope
    and an event of its own, its task state, and a done callback (a scheduler step
    more per task), after two backend look-ups; at one task per delivery that was the
    largest share of asyncio's cost per message beyond the loop itself. Here each
    task is the loop's own, and runs its function inside one anyio cancel scope
    (anyio's class for asyncio, so shielded scopes inside it keep working as in any
    anyio task), which :meth:`cancel` cancels. As with a task group:

    - :meth:`Native.task_group` does not exit before every task has ended; leaving it
      with an exception, or a cancellation from outside while it waits, cancels them;
    - a task that raises cancels the others and the body of the ``async with``, and
      the group raises what was raised, in a ``BaseExceptionGroup``, as anyio does
      (a cancellation that did not come from the group cancels the same way, and is
      not raised);
    - a task started after :meth:`cancel` starts cancelled.

    A task's scope has no parent scope (the task is not anyio's), so a cancellation
    from outside reaches the tasks through :meth:`watch`, an anyio task of the
    group's own scope (the one the body runs in): anyio cancels it at once, even
    while the body is in a shielded section (a basic.cancel, a requeue), and it
    cancels every task.
    """

    __slots__ = (
        "_body",
        "_cancelled",
        "_closed",
        "_create_task",
        "_done",
        "_errors",
        "_new_scope",
        "_running",
        "_scopes",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        new_scope: Callable[..., anyio.CancelScope],
        body: anyio.CancelScope,
    ) -> None:
        self._create_task = _task_starter(loop)
        self._new_scope = new_scope
        self._body = body
        #: The cancel scope of every task running.
        self._scopes: set[anyio.CancelScope] = set()
        #: Tasks started and not yet ended (a task's scope is entered when it runs).
        self._running = 0
        self._cancelled = False
        self._closed = False
        self._errors: list[BaseException] = []
        #: Set once no task runs, while :meth:`wait` waits for it.
        self._done: anyio.Event | None = None

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: object) -> None:
        if self._closed:
            raise RuntimeError("this channel's handler group has ended; no task can start")
        self._running += 1
        # No reference to the task is kept here: the loop holds it until it runs,
        # its scope (in _scopes) from then on.
        self._create_task(self._run(fn, args))

    async def _run(self, fn: Callable[..., Awaitable[Any]], args: tuple[object, ...]) -> None:
        scope = self._new_scope()
        if self._cancelled:
            scope.cancel()
        scopes = self._scopes
        scopes.add(scope)
        try:
            with scope:
                await fn(*args)
        except BaseException as exc:
            # Its own scope's cancellation ends in the scope. What comes out is an
            # error, or a cancellation from elsewhere (the loop cancelling every task
            # as asyncio.run ends): either way the others and the body are cancelled,
            # and only an error is raised, as anyio's task group does.
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                self._errors.append(exc)
            self.cancel()
            self._body.cancel()
        finally:
            scopes.discard(scope)
            self._running -= 1
            if not self._running and self._done is not None:
                self._done.set()

    def cancel(self) -> None:
        """Cancel every task, those running and those started from now on."""
        self._cancelled = True
        for scope in self._scopes:
            scope.cancel()

    async def watch(self) -> None:
        """Cancel every task once this task is cancelled (the group's scope, or one
        around it, was); run in the group's own anyio task group."""
        try:
            await anyio.sleep_forever()
        finally:
            self.cancel()

    async def wait(self) -> BaseException | None:
        """Wait until no task runs, then take no more.

        Returns the cancellation that came from outside meanwhile, if any (the caller
        raises it once done): it cancels the tasks, and the wait goes on, shielded,
        until they have all ended, however many more come (asyncio's own
        ``task.cancel()`` passes through a shield: it is waited out the same way).
        """
        cancelled: BaseException | None = None
        while self._running:  # a task may start another before the last one ends
            self._done = done = anyio.Event()
            try:
                with self._new_scope(shield=cancelled is not None):
                    await done.wait()
            except BaseException as exc:
                self.cancel()
                if cancelled is None:
                    cancelled = exc
        self._closed = True
        return cancelled

    def raise_errors(self, body_error: BaseException | None) -> None:
        """Raise what the tasks raised, with ``body_error`` (what left the body of the
        ``async with``) first, as anyio's task group does: a cancellation from
        outside alone as it is, anything else in a ``BaseExceptionGroup``."""
        errors = self._errors
        if body_error is not None:
            if not errors and isinstance(body_error, anyio.get_cancelled_exc_class()):
                raise body_error
            if not isinstance(body_error, anyio.get_cancelled_exc_class()):
                errors.insert(0, body_error)
        if errors:
            raise BaseExceptionGroup("errors in the handler tasks of a channel", errors)


class Native:
    """The running loop's clock, cancel scopes and task groups, looked up once."""

    __slots__ = ("_scope_class", "_trio", "current_time")

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
        # anyio.CancelScope() looks the backend up on every construction; its
        # asyncio class constructed directly does not (anyio's classes for a backend
        # construct themselves: see _scope_class).
        self._scope_class = _scope_class() if self._trio is None else None

    def cancel_scope(self, *, deadline: float = math.inf) -> trio.CancelScope | anyio.CancelScope:
        if self._trio is not None:
            scope: trio.CancelScope = self._trio.CancelScope(deadline=deadline)
            return scope
        assert self._scope_class is not None
        return self._scope_class(deadline=deadline)

    @asynccontextmanager
    async def task_group(self) -> AsyncIterator[HandlerGroup]:
        if self._trio is not None:
            async with self._trio.open_nursery() as nursery:
                yield HandlerGroup(nursery.start_soon, nursery.cancel_scope.cancel)
            return
        loop = importlib.import_module("asyncio").get_running_loop()
        new_scope = self._scope_class
        assert new_scope is not None
        body = new_scope()  # a task's error cancels it (and it ends there)
        tasks = AsyncioHandlers(loop, new_scope, body)
        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(tasks.watch)
                try:
                    with body:
                        yield HandlerGroup(tasks.start_soon, tasks.cancel)
                except BaseException as exc:
                    tasks.cancel()
                    error = exc
                cancelled = await tasks.wait()
                if error is None:
                    error = cancelled
                group.cancel_scope.cancel()  # ends the watch
        except BaseException as exc:  # a cancellation from outside, raised again on exit
            if error is None:
                error = exc
        tasks.raise_errors(error)


def _task_starter(
    loop: asyncio.AbstractEventLoop,
) -> Callable[[Coroutine[Any, Any, None]], object]:
    """``loop.create_task``, unless the loop's task factory starts tasks eagerly
    (``asyncio.eager_task_factory``, Python 3.12+): a handler would then run inside
    the connection's reader, which hands it the delivery. As anyio does, such a
    factory is passed by: the task is constructed as a plain one."""
    factory = loop.get_task_factory()
    if factory is None or "eager" not in getattr(factory, "__qualname__", ""):
        return loop.create_task
    task_class = importlib.import_module("asyncio").Task

    def start(coro: Coroutine[Any, Any, None]) -> object:
        return task_class(coro, loop=loop)

    return start


def _scope_class() -> Callable[..., anyio.CancelScope]:
    """anyio's cancel scope class of the running backend, when it can be constructed
    without the backend look-up (its ``__new__`` is its own), else ``anyio.CancelScope``."""
    cls = type(anyio.CancelScope())
    if cls.__new__ is anyio.CancelScope.__new__:
        return anyio.CancelScope
    return cls
