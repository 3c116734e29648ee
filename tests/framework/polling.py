"""Waiting on the broker in async tests: poll a condition with a deadline, and the
depths of a consumer's queues (main, ``.dlq``, ``.retry.<ms>``) read with the oracle."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from ..amqp.oracle import Oracle

#: How long any awaited condition may take before the test fails.
DEADLINE = 10.0


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, within: float = DEADLINE, what: str = ""
) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""
    try:
        with anyio.fail_after(within):
            while True:
                if await predicate():
                    return
                await anyio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {within} s: {what}") from None


async def wait_for_count(oracle: Oracle, queue: str, count: int) -> None:
    async def holds() -> bool:
        return await oracle.message_count(queue) == count

    await wait_until(holds, what=f"{count} message(s) in {queue!r}")


async def depths(oracle: Oracle, queue: str, retry_ms: tuple[int, ...] = ()) -> dict[str, int]:
    """The ready count of ``queue``, its dead-letter queue and the given retry queues."""
    result = {
        queue: await oracle.message_count(queue),
        f"{queue}.dlq": await oracle.message_count(f"{queue}.dlq"),
    }
    for ms in retry_ms:
        result[f"{queue}.retry.{ms}"] = await oracle.message_count(f"{queue}.retry.{ms}")
    return result


def empty(queue: str, retry_ms: tuple[int, ...] = ()) -> dict[str, int]:
    return {queue: 0, f"{queue}.dlq": 0, **{f"{queue}.retry.{ms}": 0 for ms in retry_ms}}
