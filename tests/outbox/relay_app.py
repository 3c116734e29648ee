"""The Relay that ``python -m strictconsume relay tests.outbox.relay_app:relay`` runs
(the outbox file from OUTBOX_DB)."""

from __future__ import annotations

import os

from strictconsume.outbox import Relay, SQLiteOutbox

relay = Relay(SQLiteOutbox(os.environ.get("OUTBOX_DB", "outbox.db")), poll_interval=0.05)
