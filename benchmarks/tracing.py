"""What trace context (OpenTelemetry) costs per message, as ratios to the same App
with tracing off, measured in the same run.

usage: .venv/bin/python benchmarks/tracing.py [--calls N] [--messages N] [--repeat R]
                                              [--no-broker]

Tracing on means the OpenTelemetry SDK's ``TracerProvider`` (sampling every trace)
with a ``BatchSpanProcessor`` whose exporter drops the spans: what an application
pays in-process before its exporter's own cost (which depends on where spans go).
Every message carries a ``traceparent`` header, as one published by a traced service.

Variants:

- ``off``: ``App(tracing=False)``: the dispatcher's one check per message;
- ``on``: the consumer span (context extracted from the headers, attributes, the span
  current through the handler and the settlement, its outcome), on the plain handler;
- ``on, sampled out``: the same with a sampler that records nothing (``ALWAYS_OFF``:
  what most messages cost a service that samples a small share of its traces).

1. **Per delivery, without a broker**: N times what the dispatcher runs for a message
   (the span, when on, around ``call_handler`` and the outcome), on trio and asyncio;
   CPU nanoseconds per message and the ratio to ``off``.
2. **Through the App and the broker** (unless ``--no-broker``): an App drains M
   persistent messages at prefetch 100 (see benchmarks/handler_pipeline.py); messages
   per second and CPU microseconds per message, with their ratios to ``off``.

Writes ``benchmarks/results/tracing.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import strictconsume as sc
from strictconsume._dispatch import call_handler
from strictconsume._native import Native
from strictconsume._outcome import Outcome, OutcomeKind
from strictconsume._pipeline import build_pipeline
from strictconsume._tracing import Tracing, resolve_tracing
from strictconsume.amqp import Delivery, Properties

sys.path.insert(0, str(Path(__file__).resolve().parent))  # handler_pipeline, _broker

from handler_pipeline import (
    BACKENDS,
    BODY,
    app_rate,
    compare_through_app,
    plain,
    ratios,
    show,
    write_results,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
VARIANTS = ("off", "on", "on, sampled out")


class Dropped(SpanExporter):
    """Takes the batches and keeps nothing."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def provider(variant: str) -> TracerProvider | None:
    if variant == "off":
        return None
    made = TracerProvider() if variant == "on" else TracerProvider(sampler=ALWAYS_OFF)
    made.add_span_processor(BatchSpanProcessor(Dropped()))
    return made


def message() -> sc.Message:
    delivery = Delivery(
        channel_id=1,
        consumer_tag="bench",
        delivery_tag=1,
        redelivered=False,
        exchange="",
        routing_key="orders",
        properties=Properties(
            content_type="application/json",
            message_id="m-1",
            headers={"traceparent": TRACEPARENT},
        ),
        body=BODY,
    )
    return sc.Message.from_delivery(delivery, "orders")


# -- 1. per delivery --------------------------------------------------------------------


async def delivery_ns(tracing: Tracing | None, calls: int) -> float:
    """CPU nanoseconds per message of what the dispatcher runs around the handler."""
    spec = sc.ConsumerSpec("orders", plain, timeout=30.0, prefetch=100)
    pipeline = build_pipeline(spec, tracing=tracing)
    msg = message()
    native = Native()
    acked = Outcome(OutcomeKind.ACK)

    async def one() -> None:
        # as Dispatcher._handle and _record
        if pipeline.tracing is None:
            await call_handler(spec, msg, pipeline=pipeline, native=native)
            return
        with pipeline.tracing.delivery(msg):
            await call_handler(spec, msg, pipeline=pipeline, native=native)
            pipeline.tracing.outcome(acked, None)

    for _ in range(min(calls, 500)):  # warm up
        await one()
    started = time.process_time()
    for _ in range(calls):
        await one()
    return (time.process_time() - started) / calls * 1e9


# -- 2. through the App and the broker --------------------------------------------------


def fill(url: str, queue: str, n: int) -> None:
    """``n`` persistent messages, each with a traceparent, as the App declares it."""
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.queue_declare(
        queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.dlq"},
    )
    properties = pika.BasicProperties(
        delivery_mode=2,
        content_type="application/json",
        headers={"traceparent": TRACEPARENT},
    )
    for _ in range(n):
        channel.basic_publish("", queue, BODY, properties)
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-broker", action="store_true")
    args = parser.parse_args()
    doc: dict[str, Any] = {"calls": args.calls, "messages": args.messages, "repeat": args.repeat}
    providers = {variant: provider(variant) for variant in VARIANTS}

    print(f"1. per delivery: {args.calls} messages, {args.repeat} repetitions", flush=True)
    for backend in BACKENDS:
        figures: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeat):
            for variant in VARIANTS:
                tracing = resolve_tracing(providers[variant] or False)
                figures[variant].append(
                    anyio.run(delivery_ns, tracing, args.calls, backend=backend)
                )
        doc[f"delivery_ns_{backend}"] = result = ratios(
            figures, lower_is_better=True, baseline="off"
        )
        show(f"{backend}: CPU ns per message", result)

    if not args.no_broker:
        from _broker import broker_url

        url = broker_url()
        queue = f"bench-tracing-{uuid.uuid4().hex[:8]}"
        print(f"2. through the App: {args.messages} messages, prefetch 100", flush=True)
        compare_through_app(
            doc,
            url,
            queue,
            VARIANTS,
            lambda variant, backend: app_rate(
                url, queue, "plain", args.messages, backend, tracing=providers[variant] or False
            ),
            messages=args.messages,
            repeat=args.repeat,
            baseline="off",
            fill_queue=fill,  # with a traceparent on every message
        )
    for made in providers.values():
        if made is not None:
            made.shutdown()

    write_results(doc, "tracing.json")


if __name__ == "__main__":
    main()
