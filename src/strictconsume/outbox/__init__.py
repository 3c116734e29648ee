"""The transactional outbox: a message is written to an outbox table in the same
database transaction as the change it announces, and a relay publishes it afterwards
(with confirms, in order, retried, given up after ``max_attempts``).

::

    from strictconsume.outbox import PostgresOutbox, Relay

    outbox = PostgresOutbox("postgresql://app@db/shop")
    with psycopg.connect(...) as conn, conn.transaction():
        conn.execute("INSERT INTO orders ...")
        outbox.add(conn, exchange="shop", routing_key="order.created", body=payload)

    relay = Relay(outbox)
    relay.attach(app)   # inside an App; or: python -m strictconsume relay shop.outbox:relay

A crash can no longer commit the change without its message, nor publish a message
for a change that was rolled back. See :mod:`strictconsume.outbox._relay` for the
relay's rules and the README for what it guarantees.
"""

from __future__ import annotations

from ._relay import Relay as Relay
from ._relay import RelayStats as RelayStats
from ._table import OutboxRow as OutboxRow
from ._table import OutboxTable as OutboxTable
from ._table import PostgresOutbox as PostgresOutbox
from ._table import SQLiteOutbox as SQLiteOutbox

__all__ = ["OutboxRow", "OutboxTable", "PostgresOutbox", "Relay", "RelayStats", "SQLiteOutbox"]

for _cls in (OutboxRow, OutboxTable, PostgresOutbox, Relay, RelayStats, SQLiteOutbox):
    _cls.__module__ = __name__
del _cls
