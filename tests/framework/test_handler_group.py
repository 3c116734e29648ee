"""The channel's handler tasks (``Native.task_group``): a trio nursery on trio, the
loop's own tasks on asyncio (:class:`AsyncioHandlers`). The same tests run on both, so
that the asyncio group is held to a nursery's semantics: it waits for its tasks,
``cancel`` reaches every task (and those started after it) but not a shielded scope
inside one, a failing task cancels the rest and the body and is raised in a group,
a cancellation from outside cancels the tasks and is not turned into an error, and no
task starts once the group has ended.
"""

from __future__ import annotations

import anyio
import pytest

from strictconsume._native import HandlerGroup, Native

pytestmark = pytest.mark.anyio


async def ends_later(log: list[str], entry: str) -> None:
    """Sleep 20 ms; then note ``entry`` in ``log``."""
    await anyio.sleep(0.02)
    log.append(entry)


async def until_cancelled(log: list[str], entry: str) -> None:
    """Sleep until cancelled; then note ``entry`` in ``log``."""
    try:
        await anyio.sleep_forever()
    finally:
        log.append(entry)


async def test_the_group_waits_for_its_tasks() -> None:
    done: list[int] = []

    async def task(n: int) -> None:
        await anyio.sleep(0.01 * n)
        done.append(n)

    async with Native().task_group() as group:
        for n in (3, 1, 2):
            group.start_soon(task, n)
        assert done == []
    assert sorted(done) == [1, 2, 3]


async def test_cancel_reaches_running_tasks_and_later_ones() -> None:
    events: list[str] = []

    async def forever(name: str) -> None:
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            events.append(f"{name} cancelled")
            raise

    with anyio.fail_after(5):
        async with Native().task_group() as group:
            group.start_soon(forever, "first")
            await anyio.sleep(0.01)
            group.cancel()
            group.start_soon(forever, "later")
    assert events == ["first cancelled", "later cancelled"]


async def test_cancel_waits_for_a_shielded_scope_inside_a_task() -> None:
    events: list[str] = []

    async def settles() -> None:
        with anyio.CancelScope(shield=True):
            events.append("shielded")
            await anyio.sleep(0.05)
            events.append("settled")
        events.append("after the shield")  # not reached: cancelled at the next await
        await anyio.sleep(1)

    with anyio.fail_after(5):
        async with Native().task_group() as group:
            group.start_soon(settles)
            await anyio.sleep(0.01)
            group.cancel()
    assert events == ["shielded", "settled", "after the shield"]


async def test_a_failing_task_cancels_the_rest_and_the_body_and_is_raised() -> None:
    events: list[str] = []

    async def fails() -> None:
        await anyio.sleep(0.01)
        raise ValueError("boom")

    body_waited = anyio.move_on_after(5)

    async def run() -> None:
        async with Native().task_group() as group:
            group.start_soon(until_cancelled, events, "task cancelled")
            group.start_soon(fails)
            with body_waited:
                try:
                    await anyio.sleep_forever()
                finally:
                    events.append("body cancelled")

    with pytest.raises(BaseExceptionGroup) as caught:
        await run()
    assert not body_waited.cancelled_caught  # cancelled by the failure, not the 5 s
    assert [type(exc) for exc in caught.value.exceptions] == [ValueError]
    assert str(caught.value.exceptions[0]) == "boom"
    assert sorted(events) == ["body cancelled", "task cancelled"]


async def test_an_error_in_the_body_cancels_the_tasks_and_is_raised_in_a_group() -> None:
    cancelled: list[str] = []

    async def run() -> None:
        async with Native().task_group() as group:
            group.start_soon(until_cancelled, cancelled, "task")
            await anyio.sleep(0.01)
            raise KeyError("in the body")

    with anyio.fail_after(5), pytest.raises(BaseExceptionGroup) as caught:
        await run()
    assert [type(exc) for exc in caught.value.exceptions] == [KeyError]
    assert cancelled == ["task"]


@pytest.mark.parametrize("names", [("a", "b"), ()], ids=["two-tasks", "no-task"])
async def test_a_cancellation_from_outside_cancels_the_tasks_and_stays_one(
    names: tuple[str, ...],
) -> None:
    cancelled: list[str] = []
    reached: list[str] = []
    with anyio.CancelScope() as outer:
        async with Native().task_group() as group:
            for name in names:
                group.start_soon(until_cancelled, cancelled, name)
            await anyio.sleep(0.01)
            outer.cancel()
            await anyio.sleep_forever()
        reached.append("after the group")  # the cancellation must go on up
    assert outer.cancelled_caught
    assert reached == []
    assert sorted(cancelled) == list(names)


async def test_a_cancellation_from_outside_while_the_group_waits_for_its_tasks() -> None:
    cancelled: list[str] = []
    reached: list[str] = []
    with anyio.move_on_after(0.05) as outer:
        async with Native().task_group() as group:
            group.start_soon(until_cancelled, cancelled, "task")
        # the body ended at once; the group waits for the task until the deadline
        reached.append("after the group")
    assert outer.cancelled_caught
    assert reached == []
    assert cancelled == ["task"]


async def test_no_task_starts_once_the_group_has_ended() -> None:
    kept: list[HandlerGroup] = []
    async with Native().task_group() as group:
        kept.append(group)
    with pytest.raises(RuntimeError):
        kept[0].start_soon(anyio.sleep, 0)


async def test_the_scopes_of_native_are_plain_anyio_scopes() -> None:
    """A scope from ``Native.cancel_scope`` is cancelled by its deadline and nests
    with anyio's own, on both backends."""
    native = Native()
    with anyio.CancelScope() as outer:
        with native.cancel_scope(deadline=native.current_time() + 0.01) as inner:
            await anyio.sleep(5)
    assert inner.cancelled_caught
    assert not outer.cancelled_caught


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_cancelled_by_asyncio_itself_cancels_the_rest_quietly() -> None:
    """As asyncio.run ends it cancels every task with ``task.cancel()``, not through
    the group: the group then cancels the rest and the body, raising nothing more
    (an ``asyncio.CancelledError`` in a group would be logged as a crash)."""
    import asyncio

    events: list[str] = []

    async def cancelled_natively() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)

    with anyio.fail_after(5):
        async with Native().task_group() as group:
            group.start_soon(until_cancelled, events, "task cancelled")
            group.start_soon(cancelled_natively)
            try:
                await anyio.sleep_forever()
            finally:
                events.append("body cancelled")
    assert sorted(events) == ["body cancelled", "task cancelled"]


async def test_an_error_while_cancelled_from_outside_is_raised_not_lost() -> None:
    """A task that fails as it is being cancelled (a bug in a settlement): the
    cancellation from outside does not swallow the error."""

    async def fails_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            raise ValueError("settlement bug")

    async def run() -> None:
        with anyio.CancelScope() as outer:
            async with Native().task_group() as group:
                group.start_soon(fails_when_cancelled)
                await anyio.sleep(0.01)
                outer.cancel()
                await anyio.sleep_forever()

    with anyio.fail_after(5), pytest.raises(BaseExceptionGroup) as caught:
        await run()
    assert [str(exc) for exc in caught.value.exceptions] == ["settlement bug"]


async def test_a_cancellation_from_outside_reaches_the_tasks_while_the_body_is_shielded() -> None:
    """The body in a shielded section (a basic.cancel, a requeue) when the App is
    cancelled from outside: the tasks are cancelled at once, not once it is over."""
    events: list[str] = []
    native = Native()
    with anyio.CancelScope() as outer:
        async with native.task_group() as group:
            group.start_soon(until_cancelled, events, "task cancelled")
            await anyio.sleep(0.01)
            with anyio.CancelScope(shield=True):
                outer.cancel()
                await anyio.sleep(0.2)
                events.append("shielded section over")
            await anyio.sleep_forever()
    assert events == ["task cancelled", "shielded section over"]


async def test_a_task_started_while_the_group_waits_is_waited_for() -> None:
    order: list[str] = []

    async def starts_another(group: HandlerGroup) -> None:
        await anyio.sleep(0.01)
        group.start_soon(ends_later, order, "late ended")
        order.append("first ended")

    async with Native().task_group() as group:
        group.start_soon(starts_another, group)
    order.append("group exited")
    assert order == ["first ended", "late ended", "group exited"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_wait_holds_against_asyncio_cancelling_the_host_again() -> None:
    """``task.cancel()`` passes through anyio's shields: the group still waits for
    its tasks, however many times the host is cancelled natively."""
    import asyncio

    events: list[str] = []

    async def settles() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)
                events.append("task ended")

    async def host() -> None:
        async with Native().task_group() as group:
            group.start_soon(settles)
            await anyio.sleep_forever()
        events.append("not reached")

    task = asyncio.ensure_future(host())
    for _ in range(3):
        await asyncio.sleep(0.01)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    events.append("group exited")
    assert events == ["task ended", "group exited"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_task_started_between_the_last_end_and_the_wake_up_is_waited_for() -> None:
    """The last task ends, and before the waiting body resumes a callback (the
    connection's reader) starts another: the group waits for that one too."""
    import asyncio

    order: list[str] = []

    async def last(group: HandlerGroup) -> None:
        await anyio.sleep(0.01)
        asyncio.get_running_loop().call_soon(group.start_soon, ends_later, order, "late ended")

    async with Native().task_group() as group:
        group.start_soon(last, group)
    order.append("group exited")
    assert order == ["late ended", "group exited"]
