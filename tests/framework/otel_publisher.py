"""A publishing process for the trace-context tests: sets up the OpenTelemetry SDK
(a global tracer provider, each finished span written to a file as one JSON line),
then publishes one message through ``app.publisher()`` with baggage in its context.

usage: python -m tests.framework.otel_publisher URL QUEUE MESSAGE_ID SPANS_FILE
"""

from __future__ import annotations

import sys

import anyio
from opentelemetry import baggage, context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

import strictconsume as sc


def one_line(span: ReadableSpan) -> str:
    return str(span.to_json(indent=None)) + "\n"


async def publish(url: str, queue: str, message_id: str) -> None:
    # no tracing= argument: the App finds the provider set below by itself
    app = sc.App(url=url)
    token = context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        async with app.publisher() as pub:
            await pub.publish(b'{"n": 1}', routing_key=queue, message_id=message_id)
    finally:
        context.detach(token)


def main() -> None:
    url, queue, message_id, spans_file = sys.argv[1:]
    with open(spans_file, "w") as out:
        provider = TracerProvider()
        provider.add_span_processor(
            SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=one_line))
        )
        trace.set_tracer_provider(provider)
        anyio.run(publish, url, queue, message_id)
        provider.shutdown()


if __name__ == "__main__":
    main()
