"""The waiting helpers: a Flag as a level, as a wake-up one task takes, and as a
broadcast that a waiter cannot miss between its check and its wait."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from strictconsume.amqp import Flag

pytestmark = pytest.mark.anyio


async def test_a_level_is_set_and_cleared_any_number_of_times(anyio_backend: Any) -> None:
    flag = Flag(set=True)
    await flag.wait()  # set: returns at once
    flag.clear()
    assert not flag.is_set()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await flag.wait()
        woken.append(n)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, 1)
        tg.start_soon(waiter, 2)
        await anyio.wait_all_tasks_blocked()
        assert woken == []
        flag.set()
    assert sorted(woken) == [1, 2]
    assert flag.is_set()
    flag.clear()
    flag.clear()  # clearing a clear flag keeps it clear
    with anyio.move_on_after(0.01) as scope:
        await flag.wait()
    assert scope.cancelled_caught


async def test_each_wake_up_is_taken_once(anyio_backend: Any) -> None:
    flag = Flag()
    flag.set()
    flag.set()  # two wake-ups before the taker runs are one
    await flag.take()
    assert not flag.is_set()
    with anyio.move_on_after(0.01) as scope:
        await flag.take()
    assert scope.cancelled_caught


async def test_a_pulse_between_check_and_wait_is_not_missed(anyio_backend: Any) -> None:
    flag = Flag()
    watch = flag.watch()  # taken before checking the condition
    flag.pulse()  # the condition changes before the waiter awaits
    with anyio.fail_after(1):
        await watch()
    assert not flag.is_set()  # a pulse leaves the flag clear for later watches
    later = flag.watch()
    with anyio.move_on_after(0.01) as scope:
        await later()
    assert scope.cancelled_caught


def test_the_flag_shows_its_state() -> None:
    assert repr(Flag()) == "<Flag clear>"
    assert repr(Flag(set=True)) == "<Flag set>"
