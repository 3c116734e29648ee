"""The PostgreSQL idempotency store (psycopg 3, the ``postgres`` extra): for consumers
on several machines, and for the strongest form where the handler writes to the same
database (:meth:`Idempotency.mark` / :meth:`Idempotency.amark` in its transaction).

psycopg's blocking ``Connection`` runs in a worker thread on trio and on asyncio
alike (psycopg's async connection needs asyncio); the handler's own transaction may
use either. Records expire by ``expires_at`` and are deleted by the claims (at most
every ``purge_interval``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread
import psycopg
import psycopg_pool

from ..amqp import redact_url
from ._core import StoreError
from ._sql import SQLStore, default_clock

__all__ = ["PostgresStore", "redact"]

T = TypeVar("T")

_PASSWORD_IN_DSN = re.compile(r"(password\s*=\s*)\S+")


def redact(conninfo: str) -> str:
    """``conninfo`` (a URL or ``key=value`` string) without its password."""
    if "://" in conninfo:
        return redact_url(conninfo)
    return _PASSWORD_IN_DSN.sub(r"\1***", conninfo)


class PostgresStore(SQLStore):
    """Handled keys in a PostgreSQL table.

    Args:
        conninfo: A libpq URL or ``key=value`` string
            (``postgresql://app@127.0.0.1:5432/shop``).
        table: The table of keys (created if missing).
        purge_interval: Expired keys are deleted at most this often (seconds).
        connect_timeout: Seconds to wait for the server when connecting.
        max_connections: Connections (psycopg_pool) and so statements at once.
        clock: Seconds since the epoch (tests pass their own).
    """

    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (psycopg.Error,)
    placeholder: ClassVar[str] = "%s"
    real: ClassVar[str] = "DOUBLE PRECISION"

    def __init__(
        self,
        conninfo: str,
        *,
        table: str = "strictconsume_idempotency",
        purge_interval: float = 60.0,
        connect_timeout: float = 10.0,
        max_connections: int = 4,
        clock: Callable[[], float] = default_clock,
    ) -> None:
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(f"max_connections must be an int, not {max_connections!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections!r}")
        self.conninfo = conninfo
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        super().__init__(
            f"postgresql:{redact(conninfo)}",
            table=table,
            purge_interval=purge_interval,
            clock=clock,
        )
        # Statements of concurrent handlers run at once, each on a connection of the
        # pool (PostgreSQL shares the commits' fsyncs between them).
        self._limiter = anyio.CapacityLimiter(max_connections)
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.conninfo, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )

    def _open_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        # One connection first: its error names the cause (refused, authentication,
        # no such database), where the pool's would only say it timed out.
        with self._connect() as conn:
            for statement in self.statements.create:
                conn.execute(statement)
        pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            self.conninfo,
            min_size=1,
            max_size=self.max_connections,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(self.connect_timeout))},
            timeout=self.connect_timeout,
            open=False,
        )
        try:
            pool.open(wait=True, timeout=self.connect_timeout)
        except BaseException:
            pool.close()
            raise
        return pool

    async def _run(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` on a connection of the pool, in a worker thread; a
        broken connection is dropped by the pool when it is given back."""

        def call() -> T:
            try:
                with self._lock:
                    if self._pool is None:
                        self._pool = self._open_pool()
                    pool = self._pool
                with pool.connection() as conn:
                    return fn(conn)
            except psycopg.Error as exc:  # PoolTimeout included
                raise StoreError(self.name, self._describe(exc)) from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.close()

        await anyio.to_thread.run_sync(close)

    def _describe(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}".strip())
