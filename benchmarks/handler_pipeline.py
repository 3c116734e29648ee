"""What a typed body and a middleware stack cost per message, as ratios to the plain
handler measured in the same run.

usage: .venv/bin/python benchmarks/handler_pipeline.py [--calls N] [--messages N]
                                                       [--repeat R] [--no-broker]

Handlers compared (each does no work of its own):

- ``plain``: ``async def h(msg: sc.Message)``, the baseline;
- ``pydantic``: ``async def h(order: Order)``, a pydantic model of 6 fields
  (a nested list of 2 items) decoded from a 230-byte JSON body;
- ``msgspec``: the same as a msgspec ``Struct``;
- ``middleware``: the plain handler inside 3 middleware (a timing ``call_next``, an
  ``@asynccontextmanager`` setting a context variable, a header check);
- ``pydantic+middleware``: both;
- ``def``: a plain ``def`` handler, through a worker thread.

Two measurements, each as the median of R interleaved repetitions (so that a noisy
neighbour on the shared machine hurts every variant alike):

1. **The pipeline alone**, in this process without a broker: N calls of
   ``call_handler`` (what the dispatcher awaits per delivery: the timeout scope, the
   middleware, the decoding, the handler, the reply check) on trio and on asyncio;
   nanoseconds of CPU time per call and the ratio to ``plain``.
2. **Through the App and the broker** (unless ``--no-broker``): an App drains a queue
   of M persistent messages at prefetch 100, on trio and on asyncio; messages per
   second from subscribing to the last handler, and the process's CPU time per
   message (which a busy neighbour disturbs less than the wall clock), each with its
   ratio to ``plain``.

The broker is STRICTCONSUME_URL / AMQP_URL, or the private node of scripts/dev-broker.
Writes ``benchmarks/results/handler_pipeline.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import msgspec
import pydantic

import strictconsume as sc
from strictconsume._dispatch import call_handler
from strictconsume._native import Native
from strictconsume._pipeline import build_pipeline
from strictconsume.amqp import Delivery, Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _broker, client_throughput

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("trio", "asyncio")
BODY = json.dumps(
    {
        "id": 123456,
        "customer": "c-000042",
        "currency": "EUR",
        "total": 129.9,
        "express": False,
        "items": [
            {"sku": "SKU-0001", "quantity": 2, "price": 19.95},
            {"sku": "SKU-0002", "quantity": 1, "price": 90.0},
        ],
    }
).encode()


class Item(pydantic.BaseModel):
    sku: str
    quantity: int = pydantic.Field(gt=0)
    price: float


class Order(pydantic.BaseModel):
    id: int
    customer: str
    currency: str
    total: float
    express: bool
    items: list[Item]


class ItemStruct(msgspec.Struct):
    sku: str
    quantity: int
    price: float


class OrderStruct(msgspec.Struct):
    id: int
    customer: str
    currency: str
    total: float
    express: bool
    items: list[ItemStruct]


# -- the handlers and the middleware ----------------------------------------------------

tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


async def timing(msg: sc.Message, call_next: sc.CallNext) -> Any:
    started = time.perf_counter()
    try:
        return await call_next(msg)
    finally:
        time.perf_counter() - started


@contextlib.asynccontextmanager
async def bind_tenant(msg: sc.Message) -> AsyncIterator[None]:
    token = tenant.set(msg.message_id)
    try:
        yield
    finally:
        tenant.reset(token)


async def gate(msg: sc.Message, call_next: sc.CallNext) -> Any:
    if msg.headers.get("tenant") == "blocked":
        raise sc.Reject("blocked")
    return await call_next(msg)


MIDDLEWARE = (timing, bind_tenant, gate)


async def plain(msg: sc.Message) -> None:
    pass


async def typed(order: Order) -> None:
    pass


async def typed_struct(order: OrderStruct) -> None:
    pass


def blocking(msg: sc.Message) -> None:
    pass


#: variant -> (handler, consumer middleware)
VARIANTS: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {
    "plain": (plain, ()),
    "pydantic": (typed, ()),
    "msgspec": (typed_struct, ()),
    "middleware": (plain, MIDDLEWARE),
    "pydantic+middleware": (typed, MIDDLEWARE),
    "def": (blocking, ()),
}
#: The variants run through the broker (the def handler's cost is the thread hop).
BROKER_VARIANTS = ("plain", "pydantic", "middleware", "pydantic+middleware", "def")


# -- 1. the pipeline alone --------------------------------------------------------------


def message() -> sc.Message:
    delivery = Delivery(
        channel_id=1,
        consumer_tag="bench",
        delivery_tag=1,
        redelivered=False,
        exchange="",
        routing_key="orders",
        properties=Properties(content_type="application/json", message_id="m-1"),
        body=BODY,
    )
    return sc.Message.from_delivery(delivery, "orders")


async def _replier(reply: Any) -> None:
    raise AssertionError("no message here carries reply_to")


async def pipeline_ns(variant: str, calls: int) -> float:
    """CPU nanoseconds per call_handler of ``variant`` (with a timeout, as in the App)."""
    handler, middleware = VARIANTS[variant]
    spec = sc.ConsumerSpec("orders", handler, timeout=30.0, middleware=middleware, prefetch=100)
    pipeline = build_pipeline(spec, reply=_replier)
    msg = message()
    native = Native()  # as the dispatcher: the loop's primitives, looked up once
    for _ in range(min(calls, 500)):  # warm up
        assert await call_handler(spec, msg, pipeline=pipeline, native=native) is None
    started = time.process_time()
    for _ in range(calls):
        await call_handler(spec, msg, pipeline=pipeline, native=native)
    return (time.process_time() - started) / calls * 1e9


# -- 2. through the App and the broker --------------------------------------------------


def fill(url: str, queue: str, n: int) -> None:
    """``n`` persistent JSON orders in ``queue``, declared as the App declares it."""
    from client_throughput import fill as fill_queue

    dead_letter = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"}
    fill_queue(url, queue, n, body=BODY, arguments=dead_letter, content_type="application/json")


def delete(url: str, queue: str) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    for name in (queue, f"{queue}.dlq"):
        channel.queue_delete(name)
    conn.close()


def app_rate(
    url: str, queue: str, variant: str, n: int, backend: str, *, tracing: Any = False
) -> tuple[float, float]:
    """Messages per second an App drains ``queue`` (holding ``n``) with ``variant``,
    and the process's CPU microseconds per message meanwhile. ``tracing``: the App's
    (off unless given: see benchmarks/tracing.py)."""
    handler, middleware = VARIANTS[variant]
    app = sc.App(url, prefetch=100, tracing=tracing)
    spec = sc.ConsumerSpec(queue, handler, timeout=30.0, middleware=middleware)
    return drain(app, spec, n, backend)


def drain(app: sc.App, spec: sc.ConsumerSpec, n: int, backend: str) -> tuple[float, float]:
    """Run ``app`` with the consumer ``spec`` until ``n`` of its handler calls have
    returned; messages per second from the App's start (consumers subscribed) to the
    ``n``-th return, and the process's CPU microseconds per message meanwhile. The
    App must have acked ``n`` messages of ``spec.queue`` by its stop."""
    queue = spec.queue
    count = 0
    done: anyio.Event | None = None

    async def counted(msg: sc.Message, call_next: sc.CallNext) -> Any:
        nonlocal count
        result = await call_next(msg)
        count += 1
        if count == n:
            assert done is not None
            done.set()
        return result

    # the counter is the innermost middleware: one more call for every variant alike
    app.add_consumer(attrs.evolve(spec, middleware=(*spec.middleware, counted)))

    async def main() -> tuple[float, float]:
        nonlocal done
        done = anyio.Event()
        async with app.running():
            started, cpu = time.perf_counter(), time.process_time()
            await done.wait()
            return n / (time.perf_counter() - started), (time.process_time() - cpu) / n * 1e6

    acked_before = app.outcomes[queue, "ack"]
    rate = anyio.run(main, backend=backend)
    acked = app.outcomes[queue, "ack"] - acked_before
    if acked != n:
        raise SystemExit(f"{queue}: acked {acked} of {n}")
    return rate


# -- the run ----------------------------------------------------------------------------


def ratios(
    figures: dict[str, list[float]], *, lower_is_better: bool, baseline: str = "plain"
) -> dict[str, Any]:
    medians = {variant: statistics.median(values) for variant, values in figures.items()}
    base = medians[baseline]
    return {
        variant: {
            "median": round(value, 1),
            "min": round(min(figures[variant]), 1),
            "max": round(max(figures[variant]), 1),
            f"ratio_to_{baseline}": round(value / base if lower_is_better else base / value, 2),
        }
        for variant, value in medians.items()
    }


def show(title: str, result: dict[str, Any], *, decimals: int = 0) -> None:
    print(f"   {title} (median [min-max]); cost as a ratio to the first", flush=True)
    d = decimals
    for variant, row in result.items():
        ratio = next(value for key, value in row.items() if key.startswith("ratio_to_"))
        print(
            f"     {variant:<20} {row['median']:>9.{d}f} [{row['min']:.{d}f}-{row['max']:.{d}f}]"
            f"  x{ratio:.2f}"
        )


def compare_through_app(
    doc: dict[str, Any],
    url: str,
    queue: str,
    variants: Sequence[str],
    drain: Callable[[str, str], tuple[float, float]],
    *,
    messages: int,
    repeat: int,
    baseline: str = "plain",
    fill_queue: Callable[[str, str, int], None] | None = None,
) -> None:
    """On each backend, fill ``queue`` with ``messages`` (by ``fill_queue``, default
    :func:`fill`) and ``drain(variant, backend)`` it (messages per second, CPU us per
    message), the variants interleaved ``repeat`` times; the ratios to ``baseline`` go
    into ``doc`` and are shown. The queue is deleted at the end."""
    fill_queue = fill_queue or fill
    try:
        for backend in BACKENDS:
            fill_queue(url, queue, 500)  # a warm-up drain, not measured
            app_rate(url, queue, "plain", 500, backend)
            rates: dict[str, list[float]] = {variant: [] for variant in variants}
            cpu: dict[str, list[float]] = {variant: [] for variant in variants}
            for _ in range(repeat):
                for variant in variants:
                    fill_queue(url, queue, messages)
                    rate, us = drain(variant, backend)
                    rates[variant].append(rate)
                    cpu[variant].append(us)
            doc[f"app_rate_{backend}"] = result = ratios(
                rates, lower_is_better=False, baseline=baseline
            )
            show(f"{backend}: messages per second", result)
            doc[f"app_cpu_us_{backend}"] = result = ratios(
                cpu, lower_is_better=True, baseline=baseline
            )
            show(f"{backend}: CPU us per message", result, decimals=1)
    finally:
        delete(url, queue)


def write_results(doc: dict[str, Any], name: str) -> None:
    """Write ``doc`` as ``benchmarks/results/<name>``."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / name
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-broker", action="store_true")
    args = parser.parse_args()
    doc: dict[str, Any] = {"calls": args.calls, "messages": args.messages, "repeat": args.repeat}

    print(f"1. the pipeline alone: {args.calls} calls, {args.repeat} repetitions", flush=True)
    for backend in BACKENDS:
        figures: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeat):
            for variant in VARIANTS:
                figures[variant].append(
                    anyio.run(pipeline_ns, variant, args.calls, backend=backend)
                )
        doc[f"pipeline_ns_{backend}"] = result = ratios(figures, lower_is_better=True)
        show(f"{backend}: CPU ns per call", result)

    if not args.no_broker:
        from _broker import broker_url

        url = broker_url()
        queue = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
        print(f"2. through the App: {args.messages} messages, prefetch 100", flush=True)
        compare_through_app(
            doc,
            url,
            queue,
            BROKER_VARIANTS,
            lambda variant, backend: app_rate(url, queue, variant, args.messages, backend),
            messages=args.messages,
            repeat=args.repeat,
        )

    write_results(doc, "handler_pipeline.json")


if __name__ == "__main__":
    main()
