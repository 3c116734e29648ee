"""Middleware: code that wraps every call of a handler.

A middleware is one of two things:

- an ``async def mw(msg, call_next)``: it calls ``await call_next(msg)`` to run the
  rest of the chain (and the handler) and gets the handler's return value, or the
  exception it raised; it may return another value or raise another exception;
- an async context manager factory, called with the message: ``async with
  mw(msg):`` wraps the call, and its ``__aexit__`` sees the exception (a function
  decorated with :func:`contextlib.asynccontextmanager`, or a class taking the
  message whose instances are async context managers).

Either sees the message before the handler and the handler's outcome after it (a
return is an ack; each exception decides the outcome by the table in
:mod:`._outcome`), so it can time the call, enrich logs, veto a message (raise
``Reject``) or translate exceptions (``raise RetryLater(...) from exc``). Middleware
runs inside the handler's timeout, around the decoding of a typed body (so it sees
an :class:`InvalidBody` too) and, for a plain ``def`` handler, around its worker
thread, in the event loop.

The App's middleware wraps the consumer's, which wraps the handler: the first given
is the outermost.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._message import Message

__all__ = ["CallNext", "Middleware", "check_middleware", "compose"]

#: The rest of the chain: the next middleware, or the handler.
CallNext = Callable[["Message"], Awaitable[Any]]
Middleware = (
    Callable[["Message", CallNext], Awaitable[Any]]
    | Callable[["Message"], AbstractAsyncContextManager[Any]]
)


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    if not callable(fn) or inspect.isfunction(fn):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)  # an instance's async __call__


def _is_context_manager_factory(mw: object) -> bool:
    if isinstance(mw, type):
        return hasattr(mw, "__aenter__") and hasattr(mw, "__aexit__")
    wrapped = getattr(mw, "__wrapped__", None)  # @asynccontextmanager
    return wrapped is not None and inspect.isasyncgenfunction(wrapped)


def check_middleware(mw: object) -> bool:
    """Whether ``mw`` takes ``call_next`` (True) or is a context manager factory (False).

    Raises:
        TypeError: ``mw`` is neither.
    """
    if _is_async(mw):
        try:
            inspect.signature(mw).bind(None, None)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"middleware {mw!r} must take two arguments, (msg, call_next)"
            ) from None
        except ValueError:  # no signature to inspect (a builtin): trust it
            pass
        return True
    if _is_context_manager_factory(mw):
        return False
    raise TypeError(
        f"middleware must be an `async def mw(msg, call_next)` or an async context manager "
        f"factory (an @asynccontextmanager function, or a class with __aenter__/__aexit__) "
        f"taking the message, not {mw!r}"
    )


def _wrap(mw: Any, inner: CallNext) -> CallNext:
    if check_middleware(mw):

        async def call_next_style(msg: Message) -> Any:
            return await mw(msg, inner)

        return call_next_style

    async def context_manager_style(msg: Message) -> Any:
        async with mw(msg):
            return await inner(msg)

    return context_manager_style


def compose(middleware: Sequence[Middleware], handler: CallNext) -> CallNext:
    """``handler`` wrapped in ``middleware``, the first one outermost."""
    call = handler
    for mw in reversed(middleware):
        call = _wrap(mw, call)
    return call
