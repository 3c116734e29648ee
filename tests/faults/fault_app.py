"""The App that the fault tests (``tests/faults/test_faults.py``) run as a real process:

    python -m strictconsume tests.faults.fault_app:app --backend trio ...

Its handler records every run durably in SQLite, so that after a broker restart, a
SIGKILL or anything else the test can tell which messages were handled and how often.
A message's body is JSON, ``{"id": "...", "kind": "ok", "sleep": 0.1}``; ``kind``
chooses what the handler does after sleeping ``sleep`` seconds:

``ok`` (and ``slow``, which only sleeps longer)
    returns: the framework acks.
``reject``
    raises :class:`strictconsume.Reject`: dead-lettered to ``<queue>.dlq`` at once.
``fail``
    raises :class:`InjectedFailure` on every attempt: retried per :data:`RETRY`, then
    dead-lettered with ``x-error-type: tests.faults.fault_app.InjectedFailure``.

Everything per test comes from the environment, read once at import:

``PROCESS_APP_QUEUE``
    the queue to consume (set by ``tests.processes.Harness.start``).
``FAULT_APP_DB``
    the SQLite file the runs go to; one file for every process of a test.
``FAULT_APP_RETRY``
    the retry delays in seconds, comma-separated (``0.2,0.5``: three attempts).
``FAULT_APP_TIMEOUT``
    the handler's timeout (60 s; longer than any ``sleep`` a test sends).

The record: one row per handler run in table ``runs`` (see :data:`SCHEMA`), inserted
when the run starts (``outcome`` NULL) and updated when it ends with ``ok``,
``fail``, ``reject`` or ``cancelled``. A row still NULL afterwards is a run that never
ended: its process was killed. Each insert and update is its own transaction, committed
with ``journal_mode=WAL`` and ``synchronous=FULL``: the WAL is fsynced before the
commit returns, so the ``ok`` of a run is on disk before the handler returns, hence
before the framework can send the ack. A SIGKILL (or a crash of the machine) cannot
leave an acked message without its row. The writes run on the event loop, blocking it
for a commit (about 0.3 ms here): that is the price of the ordering, and far cheaper
than a hop to a worker thread.
"""

from __future__ import annotations

import os
import sqlite3
import time

import anyio

from strictconsume import App, Message, Reject, Retry

QUEUE = os.environ.get("PROCESS_APP_QUEUE", "strictconsume-fault-app")
DB = os.environ.get("FAULT_APP_DB", "fault-app.sqlite")
RETRY = Retry(
    delays=tuple(float(d) for d in os.environ.get("FAULT_APP_RETRY", "0.2,0.5").split(",") if d)
)
TIMEOUT = float(os.environ.get("FAULT_APP_TIMEOUT", "60"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run INTEGER PRIMARY KEY,  -- in the order the runs started, across processes
    id TEXT NOT NULL,         -- the message's id (its body's "id")
    kind TEXT NOT NULL,       -- what the message asked for: ok, slow, fail, reject
    pid INTEGER NOT NULL,
    attempt INTEGER NOT NULL, -- msg.attempt
    redelivered INTEGER NOT NULL,
    started REAL NOT NULL,    -- time.time()
    ended REAL,               -- NULL while running, and for ever if the process died
    outcome TEXT              -- ok, fail, reject, cancelled; NULL as ``ended``
)
"""


class InjectedFailure(Exception):
    """What a ``fail`` message raises on every attempt."""


def _open() -> sqlite3.Connection:
    db = sqlite3.connect(DB, isolation_level=None, timeout=30)  # autocommit: one write each
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(SCHEMA)
    return db


_db: sqlite3.Connection | None = None


def _connection() -> sqlite3.Connection:
    global _db
    if _db is None:
        _db = _open()
    return _db


def _started(msg: Message, message_id: str, kind: str) -> int:
    cursor = _connection().execute(
        "INSERT INTO runs (id, kind, pid, attempt, redelivered, started) VALUES (?,?,?,?,?,?)",
        (message_id, kind, os.getpid(), msg.attempt, int(msg.redelivered), time.time()),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _ended(run: int, outcome: str) -> None:
    _connection().execute(
        "UPDATE runs SET ended = ?, outcome = ? WHERE run = ?", (time.time(), outcome, run)
    )


app = App()


@app.consumer(QUEUE, timeout=TIMEOUT, retry=RETRY)
async def handle(msg: Message) -> None:
    data = msg.json()
    message_id = str(data["id"])
    kind = str(data.get("kind", "ok"))
    run = _started(msg, message_id, kind)
    try:
        await anyio.sleep(float(data.get("sleep", 0)))
    except anyio.get_cancelled_exc_class():
        _ended(run, "cancelled")  # the shutdown's grace ran out, or the connection broke
        raise
    if kind == "reject":
        _ended(run, "reject")
        raise Reject(f"{message_id} is rejected on purpose")
    if kind == "fail":
        _ended(run, "fail")
        raise InjectedFailure(f"{message_id} fails on purpose (attempt {msg.attempt})")
    _ended(run, "ok")
