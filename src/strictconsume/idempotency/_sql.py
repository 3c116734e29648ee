"""The SQL idempotency stores (SQLite and PostgreSQL): one table, the same statements.

Both drivers are blocking (the standard library's sqlite3, psycopg's ``Connection``):
every statement runs in a worker thread (``anyio.to_thread``), one at a time per
store, so nothing blocks the event loop on trio or on asyncio. The connection is in
autocommit mode: each statement is its own transaction.

The table::

    key         text primary key
    state       'running' (claimed, until expires_at) or 'done' (until expires_at)
    owner       the claiming delivery's random token ('' once marked by a handler)
    expires_at  seconds since the epoch (the store's clock)

A claim is one upsert that takes a missing or expired record and returns it; a
record that is there and not expired is ``done`` or ``running`` (another consumer).
:meth:`SQLStore.mark_in` is the strongest form: the same upsert to ``done``, run by the
handler inside its own transaction, so that its effect and the mark commit together.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import anyio
import anyio.to_thread

from ._core import Claim, Duplicate, StoreError

__all__ = ["SQLStore", "Statements"]

T = TypeVar("T")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def check_table(table: str) -> str:
    if not isinstance(table, str) or not _IDENTIFIER.fullmatch(table):
        raise ValueError(
            f"table must be a plain SQL identifier (letters, digits, '_'), not {table!r}"
        )
    return table


class Statements:
    """The statements of one table, with the driver's placeholder (``?`` or ``%s``)."""

    def __init__(self, table: str, *, placeholder: str, real: str) -> None:
        t = check_table(table)

        def sql(text: str) -> str:
            return " ".join(text.replace("?", placeholder).split())

        self.create = [
            sql(
                f"""CREATE TABLE IF NOT EXISTS {t} (key TEXT PRIMARY KEY, state TEXT NOT NULL,
                owner TEXT NOT NULL, expires_at {real} NOT NULL)"""
            ),
            sql(f"CREATE INDEX IF NOT EXISTS {t}_expires_at ON {t} (expires_at)"),
        ]
        upsert = f"""INSERT INTO {t} (key, state, owner, expires_at) VALUES (?, ?, ?, ?)
            ON CONFLICT (key) DO UPDATE SET state = excluded.state, owner = excluded.owner,
            expires_at = excluded.expires_at"""
        #: (key, 'running', owner, until, now): the record, if it was free.
        self.claim = sql(f"{upsert} WHERE {t}.expires_at <= ? RETURNING owner")
        #: (key, now): what holds a key that could not be claimed.
        self.state = sql(f"SELECT state FROM {t} WHERE key = ? AND expires_at > ?")
        #: (key, 'done', owner, until)
        self.complete = sql(upsert)
        #: (key, owner)
        self.release = sql(f"DELETE FROM {t} WHERE key = ? AND owner = ? AND state = 'running'")
        #: (now,)
        self.purge = sql(f"DELETE FROM {t} WHERE expires_at <= ?")
        #: (key, 'done', '', until, now): one row changed unless handled already.
        self.mark = sql(f"{upsert} WHERE {t}.state <> 'done' OR {t}.expires_at <= ?")


class SQLStore:
    """What the SQLite and PostgreSQL stores share; subclasses open the connection."""

    #: The driver's errors, translated into :class:`StoreError`.
    driver_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    placeholder: ClassVar[str] = "?"
    real: ClassVar[str] = "REAL"

    def __init__(
        self,
        name: str,
        *,
        table: str,
        purge_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.table = check_table(table)
        self.statements = Statements(table, placeholder=self.placeholder, real=self.real)
        self.purge_interval = purge_interval
        self.clock = clock
        self._conn: Any = None
        # One statement at a time per store: the connection is not shared by threads.
        self._limiter = anyio.CapacityLimiter(1)
        self._lock = threading.Lock()
        self._last_purge = -float("inf")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # -- what subclasses provide ---------------------------------------------------------

    def _connect(self) -> Any:
        """Open and set up a connection (in a worker thread); autocommit."""
        raise NotImplementedError

    def _usable(self, conn: Any) -> bool:
        """Is ``conn`` still worth using (not closed or broken)?"""
        return True

    def _describe(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}"

    def _durable(self, conn: Any) -> contextlib.AbstractContextManager[None]:
        """Around the statement that marks a key done: what makes it durable before
        the ack, where claims and releases need not be (a claim lost in a power
        failure went with its handler)."""
        return contextlib.nullcontext()

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[[Any], T]) -> T:
        """``fn(connection)`` in the store's worker thread; driver errors become
        :class:`StoreError`, and a broken connection is opened again next time."""

        def call() -> T:
            with self._lock:
                try:
                    if self._conn is None or not self._usable(self._conn):
                        self._drop()
                        self._conn = self._connect()
                        for statement in self.statements.create:
                            self._conn.execute(statement)
                    return fn(self._conn)
                except self.driver_errors as exc:
                    if self._conn is not None and not self._usable(self._conn):
                        self._drop()
                    raise StoreError(self.name, self._describe(exc)) from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*self.driver_errors):
                conn.close()

    # -- the store interface -------------------------------------------------------------

    async def open(self) -> None:
        await self._run(lambda conn: None)

    async def aclose(self) -> None:
        def close() -> None:
            with self._lock:
                self._drop()

        await anyio.to_thread.run_sync(close, limiter=self._limiter)

    # The clock is read on the event loop (a test's virtual clock is not readable
    # from a worker thread), then handed to the statement.

    async def claim(self, key: str, owner: str, lease: float) -> Claim:
        statements = self.statements
        now = self.clock()
        purge = now - self._last_purge >= self.purge_interval

        def claim(conn: Any) -> Claim:
            if purge:
                conn.execute(statements.purge, (now,))
                self._last_purge = now
            while True:
                row = conn.execute(
                    statements.claim, (key, "running", owner, now + lease, now)
                ).fetchone()
                if row is not None:
                    return Claim.CLAIMED
                row = conn.execute(statements.state, (key, now)).fetchone()
                if row is not None:
                    return Claim.DONE if row[0] == "done" else Claim.BUSY
                # it expired between the two statements: claim it again

        return await self._run(claim)

    async def complete(self, key: str, owner: str, ttl: float) -> None:
        until = self.clock() + ttl

        def complete(conn: Any) -> None:
            with self._durable(conn):
                conn.execute(self.statements.complete, (key, "done", owner, until))

        await self._run(complete)

    async def release(self, key: str, owner: str) -> None:
        await self._run(lambda conn: conn.execute(self.statements.release, (key, owner)))

    async def purge(self) -> int:
        now = self.clock()

        def purge(conn: Any) -> int:
            return int(conn.execute(self.statements.purge, (now,)).rowcount)

        return await self._run(purge)

    # -- the strongest form --------------------------------------------------------------

    def mark_in(self, conn: Any, key: str, ttl: float) -> None:
        """Mark ``key`` done on ``conn``, the handler's own connection, inside its
        transaction: the effect and the mark commit (or roll back) together.

        Raises:
            Duplicate: ``key`` was handled already; roll the transaction back.
        """
        now = self.clock()
        cursor = conn.execute(self.statements.mark, (key, "done", "", now + ttl, now))
        if cursor.rowcount == 0:
            raise Duplicate(key)

    async def amark_in(self, conn: Any, key: str, ttl: float) -> None:
        """:meth:`mark_in` on an async connection (psycopg's ``AsyncConnection``)."""
        now = self.clock()
        cursor = await conn.execute(self.statements.mark, (key, "done", "", now + ttl, now))
        if cursor.rowcount == 0:
            raise Duplicate(key)


def default_clock() -> float:
    return time.time()
