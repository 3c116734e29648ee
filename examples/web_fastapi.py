"""A FastAPI service that also consumes a queue, in the same process (asyncio, uvicorn).

Run it with::

    STRICTCONSUME_URL=amqp://guest:guest@127.0.0.1:5673/ uvicorn examples.web_fastapi:api

``POST /orders`` publishes an order (``{"id": "o-1", "slow": 2}``; ``slow`` is optional)
to the queue ``web.orders`` and answers 202 once the broker confirmed it (503 if it did
not within 5 s); the consumer below handles it in the background; ``GET /orders/o-1``
shows its state: ``queued``, ``processing``, ``done``.

The App runs inside the ASGI lifespan: uvicorn serves HTTP once every consumer is
subscribed. On SIGTERM uvicorn stops accepting connections, finishes the requests in
progress, then leaves the lifespan: the App stops intake, gives the running handlers
``grace_period`` seconds, requeues what did not finish and closes its connection.
uvicorn sets no limit on that shutdown (the kill timeout of whatever sends SIGTERM must
cover the requests in progress plus the grace period), then exits by raising SIGTERM
again: status 143, "terminated", rather than 0.

``WEB_EXAMPLE_QUEUE`` overrides the queue name; when ``WEB_EXAMPLE_DONE_FILE`` is set,
the id of every finished order is appended to that file (the tests read it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Literal

import anyio
import anyio.to_thread
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

import strictconsume as sc
from strictconsume.amqp import ConnectionLost

QUEUE = os.environ.get("WEB_EXAMPLE_QUEUE", "web.orders")
DONE_FILE = os.environ.get("WEB_EXAMPLE_DONE_FILE")

# uvicorn configures only its own loggers: show the App's too.
logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")

State = Literal["queued", "processing", "done"]
orders: dict[str, State] = {}  # this process's view; a real service would use a database

consumers = sc.App(grace_period=10.0)


@consumers.consumer(QUEUE, timeout=30.0)
async def handle_order(msg: sc.Message) -> None:
    order = msg.json()  # not JSON -> dead-lettered to web.orders.dlq at once
    if not isinstance(order, dict) or not isinstance(order.get("id"), str):
        raise sc.Reject("an order is a JSON object with a string 'id'")
    orders[order["id"]] = "processing"
    await anyio.sleep(float(order.get("slow", 0)))  # the real work
    orders[order["id"]] = "done"
    if DONE_FILE:
        await anyio.to_thread.run_sync(_record_done, DONE_FILE, order["id"])


def _record_done(path: str, order_id: str) -> None:
    with open(path, "a") as file:
        file.write(f"{order_id}\n")
        file.flush()
        os.fsync(file.fileno())


@contextlib.asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with consumers.running():  # entered once every consumer is subscribed
        yield


api = FastAPI(lifespan=lifespan)
# The App's health and metrics beside the service's routes: /consumers/health/ready
# (200 while connected and subscribed), /consumers/health/live, /consumers/metrics.
api.mount("/consumers", consumers.asgi())


class Order(BaseModel):
    id: str = Field(min_length=1)
    slow: float = Field(default=0.0, ge=0.0, description="seconds the handler takes")


class OrderStatus(BaseModel):
    id: str
    state: State


@api.post("/orders", status_code=202)
async def create_order(order: Order) -> OrderStatus:
    try:
        with anyio.fail_after(5):  # a publish waits while the App reconnects
            async with consumers.publisher() as pub:  # the App's connection; confirmed
                await pub.publish(
                    order.model_dump_json(),
                    routing_key=QUEUE,
                    message_id=order.id,
                    content_type="application/json",
                )
    except (TimeoutError, ConnectionLost):
        # Not confirmed: the order may be queued or not. The client sends it again; a
        # handler that must not run twice recognises it by its message_id.
        raise HTTPException(
            status_code=503, detail="the broker did not confirm the order; send it again"
        ) from None
    state = orders.setdefault(order.id, "queued")  # unless the consumer was quicker
    return OrderStatus(id=order.id, state=state)


@api.get("/orders/{order_id}")
async def get_order(order_id: str) -> OrderStatus:
    state = orders.get(order_id)
    if state is None:
        raise HTTPException(status_code=404, detail=f"no order {order_id!r} seen here")
    return OrderStatus(id=order_id, state=state)
