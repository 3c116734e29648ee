"""A Starlette service that also consumes a queue, in the same process, on trio.

Run it with hypercorn's trio worker (or its asyncio one: the code is the same)::

    STRICTCONSUME_URL=amqp://guest:guest@127.0.0.1:5673/ \\
        hypercorn --worker-class trio examples.web_trio:api

``POST /orders`` publishes an order (``{"id": "o-1", "slow": 2}``; ``slow`` is optional)
to the queue ``web.orders`` and answers 202 once the broker confirmed it (503 if it did
not within 5 s); the consumer below handles it in the background; ``GET /orders/o-1``
shows its state: ``queued``, ``processing``, ``done``.

The App runs inside the ASGI lifespan: hypercorn serves HTTP once every consumer is
subscribed. On SIGTERM hypercorn stops accepting connections, gives the open ones
``--graceful-timeout`` seconds (3 by default), then leaves the lifespan: the App stops
intake, gives the running handlers ``grace_period`` seconds, requeues what did not
finish and closes its connection. Hypercorn allows the lifespan shutdown
``shutdown_timeout`` seconds (60 by default, set in a ``--config`` file): keep the
grace period below it.

``WEB_EXAMPLE_QUEUE`` overrides the queue name; when ``WEB_EXAMPLE_DONE_FILE`` is set,
the id of every finished order is appended to that file (the tests read it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Literal

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import strictconsume as sc
from strictconsume.amqp import ConnectionLost

QUEUE = os.environ.get("WEB_EXAMPLE_QUEUE", "web.orders")
DONE_FILE = os.environ.get("WEB_EXAMPLE_DONE_FILE")

# hypercorn configures only its own loggers: show the App's too.
_log_handler = logging.StreamHandler()
_log_handler.setFormatter(logging.Formatter("[%(levelname)s] %(name)s: %(message)s"))
logging.getLogger("strictconsume").addHandler(_log_handler)
logging.getLogger("strictconsume").setLevel(logging.INFO)

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


async def create_order(request: Request) -> JSONResponse:
    try:
        order = await request.json()
    except json.JSONDecodeError:
        return JSONResponse({"detail": "the body is not JSON"}, status_code=422)
    if not isinstance(order, dict) or not isinstance(order.get("id"), str) or not order["id"]:
        return JSONResponse({"detail": "an order needs a string 'id'"}, status_code=422)
    slow = order.get("slow", 0)
    if isinstance(slow, bool) or not isinstance(slow, int | float) or slow < 0:
        return JSONResponse({"detail": "'slow' is a number of seconds"}, status_code=422)
    order_id: str = order["id"]
    try:
        with anyio.fail_after(5):  # a publish waits while the App reconnects
            async with consumers.publisher() as pub:  # the App's connection; confirmed
                await pub.publish(
                    json.dumps({"id": order_id, "slow": slow}),
                    routing_key=QUEUE,
                    message_id=order_id,
                    content_type="application/json",
                )
    except (TimeoutError, ConnectionLost):
        # Not confirmed: the order may be queued or not. The client sends it again; a
        # handler that must not run twice recognises it by its message_id.
        return JSONResponse(
            {"detail": "the broker did not confirm the order; send it again"}, status_code=503
        )
    state = orders.setdefault(order_id, "queued")  # unless the consumer was quicker
    return JSONResponse({"id": order_id, "state": state}, status_code=202)


async def get_order(request: Request) -> JSONResponse:
    order_id: str = request.path_params["order_id"]
    state = orders.get(order_id)
    if state is None:
        return JSONResponse({"detail": f"no order {order_id!r} seen here"}, status_code=404)
    return JSONResponse({"id": order_id, "state": state})


@contextlib.asynccontextmanager
async def lifespan(_: Starlette) -> AsyncIterator[None]:
    async with consumers.running():  # entered once every consumer is subscribed
        yield


api = Starlette(
    routes=[
        Route("/orders", create_order, methods=["POST"]),
        Route("/orders/{order_id}", get_order, methods=["GET"]),
        # The App's health and metrics: /consumers/health/ready, .../live, /metrics.
        Mount("/consumers", consumers.asgi()),
    ],
    lifespan=lifespan,
)
