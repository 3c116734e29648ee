"""An order-processing consumer: the example that ``scripts/demo`` runs.

Run it against a broker with::

    STRICTCONSUME_URL=amqp://guest:guest@127.0.0.1:5673/ python -m strictconsume examples.orders:app

Orders arrive as JSON on the topic exchange ``shop`` (routing keys ``order.*``) and
land in the durable queue ``orders``. What happens to each one follows the outcome
table: a good order is acked; a payment-gateway hiccup is retried after 0.5 s, then
1 s, then dead-lettered; an order with a bad quantity is rejected straight to
``orders.dlq``; a body that is not JSON is dead-lettered without retries.
"""

from __future__ import annotations

import logging

import anyio

import strictconsume as sc

logger = logging.getLogger("orders")

app = sc.App(grace_period=10.0, prefetch=20)


class PaymentGatewayDown(Exception):
    """A transient failure: worth a retry."""


@app.consumer(
    "orders",
    timeout=20.0,
    retry=sc.Retry(delays=(0.5, 1.0)),
    bindings=[sc.Binding("shop", routing_key="order.*", exchange_type="topic")],
)
async def handle_order(msg: sc.Message) -> None:
    order = msg.json()  # not JSON -> DecodeError -> dead-lettered at once
    if not isinstance(order, dict) or not isinstance(order.get("quantity"), int):
        raise sc.Reject("an order is a JSON object with an integer 'quantity'")
    if order["quantity"] <= 0:
        raise sc.Reject(f"quantity must be positive, got {order['quantity']}")
    if order.get("gateway") == "flaky" and msg.attempt == 1:
        raise PaymentGatewayDown("the payment gateway timed out")
    # Real work would call services here; a big order takes a while.
    await anyio.sleep(3.0 if order.get("size") == "large" else 0.05)
    logger.info(
        "order %s handled: %d x %s (routing key %s, attempt %d)",
        order.get("id"),
        order["quantity"],
        order.get("item", "?"),
        msg.routing_key,
        msg.attempt,
    )
