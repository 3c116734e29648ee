"""A typed RPC server and its client: pydantic bodies, a blocking handler, middleware
and replies over RabbitMQ's direct reply-to.

Run the server, then the client, against a broker::

    export STRICTCONSUME_URL=amqp://guest:guest@127.0.0.1:5673/
    python -m strictconsume examples.rpc:app
    python -m examples.rpc 3 2.5          # asks for a quote: 3 items at 2.50

The handler ``quote`` is a plain ``def`` (it stands for a synchronous pricing
library): it runs in a worker thread, at most 4 at once. A request whose body is not
a valid ``QuoteRequest`` is dead-lettered to ``quotes.dlq`` with the validation
errors; the middleware logs how long each quote took and refuses requests without a
``correlation_id``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import anyio
import pydantic

import strictconsume as sc

logger = logging.getLogger("rpc")


class QuoteRequest(pydantic.BaseModel):
    items: int = pydantic.Field(gt=0)
    unit_price: float = pydantic.Field(ge=0)


class Quote(pydantic.BaseModel):
    total: float
    discount: float


async def timed(msg: sc.Message, call_next: sc.CallNext) -> Any:
    """Refuse anonymous requests; log each quote's duration."""
    if msg.reply_to and not msg.correlation_id:
        raise sc.Reject("a request needs a correlation_id")
    started = time.perf_counter()
    try:
        return await call_next(msg)
    finally:
        logger.info("quote %s took %.3f s", msg.correlation_id, time.perf_counter() - started)


app = sc.App(grace_period=10.0, middleware=[timed])


@app.consumer("quotes", timeout=5.0, concurrency=4, retry=sc.Retry(delays=(0.5,)))
def quote(request: QuoteRequest) -> Quote:
    discount = 0.1 if request.items >= 10 else 0.0
    total = request.items * request.unit_price * (1 - discount)
    return Quote(total=round(total, 2), discount=discount)


async def ask(items: int, unit_price: float) -> Quote:
    """Send one quote request and wait for the reply."""
    async with app.publisher() as pub:
        reply = await pub.request(
            QuoteRequest(items=items, unit_price=unit_price).model_dump_json(),
            routing_key="quotes",
            content_type="application/json",
            timeout=5.0,
        )
    return Quote.model_validate_json(reply.body)


def main(argv: list[str]) -> None:
    items, unit_price = int(argv[0]), float(argv[1])
    print(anyio.run(ask, items, unit_price, backend="trio"))


if __name__ == "__main__":
    main(sys.argv[1:])
