"""Idempotent consumers: a message whose key was handled is acked without running the
handler again (the outcome ``duplicate``).

::

    import strictconsume as sc
    from strictconsume.idempotency import SQLiteStore

    store = SQLiteStore("/var/lib/shop/handled.db")

    @app.consumer("orders", idempotency=sc.Idempotency(store, ttl=7 * 24 * 3600))
    async def handle_order(msg: sc.Message) -> None:
        ...

See :mod:`strictconsume.idempotency._core` for the rules, and the README for how to
choose a store. ``PostgresStore`` needs the ``postgres`` extra, ``RedisStore`` the
``redis`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._outcome import Duplicate as Duplicate
from ._core import Claim as Claim
from ._core import Idempotency as Idempotency
from ._core import IdempotencyStore as IdempotencyStore
from ._core import InvalidKey as InvalidKey
from ._core import StoreError as StoreError

if TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore
    from ._redis import RedisStore as RedisStore
    from ._sqlite import SQLiteStore as SQLiteStore

__all__ = [
    "Claim",
    "Duplicate",
    "Idempotency",
    "IdempotencyStore",
    "InvalidKey",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "StoreError",
]


def __getattr__(name: str) -> Any:
    # The drivers are optional extras: import them only when their store is asked for.
    # sqlite3 is not, but it costs a consumer that keeps no keys almost 1 MB of memory
    # (the library and its module), so it loads on first use too.
    if name == "SQLiteStore":
        from ._sqlite import SQLiteStore

        SQLiteStore.__module__ = __name__
        return SQLiteStore
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    if name == "RedisStore":
        from ._redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _cls in (Claim, Idempotency, IdempotencyStore, InvalidKey, StoreError):
    _cls.__module__ = __name__
del _cls
