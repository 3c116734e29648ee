"""Idempotency without a broker: the SQLite store's records and expiry, the guard's rules
(duplicate, a key in progress elsewhere, a failure frees the key, bad keys, a failing
store) and the strongest form (the mark in the handler's own SQLite transaction).

Each test runs on trio and on asyncio; those about time run on trio's autojump clock
with the store reading the same virtual clock."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import trio.testing

import strictconsume as sc
from strictconsume import Message, Reject, Requeue
from strictconsume._outcome import OutcomeKind, decide
from strictconsume.amqp import Delivery, Properties
from strictconsume.idempotency import (
    Claim,
    Duplicate,
    Idempotency,
    InvalidKey,
    SQLiteStore,
    StoreError,
)
from strictconsume.idempotency._core import (
    BUSY_POLL_MAX,
    DEFAULT_LEASE,
    LEASE_MARGIN,
    MAX_KEY_BYTES,
    STORE_FAILURE_PAUSE,
    guard,
)

pytestmark = pytest.mark.anyio


def autojump() -> pytest.MarkDecorator:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return pytest.mark.parametrize(
        "anyio_backend", [pytest.param(("trio", {"clock": clock}), id="trio-autojump")]
    )


def message(message_id: str | None = "m-1", body: bytes = b"{}", delivery_tag: int = 1) -> Message:
    delivery = Delivery(
        channel_id=1,
        consumer_tag="c",
        delivery_tag=delivery_tag,
        redelivered=False,
        exchange="",
        routing_key="orders",
        properties=Properties(message_id=message_id),
        body=body,
    )
    return Message.from_delivery(delivery, "orders")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "keys.db", clock=anyio.current_time)
    await s.open()
    yield s
    await s.aclose()


class Handler:
    """A handler run: counts its runs, returns or raises what it is told."""

    def __init__(self, error: Exception | None = None) -> None:
        self.runs = 0
        self.error = error
        self.gate: anyio.Event | None = None
        self.started = anyio.Event()
        self.started_at = -1.0

    async def __call__(self) -> Exception | None:
        self.runs += 1
        self.started_at = anyio.current_time()
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.error


# -- the store ------------------------------------------------------------------------------


@autojump()
async def test_sqlite_records_claims_done_keys_and_their_expiry(
    anyio_backend: Any, store: SQLiteStore
) -> None:
    assert await store.claim("k", "a", lease=10) is Claim.CLAIMED
    assert await store.claim("k", "b", lease=10) is Claim.BUSY
    await anyio.sleep(10)  # the lease ends: a dead consumer's claim is taken over
    assert await store.claim("k", "b", lease=10) is Claim.CLAIMED
    await store.release("k", "a")  # not a's claim any more: nothing happens
    assert await store.claim("k", "c", lease=10) is Claim.BUSY
    await store.complete("k", "b", ttl=100)
    assert await store.claim("k", "c", lease=10) is Claim.DONE
    await store.release("k", "b")  # a done key is never released
    assert await store.claim("k", "c", lease=10) is Claim.DONE
    await anyio.sleep(100)
    assert await store.claim("k", "c", lease=10) is Claim.CLAIMED
    await store.release("k", "c")
    assert await store.claim("k", "d", lease=10) is Claim.CLAIMED


@autojump()
async def test_expired_records_are_purged(anyio_backend: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "keys.db", clock=anyio.current_time, purge_interval=50)
    for i in range(5):
        assert await store.claim(f"k{i}", "o", lease=1) is Claim.CLAIMED
        await store.complete(f"k{i}", "o", ttl=30)
    await anyio.sleep(31)
    assert await store.claim("fresh", "o", lease=1) is Claim.CLAIMED  # not purged yet
    await anyio.sleep(20)
    assert await store.claim("later", "o", lease=1) is Claim.CLAIMED  # purges on the way
    await store.aclose()
    with sqlite3.connect(tmp_path / "keys.db") as db:
        keys = {row[0] for row in db.execute("SELECT key FROM strictconsume_idempotency")}
    assert keys == {"later"}


async def test_the_file_is_in_wal_mode_and_shared_by_two_stores(
    anyio_backend: str, tmp_path: Path
) -> None:
    one, two = SQLiteStore(tmp_path / "k.db"), SQLiteStore(tmp_path / "k.db")
    assert await one.claim("k", "a", lease=60) is Claim.CLAIMED
    assert await two.claim("k", "b", lease=60) is Claim.BUSY
    await one.complete("k", "a", ttl=60)
    assert await two.claim("k", "b", lease=60) is Claim.DONE
    assert await two.purge() == 0
    await one.aclose()
    await two.aclose()
    with sqlite3.connect(tmp_path / "k.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_store_that_cannot_open_its_file_says_which_and_why(
    anyio_backend: str, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "missing-dir" / "k.db")
    with pytest.raises(StoreError) as info:
        await store.open()
    assert str(tmp_path / "missing-dir" / "k.db") in str(info.value)
    assert "does the directory exist" in str(info.value)


def test_options_are_checked_up_front(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "k.db")
    with pytest.raises(ValueError, match="ttl must be a number of seconds > 0, not 0"):
        Idempotency(store, ttl=0)
    with pytest.raises(ValueError, match="lease must be"):
        Idempotency(store, lease=-1)
    with pytest.raises(TypeError, match="store must be an idempotency store"):
        Idempotency("sqlite:///x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plain SQL identifier"):
        SQLiteStore(tmp_path / "k.db", table="keys; DROP TABLE x")
    with pytest.raises(TypeError, match=r"must be a strictconsume\.Idempotency"):
        sc.ConsumerSpec("q", Handler().__call__, idempotency=store)  # type: ignore[arg-type]


def test_the_lease_outlasts_the_handlers_timeout(tmp_path: Path) -> None:
    idem = Idempotency(SQLiteStore(tmp_path / "k.db"))
    assert idem.lease_for(None) == DEFAULT_LEASE
    assert idem.lease_for(20.0) == 20.0 + LEASE_MARGIN
    assert Idempotency(idem.store, lease=7).lease_for(20.0) == 7


# -- the guard ------------------------------------------------------------------------------


async def test_a_handled_key_is_a_duplicate_without_running_the_handler(
    anyio_backend: str, store: SQLiteStore
) -> None:
    idem = Idempotency(store)
    first, second = Handler(), Handler()
    assert await guard(idem, message("m-1"), first, handler_timeout=None) is None
    error = await guard(idem, message("m-1"), second, handler_timeout=None)
    assert isinstance(error, Duplicate)
    assert error.key == "m-1"
    assert (first.runs, second.runs) == (1, 0)
    assert decide(error, attempt=1, retry=sc.Retry()).kind is OutcomeKind.DUPLICATE
    # another message_id is another key
    assert await guard(idem, message("m-2"), second, handler_timeout=None) is None
    assert second.runs == 1


async def test_the_key_can_be_a_function_of_the_message(
    anyio_backend: str, store: SQLiteStore
) -> None:
    idem = Idempotency(store, key=lambda msg: str(msg.json()["order"]))
    handler = Handler()
    assert await guard(idem, message("a", b'{"order": 7}'), handler, handler_timeout=None) is None
    dup = await guard(idem, message("b", b'{"order": 7}'), handler, handler_timeout=None)
    assert isinstance(dup, Duplicate)
    assert handler.runs == 1


@pytest.mark.parametrize(
    "error", [ValueError("boom"), Reject("no"), Requeue(), TimeoutError("slow")], ids=type
)
async def test_a_failed_handler_leaves_the_key_free_for_its_retry(
    anyio_backend: str, store: SQLiteStore, error: Exception
) -> None:
    idem = Idempotency(store)
    failing, retry = Handler(error), Handler()
    assert await guard(idem, message(), failing, handler_timeout=None) is error
    assert await guard(idem, message(), retry, handler_timeout=None) is None
    assert (failing.runs, retry.runs) == (1, 1)


async def test_a_cancelled_handler_leaves_the_key_free(
    anyio_backend: str, store: SQLiteStore
) -> None:
    idem = Idempotency(store)
    stuck = Handler()
    stuck.gate = anyio.Event()  # never set
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(guard, idem, message(), stuck, handler_timeout=None))
        await stuck.started.wait()
        tg.cancel_scope.cancel()
    assert await store.claim("m-1", "next", lease=60) is Claim.CLAIMED


@autojump()
async def test_a_key_in_progress_elsewhere_waits_and_is_then_a_duplicate(
    anyio_backend: Any, store: SQLiteStore
) -> None:
    idem = Idempotency(store)
    first, second = Handler(), Handler()
    first.gate = anyio.Event()
    results: list[Exception | None] = []

    async def run(handler: Handler) -> None:
        results.append(await guard(idem, message(), handler, handler_timeout=None))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, first)
        await first.started.wait()
        tg.start_soon(run, second)
        await anyio.sleep(30)  # the second waits all this time, not running
        assert (first.runs, second.runs, results) == (1, 0, [])
        first.gate.set()
    assert results[0] is None
    assert isinstance(results[1], Duplicate)
    assert second.runs == 0


@autojump()
async def test_a_key_in_progress_elsewhere_runs_once_that_one_failed(
    anyio_backend: Any, store: SQLiteStore
) -> None:
    idem = Idempotency(store)
    first, second = Handler(ValueError("boom")), Handler()
    first.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(guard, idem, message(), first, handler_timeout=None))
        await first.started.wait()
        tg.start_soon(functools.partial(guard, idem, message(), second, handler_timeout=None))
        await anyio.sleep(5)
        assert second.runs == 0
        first.gate.set()
        released = anyio.current_time()
    assert second.runs == 1
    assert second.started_at - released <= 2 * BUSY_POLL_MAX  # at its next poll


@autojump()
async def test_a_dead_consumers_claim_ends_with_its_lease(
    anyio_backend: Any, store: SQLiteStore
) -> None:
    # The claim of a consumer killed mid-handler: never completed nor released.
    assert await store.claim("m-1", "killed", lease=20.0 + LEASE_MARGIN) is Claim.CLAIMED
    started = anyio.current_time()
    handler = Handler()
    assert await guard(Idempotency(store), message(), handler, handler_timeout=20.0) is None
    assert handler.runs == 1
    waited = anyio.current_time() - started
    assert 20.0 + LEASE_MARGIN <= waited <= 20.0 + LEASE_MARGIN + BUSY_POLL_MAX


@pytest.mark.parametrize(
    ("message_id", "key", "reason"),
    [
        (None, None, "the message has no message_id, so it cannot be checked for duplicates"),
        ("m", lambda msg: None, "no key (the key function gave None)"),
        ("m", lambda msg: msg.json()["id"], "the idempotency key function failed"),
        ("m", lambda msg: 7, "the idempotency key must be a string, not 7"),
        ("m", lambda msg: "", "the idempotency key is empty"),
        ("m", lambda msg: "x" * (MAX_KEY_BYTES + 1), "the idempotency key is too long"),
    ],
)
async def test_a_message_without_a_usable_key_is_dead_lettered_with_the_reason(
    anyio_backend: str,
    store: SQLiteStore,
    message_id: str | None,
    key: Callable[[Message], Any] | None,
    reason: str,
) -> None:
    idem = Idempotency(store) if key is None else Idempotency(store, key=key)
    handler = Handler()
    error = await guard(idem, message(message_id, b"not json"), handler, handler_timeout=None)
    assert isinstance(error, InvalidKey)
    assert reason in str(error)
    assert handler.runs == 0
    outcome = decide(error, attempt=1, retry=sc.Retry())
    assert outcome.kind is OutcomeKind.DEAD_LETTER
    assert outcome.error_type == "strictconsume.idempotency.InvalidKey"


class BrokenStore(SQLiteStore):
    """A store whose claims or completions fail, as an unreachable server's would."""

    fail_claim = False
    fail_complete = False

    async def claim(self, key: str, owner: str, lease: float) -> Claim:
        if self.fail_claim:
            raise StoreError(self.name, "OperationalError: database or disk is full")
        return await super().claim(key, owner, lease)

    async def complete(self, key: str, owner: str, ttl: float) -> None:
        if self.fail_complete:
            raise StoreError(self.name, "OperationalError: database or disk is full")
        await super().complete(key, owner, ttl)


@autojump()
@pytest.mark.parametrize("where", ["claim", "complete"])
async def test_a_failing_store_requeues_the_message_never_acks_it(
    anyio_backend: Any, tmp_path: Path, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = BrokenStore(tmp_path / "k.db", clock=anyio.current_time)
    setattr(store, f"fail_{where}", True)
    handler = Handler()
    started = anyio.current_time()
    error = await guard(Idempotency(store), message(), handler, handler_timeout=None)
    assert isinstance(error, Requeue)
    assert decide(error, attempt=1, retry=sc.Retry()).kind is OutcomeKind.REQUEUE
    assert anyio.current_time() - started == STORE_FAILURE_PAUSE  # no busy redelivery loop
    assert handler.runs == (1 if where == "complete" else 0)
    what = "claimed" if where == "claim" else "marked as handled"
    assert f"could not be {what}: idempotency store sqlite:" in caplog.text
    assert "database or disk is full" in caplog.text
    # the store is back: the redelivery runs and is marked
    setattr(store, f"fail_{where}", False)
    again = Handler()
    if where == "complete":
        await anyio.sleep(DEFAULT_LEASE)  # the claim of the run that was not marked
    assert await guard(Idempotency(store), message(), again, handler_timeout=None) is None
    assert again.runs == 1


# -- the strongest form: the mark in the handler's own transaction --------------------------


async def test_the_mark_commits_with_the_handlers_writes_or_not_at_all(
    anyio_backend: str, tmp_path: Path
) -> None:
    path = tmp_path / "shop.db"
    store = SQLiteStore(path)
    idem = Idempotency(store)
    await store.open()  # creates the table in the shop's database
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("CREATE TABLE stock (item TEXT PRIMARY KEY, count INTEGER)")
    db.execute("INSERT INTO stock VALUES ('apple', 10)")
    db.commit()

    def take_one(msg: Message, fail: bool = False) -> None:
        with db:  # one transaction: the effect and the mark
            idem.mark(db, msg)
            db.execute("UPDATE stock SET count = count - 1 WHERE item = 'apple'")
            if fail:
                raise ValueError("payment failed")

    async def handler(msg: Message, fail: bool = False) -> Exception | None:
        try:
            await anyio.to_thread.run_sync(take_one, msg, fail)
        except Exception as exc:
            return exc
        return None

    def count() -> int:
        return int(db.execute("SELECT count FROM stock").fetchone()[0])

    msg = message("order-1")
    failed = await guard(idem, msg, lambda: handler(msg, fail=True), handler_timeout=None)
    assert isinstance(failed, ValueError)
    assert count() == 10  # rolled back, mark included
    assert await guard(idem, msg, lambda: handler(msg), handler_timeout=None) is None
    assert count() == 9
    dup = await guard(idem, msg, lambda: handler(msg), handler_timeout=None)
    assert isinstance(dup, Duplicate)
    assert count() == 9
    # Without the framework's claim (a crash between the commit and the ack, the
    # claim lost): the mark in the transaction alone refuses the second effect.
    assert isinstance(await handler(msg), Duplicate)
    assert count() == 9
    await store.aclose()
    db.close()


async def test_mark_needs_a_sql_store(anyio_backend: str) -> None:
    class NoSQL:
        name = "memory"

        async def open(self) -> None: ...
        async def aclose(self) -> None: ...
        async def claim(self, key: str, owner: str, lease: float) -> Claim:
            return Claim.CLAIMED

        async def complete(self, key: str, owner: str, ttl: float) -> None: ...
        async def release(self, key: str, owner: str) -> None: ...
        async def purge(self) -> int:
            return 0

    idem = Idempotency(NoSQL())
    with pytest.raises(TypeError, match="memory cannot record a key in the handler's own"):
        idem.mark(None, message())
