"""Idempotent consumers: skip a message whose key was handled already.

RabbitMQ delivers at least once: a consumer killed between its handler's work and the
ack, a lost connection, a retried copy all run a handler again. ``Idempotency`` keeps
a record of the keys (by default the ``message_id``) that were handled, in a store
shared by every consumer of the queue, and acks a second delivery of a handled key
without running the handler (the outcome ``duplicate``).

A key's life in a store::

    (none) --claim--> running (until now + lease) --complete--> done (until now + ttl)
                         |  release (the handler failed,       |
                         v  was cancelled or rejected)         v  expiry: purged
                       (none)                                (none)

- A delivery whose key is ``running`` in another consumer waits (polling the store,
  holding its prefetch slot) until that one completes (then it is a duplicate) or
  releases it (then it runs). A claim whose consumer died (SIGKILL, a lost machine)
  ends with its lease: ``lease`` defaults to the handler's timeout plus
  :data:`LEASE_MARGIN` (or :data:`DEFAULT_LEASE` for a handler without a timeout), so
  that a claim never ends while its handler still runs.
- A handler that failed (an exception, a timeout, ``Reject``, ``Requeue``, a
  cancellation) releases its key, so that its retry, or the broker's redelivery,
  runs it again.
- The store unreachable while claiming or completing: the message is requeued (after
  :data:`STORE_FAILURE_PAUSE`), never acked unhandled or unmarked; an ERROR line says
  why, and the next delivery tries the store again.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import attrs

from .._outcome import Duplicate, Reject, Requeue

if TYPE_CHECKING:
    from .._message import Message

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "LEASE_MARGIN",
    "MAX_KEY_BYTES",
    "Claim",
    "Duplicate",
    "Idempotency",
    "IdempotencyStore",
    "InvalidKey",
    "StoreError",
    "guard",
    "log_duplicate",
]

logger = logging.getLogger("strictconsume")

#: How long a handled key is remembered by default: 7 days.
DEFAULT_TTL = 7 * 24 * 3600.0
#: A claim's lease for a handler without a timeout, in seconds.
DEFAULT_LEASE = 300.0
#: Added to a handler's timeout for its claim's lease, in seconds.
LEASE_MARGIN = 30.0
#: The longest key, in bytes of UTF-8 (a message_id is a short string: 255 at most).
MAX_KEY_BYTES = 512
#: Seconds a message waits before it is requeued because the store failed.
STORE_FAILURE_PAUSE = 1.0
#: Polling of a key another consumer is handling: first and longest interval (s).
BUSY_POLL_FIRST = 0.05
BUSY_POLL_MAX = 1.0


class Claim(enum.Enum):
    """What :meth:`IdempotencyStore.claim` found."""

    #: The key is ours now: run the handler.
    CLAIMED = "claimed"
    #: The key was handled already: a duplicate.
    DONE = "done"
    #: Another consumer is handling the key right now.
    BUSY = "busy"


class StoreError(Exception):
    """The idempotency store failed (unreachable, full disk, ...); ``store`` names it."""

    def __init__(self, store: str, message: str) -> None:
        super().__init__(f"idempotency store {store}: {message}")
        self.store = store


class InvalidKey(Reject):
    """The message has no usable idempotency key (no ``message_id``, a key function
    that failed or returned something else than a string, a key too long): bad input,
    dead-lettered at once with the reason."""


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where handled keys are kept. Times are the store's clock (seconds)."""

    #: For logs and errors: the store's kind and address, without a password.
    name: str

    async def open(self) -> None:
        """Connect and create what is needed; raise :class:`StoreError` if it cannot."""

    async def aclose(self) -> None:
        """Release connections and threads."""

    async def claim(self, key: str, owner: str, lease: float) -> Claim:
        """Take ``key`` for ``owner`` for ``lease`` seconds unless it is done or
        running (an expired record counts as none)."""

    async def complete(self, key: str, owner: str, ttl: float) -> None:
        """Mark ``key`` done, remembered for ``ttl`` seconds."""

    async def release(self, key: str, owner: str) -> None:
        """Forget ``owner``'s claim of ``key`` (not a done key, nor another's claim)."""

    async def purge(self) -> int:
        """Delete expired records; returns how many (stores whose records expire on
        their own return 0)."""


def _message_id(msg: Message) -> str | None:
    return msg.message_id


@attrs.frozen
class Idempotency:
    """The consumer option ``idempotency=``: skip messages whose key was handled.

    Args:
        store: Where handled keys are kept (:class:`SQLiteStore`, ``PostgresStore``,
            ``RedisStore``); shared by every consumer that should see the same keys.
        key: The key of a message: its ``message_id`` (default), or a function of the
            message returning a string (``lambda msg: msg.json()["order_id"]``).
            ``None``, an error or a non-string is bad input: dead-lettered.
        ttl: Seconds a handled key is remembered (default 7 days). A duplicate
            arriving later than that runs the handler again.
        lease: Seconds a claim holds a key for a running handler; default: the
            handler's timeout plus 30 s, or 300 s for a handler without one. A
            consumer killed mid-handler blocks its message's redelivery that long.
    """

    store: IdempotencyStore = attrs.field()
    key: Callable[[Message], str | None] = attrs.field(default=_message_id, eq=False)
    ttl: float = attrs.field(default=DEFAULT_TTL)
    lease: float | None = attrs.field(default=None)

    @store.validator
    def _check_store(self, attribute: attrs.Attribute[object], value: object) -> None:
        if not isinstance(value, IdempotencyStore):
            raise TypeError(
                f"store must be an idempotency store (SQLiteStore, PostgresStore, "
                f"RedisStore), not {value!r}"
            )

    @ttl.validator
    def _check_ttl(self, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"ttl must be a number of seconds > 0, not {value!r}")

    @lease.validator
    def _check_lease(self, attribute: attrs.Attribute[float | None], value: float | None) -> None:
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ValueError(f"lease must be a number of seconds > 0 (or None), not {value!r}")

    def key_of(self, msg: Message) -> str:
        """The key of ``msg``.

        Raises:
            InvalidKey: there is none, or it is not a string of at most
                :data:`MAX_KEY_BYTES` bytes.
        """
        try:
            key = self.key(msg)
        except Exception as exc:
            raise InvalidKey(
                f"the idempotency key function failed on this message: {type(exc).__name__}: {exc}"
            ) from exc
        if key is None:
            what = "message_id" if self.key is _message_id else "key (the key function gave None)"
            raise InvalidKey(
                f"the message has no {what}, so it cannot be checked for duplicates; "
                "publish it with a message_id"
            )
        if not isinstance(key, str):
            raise InvalidKey(f"the idempotency key must be a string, not {key!r}")
        if not key:
            raise InvalidKey("the idempotency key is empty")
        if len(key.encode()) > MAX_KEY_BYTES:
            raise InvalidKey(
                f"the idempotency key is too long ({len(key.encode())} bytes, at most "
                f"{MAX_KEY_BYTES}): {key[:40]!r}..."
            )
        return key

    def mark(self, conn: Any, msg: Message) -> None:
        """Record ``msg``'s key as handled on ``conn``, the handler's own database
        connection (sqlite3, or psycopg's ``Connection``), inside the transaction that
        holds the handler's writes: they commit together or not at all. The store
        must be a SQL store on that same database.

        Raises:
            Duplicate: the key was handled already. Let it propagate out of the
                transaction (which rolls it back) and out of the handler: the message
                is acked as a duplicate.
        """
        self._sql_store().mark_in(conn, self.key_of(msg), self.ttl)

    async def amark(self, conn: Any, msg: Message) -> None:
        """:meth:`mark` on psycopg's ``AsyncConnection``."""
        await self._sql_store().amark_in(conn, self.key_of(msg), self.ttl)

    def _sql_store(self) -> Any:
        if not hasattr(self.store, "mark_in"):
            raise TypeError(
                f"{self.store.name} cannot record a key in the handler's own transaction; "
                "that needs a SQLiteStore or PostgresStore on the handler's database"
            )
        return self.store

    def lease_for(self, timeout: float | None) -> float:
        """The lease of a claim for a handler with ``timeout``."""
        if self.lease is not None:
            return self.lease
        return DEFAULT_LEASE if timeout is None else timeout + LEASE_MARGIN


async def guard(
    idempotency: Idempotency,
    msg: Message,
    run: Callable[[], Awaitable[Exception | None]],
    *,
    handler_timeout: float | None,
) -> Exception | None:
    """Run ``run`` (the handler, within its timeout) unless ``msg``'s key was handled.

    Returns what ``run`` returned, or the error that decides the message's outcome
    instead: :class:`Duplicate` (ack without running), :class:`InvalidKey`
    (dead-letter), :class:`~strictconsume.Requeue` (the store failed). A
    cancellation propagates, after the claim was released.
    """
    try:
        key = idempotency.key_of(msg)
    except InvalidKey as exc:
        return exc
    store = idempotency.store
    owner = uuid.uuid4().hex
    try:
        found = await _claim(store, key, owner, idempotency.lease_for(handler_timeout))
    except StoreError as exc:
        return await _store_failed(msg, exc, "claimed")
    if found is Claim.DONE:
        return Duplicate(key)
    error: Exception | None = None
    returned = False
    try:
        error = await run()
        returned = True
    finally:
        # Duplicate: the handler found its key marked in its own transaction.
        if not returned or (error is not None and not isinstance(error, Duplicate)):
            with anyio.CancelScope(shield=True):
                try:
                    await store.release(key, owner)
                except StoreError as exc:
                    logger.error(
                        "queue %r: message %r: %s; its key stays claimed until its lease ends",
                        msg.queue,
                        msg.message_id,
                        exc,
                        extra={"event": "idempotency_store_failed", "queue": msg.queue},
                    )
    if error is None:
        try:
            with anyio.CancelScope(shield=True):
                await store.complete(key, owner, idempotency.ttl)
        except StoreError as exc:
            return await _store_failed(msg, exc, "marked as handled")
    return error


async def _claim(store: IdempotencyStore, key: str, owner: str, lease: float) -> Claim:
    """Claim ``key``, waiting while another consumer handles it."""
    interval = BUSY_POLL_FIRST
    while True:
        found = await store.claim(key, owner, lease)
        if found is not Claim.BUSY:
            return found
        await anyio.sleep(interval)
        interval = min(interval * 2, BUSY_POLL_MAX)


async def _store_failed(msg: Message, exc: StoreError, what: str) -> Requeue:
    logger.error(
        "queue %r: message %r (delivery_tag %d) could not be %s: %s; it goes back to the queue",
        msg.queue,
        msg.message_id,
        msg.delivery_tag,
        what,
        exc,
        extra={
            "event": "idempotency_store_failed",
            "queue": msg.queue,
            "message_id": msg.message_id,
            "delivery_tag": msg.delivery_tag,
            "error": str(exc),
        },
    )
    await anyio.sleep(STORE_FAILURE_PAUSE)
    return Requeue(str(exc))


def log_duplicate(msg: Message, error: BaseException | None, duration: float) -> None:
    """The log line of a message acked as a duplicate."""
    key = error.key if isinstance(error, Duplicate) else None
    logger.info(
        "queue %r: message %r (delivery_tag %d, attempt %d) is a duplicate: key %r was "
        "handled already; acked without running the handler again",
        msg.queue,
        msg.message_id,
        msg.delivery_tag,
        msg.attempt,
        key,
        extra={
            "event": "message_duplicate",
            "queue": msg.queue,
            "message_id": msg.message_id,
            "delivery_tag": msg.delivery_tag,
            "attempt": msg.attempt,
            "duration": duration,
            "outcome": "duplicate",
        },
    )
