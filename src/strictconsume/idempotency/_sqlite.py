"""The SQLite idempotency store: the embedded default, one file shared by the
processes of one machine (WAL mode; a writer waits up to ``busy_timeout`` for
another's lock). Not for several machines: SQLite's locks do not work over a network
file system; use PostgreSQL or Redis there."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from typing import ClassVar

from ._sql import SQLStore, default_clock

__all__ = ["SQLiteStore"]


class SQLiteStore(SQLStore):
    """Handled keys in a SQLite file (created if missing), in table ``table``.

    Args:
        path: The database file. The handler's own database may be the same file:
            then :meth:`Idempotency.mark` records the key in the handler's transaction.
        table: The table of keys (created if missing).
        purge_interval: Expired keys are deleted at most this often (seconds), by
            the claim that comes next.
        busy_timeout: Seconds a statement waits for another process's write lock
            before it fails (and its message is requeued).
        synchronous: SQLite's ``PRAGMA synchronous`` for marking a key handled:
            ``"FULL"`` (default) makes a mark durable before the ack, even through a
            power loss; ``"NORMAL"`` is faster and durable through a crash of the
            process only. Claims and releases always use ``NORMAL``: a claim lost in
            a power loss went down with its handler.
        clock: Seconds since the epoch (tests pass their own).
    """

    driver_errors: ClassVar[tuple[type[BaseException], ...]] = (sqlite3.Error,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "strictconsume_idempotency",
        purge_interval: float = 60.0,
        busy_timeout: float = 30.0,
        synchronous: str = "FULL",
        clock: Callable[[], float] = default_clock,
    ) -> None:
        if synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, NORMAL or EXTRA, not {synchronous!r}")
        self.path = os.fspath(path)
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous.upper()
        super().__init__(
            f"sqlite:{self.path}", table=table, purge_interval=purge_interval, clock=clock
        )

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # Claims and releases: committed without an fsync of their own (in WAL
            # mode NORMAL syncs at checkpoints); a mark syncs the log, and with it
            # everything before it (see _durable).
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _durable(self, conn: sqlite3.Connection) -> Iterator[None]:
        if self.synchronous == "NORMAL":
            yield
            return
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        try:
            yield
        finally:
            conn.execute("PRAGMA synchronous=NORMAL")

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, sqlite3.OperationalError):
            if "full" in str(exc):
                return f"{text} (free disk space where the file is)"
            if "unable to open" in str(exc):
                return f"{text} (does the directory exist, and may this user write there?)"
            if "locked" in str(exc):
                return f"{text} (another process held the write lock past busy_timeout)"
        return text
