"""The App's side of the stores: open each one at start-up, close it at the end."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from .._supervisor import StartupError
from ._core import StoreError

if TYPE_CHECKING:
    from .._consumer import ConsumerSpec
    from ._core import IdempotencyStore

__all__ = ["open_stores"]

logger = logging.getLogger("strictconsume")


@contextlib.asynccontextmanager
async def open_stores(specs: Iterable[ConsumerSpec]) -> AsyncIterator[None]:
    """Open the idempotency store of every consumer (each store once) for the block.

    Raises:
        StartupError: a store cannot be opened (unreachable, a file that cannot be
            created); the message names it.
    """
    stores: dict[int, tuple[IdempotencyStore, list[str]]] = {}
    for spec in specs:
        if spec.idempotency is not None:
            store = spec.idempotency.store
            stores.setdefault(id(store), (store, []))[1].append(spec.queue)
    async with contextlib.AsyncExitStack() as stack:
        for store, queues in stores.values():
            try:
                await store.open()
            except StoreError as exc:
                raise StartupError(
                    f"{exc} (the idempotency store of queue(s) {', '.join(map(repr, queues))}); "
                    "start it or fix its address, then start the App again"
                ) from exc
            stack.push_async_callback(store.aclose)
            logger.info(
                "idempotency store %s opened for queue(s) %s",
                store.name,
                ", ".join(map(repr, queues)),
                extra={"event": "idempotency_store_opened"},
            )
        yield
