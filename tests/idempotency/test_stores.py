"""The store interface, the same for each store: SQLite, PostgreSQL and Redis (the
last two against private servers of scripts/dev-services, marked ``services``).

Times are real here (Redis expires keys on its own clock), kept short: leases of
0.3 s, a ttl of 0.6 s."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from strictconsume.idempotency import Claim, Idempotency, IdempotencyStore, StoreError
from strictconsume.idempotency._core import guard

from .test_guard import Handler, message

pytestmark = pytest.mark.anyio

LEASE = 0.3
TTL = 0.6


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.services),
        pytest.param("redis", id="redis", marks=pytest.mark.services),
    ]
)
async def any_store(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[IdempotencyStore]:
    store: Any
    table = f"idem_{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        from strictconsume.idempotency import SQLiteStore

        store = SQLiteStore(tmp_path / "k.db", table=table, purge_interval=0.0)
    elif request.param == "postgres":
        from strictconsume.idempotency import PostgresStore

        url = request.getfixturevalue("postgres_url")
        store = PostgresStore(url, table=table, purge_interval=0.0)
    else:
        from strictconsume.idempotency import RedisStore

        store = RedisStore(request.getfixturevalue("redis_url"), prefix=f"{table}:")
    await store.open()
    yield store
    if request.param == "postgres":
        await store._run(lambda conn: conn.execute(f"DROP TABLE {table}"))
    await store.aclose()


async def test_claims_done_keys_leases_and_expiry(any_store: IdempotencyStore) -> None:
    store = any_store
    assert await store.claim("k", "a", LEASE) is Claim.CLAIMED
    assert await store.claim("k", "b", LEASE) is Claim.BUSY
    await anyio.sleep(LEASE + 0.1)  # a dead consumer's claim ends with its lease
    assert await store.claim("k", "b", LEASE) is Claim.CLAIMED
    await store.release("k", "a")  # not a's claim any more: nothing happens
    assert await store.claim("k", "c", LEASE) is Claim.BUSY
    await store.complete("k", "b", TTL)
    assert await store.claim("k", "c", LEASE) is Claim.DONE
    await store.release("k", "b")  # a done key is never released
    assert await store.claim("k", "c", LEASE) is Claim.DONE
    await anyio.sleep(TTL + 0.1)
    assert await store.claim("k", "c", LEASE) is Claim.CLAIMED
    await store.release("k", "c")
    assert await store.claim("k", "d", LEASE) is Claim.CLAIMED
    assert await store.purge() >= 0


async def test_the_guard_skips_a_duplicate_with_each_store(any_store: IdempotencyStore) -> None:
    idem = Idempotency(any_store)
    first, second, failing = Handler(), Handler(), Handler(ValueError("x"))
    assert await guard(idem, message("x-1"), failing, handler_timeout=None) is not None
    assert await guard(idem, message("x-1"), first, handler_timeout=None) is None
    duplicate = await guard(idem, message("x-1"), second, handler_timeout=None)
    assert type(duplicate).__name__ == "Duplicate"
    assert (failing.runs, first.runs, second.runs) == (1, 1, 0)


@pytest.mark.services
async def test_an_unreachable_server_is_a_store_error_naming_it(anyio_backend: str) -> None:
    from strictconsume.idempotency import PostgresStore, RedisStore

    with socket_port() as port:
        stores: list[Any] = [
            PostgresStore(f"postgresql://app:secret-pw@127.0.0.1:{port}/x", connect_timeout=2),
            RedisStore(f"redis://:secret-pw@127.0.0.1:{port}/0", socket_timeout=2),
        ]
        for store in stores:
            with pytest.raises(StoreError) as info:
                await store.open()
            text = str(info.value)
            assert f"127.0.0.1:{port}" in text
            assert "secret-pw" not in text
            assert text.startswith(f"idempotency store {store.name}")


class socket_port:
    """A loopback port where nothing listens, for the duration of the block."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None
