"""The outbox table, in SQLite or PostgreSQL: what ``add`` writes in the caller's own
transaction, and what the relay reads and marks.

The table::

    id               the order rows are published in (SQLite: its single writer makes
                     it the commit order; PostgreSQL: see ``txid``)
    txid             PostgreSQL only: the adding transaction's id. The relay takes only
                     rows of transactions older than every transaction still open
                     (``pg_snapshot_xmin``), so a transaction that is slow to commit
                     never has its earlier row overtaken by a later one's.
    message_id, exchange, routing_key, body, headers (JSON), content_type, persistent
    created_at       when it was added (seconds since the epoch): the relay's lag
    status           'pending', 'sent' or 'failed'
    attempts, next_attempt_at, last_error, sent_at

On PostgreSQL ``add`` also sends ``NOTIFY <table>`` (delivered at commit) so that a
waiting relay wakes at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from ..idempotency._sql import check_table

__all__ = ["OutboxRow", "OutboxTable", "PostgresOutbox", "SQLiteOutbox"]

_COLUMNS = (
    "id, message_id, exchange, routing_key, body, headers, content_type, persistent, "
    "created_at, attempts, next_attempt_at"
)


@attrs.frozen
class OutboxRow:
    """A pending row, as the relay publishes it."""

    id: int
    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    headers: dict[str, Any] | None
    content_type: str | None
    persistent: bool
    created_at: float
    attempts: int
    next_attempt_at: float


def _headers(headers: Mapping[str, Any] | None) -> str | None:
    if headers is None:
        return None
    try:
        return json.dumps(dict(headers), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"outbox headers must be JSON values (str, int, float, bool, None, lists and "
            f"dicts of them): {exc}"
        ) from exc


class OutboxTable:
    """What the SQLite and PostgreSQL outboxes share: the statements, ``add``, and the
    relay's reads and writes (blocking; the relay runs them in a worker thread)."""

    placeholder: ClassVar[str] = "?"
    #: How the relay names this outbox in logs, errors and metric labels.
    name: str
    table: str

    def _sql(self, text: str) -> str:
        return " ".join(text.replace("?", self.placeholder).split())

    # -- the producer's side: in its own transaction -------------------------------------

    def _insert(self) -> str:
        return self._sql(
            f"""INSERT INTO {self.table} (message_id, exchange, routing_key, body, headers,
            content_type, persistent, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"""
        )

    def _values(
        self,
        *,
        exchange: str,
        routing_key: str,
        body: bytes | str,
        headers: Mapping[str, Any] | None,
        message_id: str | None,
        content_type: str | None,
        persistent: bool,
    ) -> tuple[Any, ...]:
        if not isinstance(routing_key, str) or not isinstance(exchange, str):
            raise TypeError("exchange and routing_key must be strings")
        if isinstance(body, str):
            body = body.encode()
        if not isinstance(body, bytes | bytearray):
            raise TypeError(f"body must be bytes or str, not {type(body).__name__}")
        message_id = message_id or str(uuid.uuid4())
        return (
            message_id,
            exchange,
            routing_key,
            bytes(body),
            _headers(headers),
            content_type,
            bool(persistent),
            time.time(),
        )

    def add(
        self,
        conn: Any,
        *,
        routing_key: str,
        body: bytes | str,
        exchange: str = "",
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
    ) -> str:
        """Add a message to the outbox on ``conn``, the caller's connection (sqlite3,
        or psycopg's ``Connection``), inside the caller's transaction: it is published
        once that commits, and never if it rolls back.

        Returns:
            The message's ``message_id`` (a new UUID unless one is given), so that an
            idempotent consumer downstream drops the relay's rare duplicate.
        """
        values = self._values(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            persistent=persistent,
        )
        conn.execute(self._insert(), values)
        for statement in self._after_insert():
            conn.execute(statement)
        return str(values[0])

    async def aadd(
        self,
        conn: Any,
        *,
        routing_key: str,
        body: bytes | str,
        exchange: str = "",
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
    ) -> str:
        """:meth:`add` on psycopg's ``AsyncConnection``."""
        values = self._values(
            exchange=exchange,
            routing_key=routing_key,
            body=body,
            headers=headers,
            message_id=message_id,
            content_type=content_type,
            persistent=persistent,
        )
        await conn.execute(self._insert(), values)
        for statement in self._after_insert():
            await conn.execute(statement)
        return str(values[0])

    def _after_insert(self) -> list[str]:
        return []

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        """The database driver's errors: the relay logs them and tries again."""
        return (sqlite3.Error,)

    # -- the relay's side (blocking, in its worker thread) -------------------------------

    def connect(self) -> Any:
        raise NotImplementedError

    def create_statements(self) -> list[str]:
        raise NotImplementedError

    def create(self, conn: Any) -> None:
        """Create the table and its index if missing (the relay does it at start-up;
        a producer may call it first)."""
        for statement in self.create_statements():
            conn.execute(statement)
        conn.commit()

    def fetch(self, conn: Any, limit: int) -> list[OutboxRow]:
        """The first ``limit`` pending rows in order (locked for this relay where the
        database can)."""
        rows = conn.execute(self.fetch_statement(), (limit,)).fetchall()
        return [
            OutboxRow(
                id=int(r[0]),
                message_id=r[1],
                exchange=r[2],
                routing_key=r[3],
                body=bytes(r[4]),
                headers=None if r[5] is None else json.loads(r[5]),
                content_type=r[6],
                persistent=bool(r[7]),
                created_at=float(r[8]),
                attempts=int(r[9]),
                next_attempt_at=float(r[10]),
            )
            for r in rows
        ]

    def fetch_statement(self) -> str:
        return self._sql(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE status = 'pending' ORDER BY id LIMIT ?"
        )

    def finish(
        self,
        conn: Any,
        sent: list[int],
        failures: list[tuple[int, int, float, str, str]],
        now: float,
    ) -> None:
        """Mark ``sent`` rows sent and record ``failures`` (id, attempts,
        next_attempt_at, status, error), then commit (ending the rows' locks)."""
        if sent:
            conn.execute(
                self._sql(
                    f"UPDATE {self.table} SET status = 'sent', sent_at = ? WHERE id IN "
                    f"({', '.join('?' * len(sent))})"
                ),
                (now, *sent),
            )
        for row_id, attempts, next_at, status, error in failures:
            conn.execute(
                self._sql(
                    f"""UPDATE {self.table} SET attempts = ?, next_attempt_at = ?, status = ?,
                    last_error = ? WHERE id = ?"""
                ),
                (attempts, next_at, status, error[:2000], row_id),
            )
        conn.commit()

    def oldest_pending(self, conn: Any) -> float | None:
        """``created_at`` of the oldest pending row, if any."""
        row = conn.execute(
            self._sql(f"SELECT MIN(created_at) FROM {self.table} WHERE status = 'pending'")
        ).fetchone()
        conn.commit()
        return None if row is None or row[0] is None else float(row[0])

    def purge_sent(self, conn: Any, before: float) -> int:
        """Delete the rows sent before ``before``."""
        count = conn.execute(
            self._sql(f"DELETE FROM {self.table} WHERE status = 'sent' AND sent_at < ?"),
            (before,),
        ).rowcount
        conn.commit()
        return int(count)

    def counts(self, conn: Any) -> dict[str, int]:
        """Rows by status (for tests and operators)."""
        rows = conn.execute(
            self._sql(f"SELECT status, COUNT(*) FROM {self.table} GROUP BY status")
        ).fetchall()
        conn.commit()
        return {str(status): int(n) for status, n in rows}

    def wait_for_rows(self, conn: Any, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for a sign of new rows; True if there was
        one. Without one (SQLite) this is the polling interval."""
        time.sleep(timeout)
        return False

    def listen_connection(self) -> Any:
        return None


class SQLiteOutbox(OutboxTable):
    """An outbox table in a SQLite file: ``add`` it in the same transaction as the
    writes it announces, on the same file. One relay per file: SQLite has no
    row locks to share the rows among several (a second relay would publish
    duplicates, which idempotent consumers drop)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "strictconsume_outbox",
        busy_timeout: float = 30.0,
    ) -> None:
        self.path = os.fspath(path)
        self.table = check_table(table)
        self.busy_timeout = busy_timeout
        self.name = f"sqlite:{self.path}:{self.table}"

    def __repr__(self) -> str:
        return f"<SQLiteOutbox {self.name}>"

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def create_statements(self) -> list[str]:
        t = self.table
        return [
            f"""CREATE TABLE IF NOT EXISTS {t} (id INTEGER PRIMARY KEY AUTOINCREMENT,
            message_id TEXT NOT NULL, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
            body BLOB NOT NULL, headers TEXT, content_type TEXT, persistent INTEGER NOT NULL,
            created_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
            last_error TEXT, sent_at REAL)""",
            f"CREATE INDEX IF NOT EXISTS {t}_status ON {t} (status, id)",
        ]


class PostgresOutbox(OutboxTable):
    """An outbox table in PostgreSQL (psycopg 3, the ``postgres`` extra). Several
    relays may run at once: each locks the rows it publishes (``FOR UPDATE SKIP
    LOCKED``), the others take the next ones."""

    placeholder: ClassVar[str] = "%s"

    def __init__(
        self, conninfo: str, *, table: str = "strictconsume_outbox", connect_timeout: float = 10.0
    ) -> None:
        from ..idempotency._postgres import redact

        self.conninfo = conninfo
        self.table = check_table(table)
        self.connect_timeout = connect_timeout
        self.name = f"postgresql:{redact(conninfo)}:{self.table}"

    def __repr__(self) -> str:
        return f"<PostgresOutbox {self.name}>"

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.conninfo, connect_timeout=max(1, int(self.connect_timeout)))

    def listen_connection(self) -> Any:
        import psycopg

        conn = psycopg.connect(
            self.conninfo, autocommit=True, connect_timeout=max(1, int(self.connect_timeout))
        )
        conn.execute(f"LISTEN {self.table}")
        return conn

    def create_statements(self) -> list[str]:
        t = self.table
        return [
            f"""CREATE TABLE IF NOT EXISTS {t} (id BIGSERIAL PRIMARY KEY,
            txid BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
            message_id TEXT NOT NULL, exchange TEXT NOT NULL, routing_key TEXT NOT NULL,
            body BYTEA NOT NULL, headers TEXT, content_type TEXT, persistent BOOLEAN NOT NULL,
            created_at DOUBLE PRECISION NOT NULL, status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
            last_error TEXT, sent_at DOUBLE PRECISION)""",
            f"CREATE INDEX IF NOT EXISTS {t}_pending ON {t} (id) WHERE status = 'pending'",
        ]

    def _after_insert(self) -> list[str]:
        return [f"NOTIFY {self.table}"]

    def driver_errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)

    def fetch_statement(self) -> str:
        return self._sql(
            f"""SELECT {_COLUMNS} FROM {self.table} WHERE status = 'pending'
            AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint
            ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED"""
        )

    def wait_for_rows(self, conn: Any, timeout: float) -> bool:
        if conn is None:
            return super().wait_for_rows(conn, timeout)
        # Notifications that arrive together are read together (stop_after counts
        # them, not calls): the round that follows publishes all of their rows.
        return any(True for _ in conn.notifies(timeout=timeout, stop_after=1))
