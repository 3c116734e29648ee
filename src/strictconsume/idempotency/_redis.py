"""The Redis idempotency store (redis-py, the ``redis`` extra): fast, for consumers on
several machines, with expiry done by Redis itself.

A claim is ``SET key owner NX PX lease``; a key handled is ``SET key "done" PX ttl``
(only by the claim's owner, or over nothing); a release deletes the key only while
it is still the owner's claim (a Lua script, atomic on the server). Redis writes
are durable only as far as its persistence is configured (``appendonly yes`` with
``appendfsync always`` for none lost in a crash of the server); there is no
transaction shared with the handler's own database.

redis-py's blocking client runs in worker threads (its asyncio client needs
asyncio); its connection pool is thread-safe."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread
import redis

from ..amqp import redact_url
from ._core import Claim, StoreError

__all__ = ["RedisStore"]

T = TypeVar("T")

_DONE = "done"

_COMPLETE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  return redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
end
return false
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Handled keys in Redis, each under ``prefix + key`` with its own expiry.

    Args:
        url: ``redis://[:password@]host:port/db``.
        prefix: Put before every key (one namespace per application).
        socket_timeout: Seconds a command may take before it fails.
        max_threads: Worker threads (and connections) at most, for this store.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "strictconsume:idempotency:",
        socket_timeout: float = 5.0,
        max_threads: int = 8,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.name = f"redis:{redact_url(url)}"
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=True,
            max_connections=max_threads,
        )
        self._complete = self._client.register_script(_COMPLETE)
        self._release = self._client.register_script(_RELEASE)
        self._limiter = anyio.CapacityLimiter(max_threads)

    def __repr__(self) -> str:
        return f"<RedisStore {self.name}>"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(fn, *args), limiter=self._limiter
            )
        except redis.RedisError as exc:
            raise StoreError(self.name, f"{type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        await self._run(self._client.ping)

    async def aclose(self) -> None:
        await self._run(self._client.close)

    async def claim(self, key: str, owner: str, lease: float) -> Claim:
        name = self.prefix + key
        while True:
            if await self._run(
                functools.partial(self._client.set, name, owner, px=int(lease * 1000), nx=True)
            ):
                return Claim.CLAIMED
            value = await self._run(self._client.get, name)
            if value is not None:
                return Claim.DONE if value == _DONE else Claim.BUSY
            # expired between the two commands: claim it again

    async def complete(self, key: str, owner: str, ttl: float) -> None:
        await self._run(self._complete, [self.prefix + key], [owner, int(ttl * 1000)])

    async def release(self, key: str, owner: str) -> None:
        await self._run(self._release, [self.prefix + key], [owner])

    async def purge(self) -> int:
        return 0  # Redis expires its keys itself
