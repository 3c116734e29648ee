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
from typing import Any, ClassVar

import psycopg

from ..amqp._url import redact_url
from ._sql import SQLStore, default_clock

__all__ = ["PostgresStore", "redact"]

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
        clock: Callable[[], float] = default_clock,
    ) -> None:
        self.conninfo = conninfo
        self.connect_timeout = connect_timeout
        super().__init__(
            f"postgresql:{redact(conninfo)}",
            table=table,
            purge_interval=purge_interval,
            clock=clock,
        )

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(
            self.conninfo, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )

    def _usable(self, conn: Any) -> bool:
        return not conn.closed and not conn.broken

    def _describe(self, exc: BaseException) -> str:
        return redact(f"{type(exc).__name__}: {exc}".strip())
