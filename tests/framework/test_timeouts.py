"""The handlers' timeout: one :class:`TimeoutWatcher` per channel instead of a deadline
per call (``_handler.py``).

The watcher's own behaviour (order, a late start inserted in its place, a finished
call never cancelled, the deque kept in proportion to the running calls) on trio's
autojump clock, with exact virtual times, and in order on asyncio; ``call_handler``
with a watcher gives the same outcomes as with a deadline of its own.
"""

from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
import trio.testing

import strictconsume as sc
from strictconsume._handler import SLACK, TimeoutWatcher, call_handler
from strictconsume._native import Native
from strictconsume._pipeline import build_pipeline
from strictconsume.testing import _make_message, _spec_of

pytestmark = pytest.mark.anyio


def autojump_and_asyncio() -> pytest.MarkDecorator:
    """trio with a MockClock that jumps whenever every task is blocked, and asyncio
    (real time: the tests there assert order, not exact times)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend",
        [
            pytest.param(("trio", {"clock": clock}), id="trio-autojump"),
            pytest.param("asyncio", id="asyncio"),
        ],
    )


def on_autojump(anyio_backend: Any) -> bool:
    return isinstance(anyio_backend, tuple)


#: One unit of time: a second on the autojump clock, 20 ms on asyncio's real clock.
def unit(anyio_backend: Any) -> float:
    return 1.0 if on_autojump(anyio_backend) else 0.02


async def held(
    watcher: TimeoutWatcher,
    native: Native,
    deadline: float,
    name: str,
    cancelled: list[tuple[str, float]],
    finish_after: float = math.inf,
) -> None:
    """A call under ``watcher``: sleeps ``finish_after`` (forever by default) in a
    watched scope; records when it was cancelled."""
    scope = native.cancel_scope()
    watched = watcher.watch(deadline, scope)
    try:
        with scope:
            await anyio.sleep(finish_after)
    finally:
        watcher.done(watched)
    if scope.cancel_called:
        cancelled.append((name, native.current_time()))


@autojump_and_asyncio()
async def test_deadlines_come_due_in_order(anyio_backend: Any) -> None:
    u = unit(anyio_backend)
    native = Native()
    watcher = TimeoutWatcher(native)
    cancelled: list[tuple[str, float]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        t0 = native.current_time()
        for i, name in enumerate("abc"):
            tg.start_soon(held, watcher, native, t0 + (i + 1) * u, name, cancelled)
        await anyio.sleep(4 * u)
        tg.cancel_scope.cancel()
    assert [name for name, _ in cancelled] == ["a", "b", "c"]
    if on_autojump(anyio_backend):
        assert [when - t0 for _, when in cancelled] == [1.0, 2.0, 3.0]
    assert len(watcher) == 0


@autojump_and_asyncio()
async def test_a_call_that_comes_due_before_those_watched_is_cancelled_on_time(
    anyio_backend: Any,
) -> None:
    """The idempotency guard starts a call's timeout once its key is claimed, so a
    later call can come due first: it goes in its place, and wakes the watcher when it
    is the first (the watcher already sleeps until a later deadline)."""
    u = unit(anyio_backend)
    native = Native()
    watcher = TimeoutWatcher(native)
    cancelled: list[tuple[str, float]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        t0 = native.current_time()
        tg.start_soon(held, watcher, native, t0 + 5 * u, "five", cancelled)
        await anyio.sleep(0.5 * u)  # the watcher sleeps until five
        tg.start_soon(held, watcher, native, t0 + 2 * u, "two", cancelled)  # first now
        tg.start_soon(held, watcher, native, t0 + 3 * u, "three", cancelled)  # between
        tg.start_soon(held, watcher, native, t0 + 1 * u, "one", cancelled)  # first again
        await anyio.sleep(6 * u)
        tg.cancel_scope.cancel()
    assert [name for name, _ in cancelled] == ["one", "two", "three", "five"]
    if on_autojump(anyio_backend):
        assert [when - t0 for _, when in cancelled] == [1.0, 2.0, 3.0, 5.0]


@autojump_and_asyncio()
async def test_a_finished_call_is_never_cancelled_later(anyio_backend: Any) -> None:
    u = unit(anyio_backend)
    native = Native()
    watcher = TimeoutWatcher(native)
    cancelled: list[tuple[str, float]] = []
    scopes: list[Any] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        t0 = native.current_time()
        # The first to come due finishes before its deadline; the watcher, asleep
        # until then, wakes to find nothing to cancel.
        tg.start_soon(held, watcher, native, t0 + 2 * u, "early", cancelled, 1 * u)
        # One in the middle of the deque finishes while an older call still runs.
        tg.start_soon(held, watcher, native, t0 + 3 * u, "slow", cancelled)
        tg.start_soon(held, watcher, native, t0 + 4 * u, "middle", cancelled, 1 * u)
        # A scope whose call ended without entering it: done() at once.
        scope = native.cancel_scope()
        scopes.append(scope)
        watcher.done(watcher.watch(t0 + 1 * u, scope))
        await anyio.sleep(10 * u)
        tg.cancel_scope.cancel()
    assert [name for name, _ in cancelled] == ["slow"]
    if on_autojump(anyio_backend):
        assert cancelled[0][1] - t0 == 3.0
    assert not scopes[0].cancel_called
    assert len(watcher) == 0


@pytest.mark.parametrize(
    "anyio_backend",
    [pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}), id="trio")],
)
async def test_many_calls_share_one_watcher_and_its_deque_stays_bounded(
    anyio_backend: Any,
) -> None:
    """2,000 calls through ``call_handler`` with one watcher, 20 at a time, each
    10 s of timeout: one call in 100 hangs and times out 10 s after it started, the
    others return after 0.1 s and are never cancelled. A hanging call at the front
    keeps the calls that finished behind it in the deque; those are dropped once they
    outnumber the running ones, so the deque never holds more than twice the calls
    that can run at once plus SLACK."""
    native = Native()
    watcher = TimeoutWatcher(native)

    async def handler(msg: sc.Message) -> None:
        if msg.delivery_tag % 100 == 0:
            await anyio.sleep_forever()
        await anyio.sleep(0.1)

    spec = _spec_of(handler, "orders", 10.0, None)
    pipeline = build_pipeline(spec)
    results: dict[int, tuple[float, float, Exception | None]] = {}
    largest = 0
    limit = anyio.Semaphore(20)

    async def one(tag: int) -> None:
        nonlocal largest
        msg = _make_message(spec, b"x", delivery_tag=tag)
        started = native.current_time()
        try:
            error = await call_handler(
                spec, msg, pipeline=pipeline, started=started, native=native, timeouts=watcher
            )
        finally:
            limit.release()
        results[tag] = (started, native.current_time(), error)
        largest = max(largest, len(watcher))

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        async with anyio.create_task_group() as calls:
            for tag in range(1, 2001):
                await limit.acquire()
                calls.start_soon(one, tag)
        tg.cancel_scope.cancel()

    timed_out = sorted(tag for tag, (_, _, error) in results.items() if error is not None)
    assert timed_out == list(range(100, 2001, 100))
    for tag in timed_out:
        started, ended, error = results[tag]
        assert ended - started == pytest.approx(10.0)
        assert isinstance(error, TimeoutError)
        assert str(error) == "the handler exceeded its timeout of 10 s"
    for tag, (started, ended, error) in results.items():
        if tag % 100:
            assert error is None
            assert ended - started == pytest.approx(0.1)
    # The finished calls behind a hanging one were held, at most twice the 20
    # running plus SLACK, and none is left.
    assert 2 * SLACK < largest <= 2 * 20 + SLACK
    assert len(watcher) == 0


@autojump_and_asyncio()
async def test_a_handler_that_swallows_the_cancellation_still_timed_out(
    anyio_backend: Any,
) -> None:
    u = unit(anyio_backend)

    async def handler(msg: sc.Message) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            return  # swallowed: it still ran out of time

    spec = _spec_of(handler, "orders", 2 * u, None)
    native = Native()
    watcher = TimeoutWatcher(native)
    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        t0 = native.current_time()
        error = await call_handler(
            spec,
            _make_message(spec, b"x"),
            pipeline=build_pipeline(spec),
            native=native,
            timeouts=watcher,
        )
        elapsed = native.current_time() - t0
        tg.cancel_scope.cancel()
    assert isinstance(error, TimeoutError)
    assert str(error) == f"the handler exceeded its timeout of {2 * u:g} s"
    if on_autojump(anyio_backend):
        assert elapsed == 2.0
    else:
        assert elapsed >= 2 * u


@autojump_and_asyncio()
async def test_a_cancellation_from_outside_propagates_and_the_call_leaves_the_watcher(
    anyio_backend: Any,
) -> None:
    """A shutdown past its grace period cancels the handler from outside: that is not
    a timeout (the cancellation propagates, the dispatcher requeues), and the call's
    entry is taken back, so the watcher never cancels it later."""
    u = unit(anyio_backend)

    async def handler(msg: sc.Message) -> None:
        await anyio.sleep_forever()

    spec = _spec_of(handler, "orders", 5 * u, None)
    native = Native()
    watcher = TimeoutWatcher(native)
    outcome: list[str] = []

    async def call() -> None:
        try:
            await call_handler(
                spec,
                _make_message(spec, b"x"),
                pipeline=build_pipeline(spec),
                native=native,
                timeouts=watcher,
            )
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        outcome.append("returned")

    async with anyio.create_task_group() as tg:
        tg.start_soon(watcher.run)
        with anyio.CancelScope() as outside:
            async with anyio.create_task_group() as calls:
                calls.start_soon(call)
                await anyio.sleep(1 * u)
                assert len(watcher) == 1
                outside.cancel()
        assert len(watcher) == 0
        await anyio.sleep(6 * u)  # past the call's deadline: nothing left to cancel
        tg.cancel_scope.cancel()
    assert outcome == ["cancelled"]
