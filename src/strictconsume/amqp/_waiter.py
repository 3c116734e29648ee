"""Waiting on another task: a one-shot slot for a reply that another task (the reader)
delivers, and a flag set and cleared any number of times."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class Waiter(Generic[T]):
    """One pending reply: an event plus the value or error it resolves to.

    Resolving or failing twice keeps the first outcome, so the reader and a failing
    connection can both settle a waiter without coordinating.
    """

    __slots__ = ("_error", "_event", "_value")

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def resolve(self, value: T) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> T:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Flag:
    """A condition tasks wait for, set and cleared any number of times.

    An ``anyio.Event`` is set once and never cleared: clearing one means replacing
    it, and every task that waits must then wait on the right one. This class is
    that replacement, written once:

    - a level (:meth:`set`, :meth:`clear`, :meth:`wait`): "the socket is drained",
      "no handler runs", "the broker does not block us";
    - a wake-up taken by one task (:meth:`take`): "the writer has something to send";
    - a broadcast (:meth:`pulse`, :meth:`watch`): "the channel changed", where a
      waiter takes its :meth:`watch` before it checks the condition, so that a pulse
      between the check and the wait is not missed.
    """

    __slots__ = ("_event",)

    def __init__(self, *, set: bool = False) -> None:
        self._event = anyio.Event()
        if set:
            self._event.set()

    def __repr__(self) -> str:
        return f"<Flag {'set' if self._event.is_set() else 'clear'}>"

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        """Wake every task waiting, and let later waits return at once."""
        self._event.set()

    def clear(self) -> None:
        """Make later waits wait again (tasks already woken stay woken)."""
        if self._event.is_set():
            self._event = anyio.Event()

    async def wait(self) -> None:
        """Return once the flag is set."""
        await self._event.wait()

    async def take(self) -> None:
        """Wait until the flag is set, then clear it: one task takes each wake-up."""
        await self._event.wait()
        self._event = anyio.Event()

    def pulse(self) -> None:
        """Wake every task waiting on a :meth:`watch` taken before now; later
        watches wait for the next pulse."""
        event, self._event = self._event, anyio.Event()
        event.set()

    def watch(self) -> Callable[[], Awaitable[object]]:
        """A wait for the next :meth:`pulse` (or :meth:`set`) after now: take it
        before checking the condition, await it after."""
        return self._event.wait
