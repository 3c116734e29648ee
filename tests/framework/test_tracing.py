"""Trace context (OpenTelemetry): the consumer span of a delivery, the producer span of
a publish, the W3C headers on retry and dead-letter copies, and the trace and span
ids on log lines.

Without a broker: when tracing is on, the logging filter and formatters, the copies'
headers. Against the real broker: a message published by another process (the SDK
set up there, its spans written to a file) is handled here (the SDK's in-memory
exporter), retried once and dead-lettered, all in one trace; pika reads the
dead-letter queue's copy.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import strictconsume as sc
from strictconsume import TraceContextFilter, TraceContextFormatter
from strictconsume._cli import JSONFormatter, configure_logging
from strictconsume._copies import dead_letter_headers, retry_headers
from strictconsume._outcome import Outcome, OutcomeKind
from strictconsume._pipeline import build_pipeline
from strictconsume._tracing import resolve_tracing
from strictconsume.amqp import Delivery, Properties

from ..amqp.oracle import Oracle
from ..conftest import REPO
from .polling import wait_for_count


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def _message(headers: dict[str, Any] | None = None) -> sc.Message:
    delivery = Delivery(
        channel_id=1,
        consumer_tag="ctag",
        delivery_tag=7,
        redelivered=False,
        exchange="",
        routing_key="orders",
        properties=Properties(headers=headers, message_id="m-1", correlation_id="c-1"),
        body=b"{}",
    )
    return sc.Message.from_delivery(delivery, "orders")


def _hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


# -- without a broker ------------------------------------------------------------------


def test_off_unless_a_tracer_provider_is_set_or_tracing_asked_for(
    provider: TracerProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    assert resolve_tracing(None) is None
    assert resolve_tracing(False) is None
    assert resolve_tracing(True) is not None  # on, with the API's no-op provider
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    assert resolve_tracing(None) is not None
    assert resolve_tracing(False) is None


def test_tracing_asked_for_without_the_api_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import fails
    assert resolve_tracing(None) is None
    with pytest.raises(RuntimeError, match=r"pip install 'strictconsume\[otel\]'"):
        resolve_tracing(True)


def test_consumer_span_parent_link_attributes_and_outcome(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracing = resolve_tracing(provider)
    assert tracing is not None
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    msg = _message({"traceparent": parent, "tracestate": "vendor=1", "baggage": "tenant=acme"})
    with tracing.delivery(msg):
        assert baggage.get_baggage("tenant") == "acme"
        copy = retry_headers(msg)
        tracing.outcome(Outcome(OutcomeKind.RETRY, delay=1.0), ValueError("no stock"))
    (span,) = exporter.get_finished_spans()
    trace_id, span_id = _hex_ids(span)
    assert span.name == "process orders"
    assert span.kind is trace.SpanKind.CONSUMER
    assert trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert [format(link.context.span_id, "016x") for link in span.links] == ["b7ad6b7169203331"]
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "",
        "messaging.rabbitmq.destination.routing_key": "orders",
        "messaging.rabbitmq.message.delivery_tag": 7,
        "messaging.message.id": "m-1",
        "messaging.message.conversation_id": "c-1",
        "messaging.message.body.size": 2,
        "strictconsume.queue": "orders",
        "strictconsume.attempt": 1,
        "strictconsume.outcome": "retry",
        "error.type": "ValueError",
    }
    assert span.status.status_code is trace.StatusCode.ERROR
    # the retry copy carries this span's context on (and the tracestate and baggage)
    assert copy["traceparent"] == f"00-{trace_id}-{span_id}-01"
    assert copy["tracestate"] == "vendor=1"
    assert copy["baggage"] == "tenant=acme"


@pytest.mark.anyio
async def test_a_def_handler_in_its_worker_thread_runs_inside_the_consumer_span(
    provider: TracerProvider,
) -> None:
    tracing = resolve_tracing(provider)
    assert tracing is not None
    seen: list[int] = []

    def handle(msg: sc.Message) -> None:
        seen.append(trace.get_current_span().get_span_context().span_id)

    pipeline = build_pipeline(sc.ConsumerSpec("orders", handle), tracing=tracing)
    msg = _message()
    with tracing.delivery(msg) as span:
        await pipeline(msg)
    assert pipeline.blocking
    assert seen == [span.get_span_context().span_id]


def test_no_span_current_no_trace_headers_on_copies() -> None:
    msg = _message({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    dead = dead_letter_headers(msg, Outcome(OutcomeKind.DEAD_LETTER, error_type="X"))
    assert "traceparent" not in retry_headers(msg)
    assert "traceparent" not in dead


def test_log_lines_carry_the_ids_of_the_current_span_text_and_json(
    provider: TracerProvider,
) -> None:
    text, data = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(data)]
    handlers[0].setFormatter(TraceContextFormatter("%(levelname)s %(message)s"))
    handlers[1].setFormatter(JSONFormatter())
    log = logging.getLogger("tests.tracing.unit")
    log.propagate = False
    for handler in handlers:
        handler.addFilter(TraceContextFilter())
        log.addHandler(handler)
    try:
        log.warning("outside")
        with provider.get_tracer("t").start_as_current_span("s") as span:
            log.warning("inside")
    finally:
        for handler in handlers:
            log.removeHandler(handler)
    trace_id = format(span.get_span_context().trace_id, "032x")
    span_id = format(span.get_span_context().span_id, "016x")
    assert text.getvalue().splitlines() == [
        "WARNING outside",
        f"WARNING inside trace_id={trace_id} span_id={span_id}",
    ]
    outside, inside = (json.loads(line) for line in data.getvalue().splitlines())
    assert "trace_id" not in outside
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_command_lines_logging_writes_the_ids(
    provider: TracerProvider, log_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", log_format)
        with provider.get_tracer("t").start_as_current_span("s") as span:
            logging.getLogger("tests.tracing.cli").info("inside")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    trace_id = format(span.get_span_context().trace_id, "032x")
    span_id = format(span.get_span_context().span_id, "016x")
    (line,) = capsys.readouterr().err.splitlines()
    if log_format == "json":
        assert (json.loads(line)["trace_id"], json.loads(line)["span_id"]) == (trace_id, span_id)
    else:
        assert line.endswith(f"tests.tracing.cli: inside trace_id={trace_id} span_id={span_id}")


# -- against the broker ----------------------------------------------------------------


def _spans_from(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.broker
@pytest.mark.anyio
async def test_publish_in_another_process_handling_retry_and_dlq_are_one_trace(
    broker_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    queue = f"sc-otel-{uuid.uuid4().hex}"
    message_id = uuid.uuid4().hex
    oracle = Oracle(broker_url)
    app = sc.App(url=broker_url, grace_period=1.0, tracing=provider)
    handled: list[tuple[str | None, str, str]] = []  # baggage, trace id, span id
    log = logging.getLogger("tests.tracing.handler")

    @app.consumer(queue, retry=sc.Retry(delays=(0.2,)), timeout=5.0)
    async def handle(msg: sc.Message) -> None:
        context = trace.get_current_span().get_span_context()
        handled.append(
            (
                str(baggage.get_baggage("tenant")),
                format(context.trace_id, "032x"),
                format(context.span_id, "016x"),
            )
        )
        log.warning("handling message %s", msg.message_id)
        raise ValueError("out of stock")

    text, data = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(data)]
    handlers[0].setFormatter(TraceContextFormatter("%(name)s %(message)s"))
    handlers[1].setFormatter(JSONFormatter())
    root = logging.getLogger()
    for handler in handlers:
        handler.addFilter(TraceContextFilter())
        root.addHandler(handler)
    spans_file = tmp_path / "spans.jsonl"
    try:
        async with app.running():
            await anyio.run_process(
                [
                    sys.executable,
                    "-m",
                    "tests.framework.otel_publisher",
                    broker_url,
                    queue,
                    message_id,
                    str(spans_file),
                ],
                cwd=REPO,
            )
            await wait_for_count(oracle, f"{queue}.dlq", 1)
        dead = await oracle.get(f"{queue}.dlq")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        for name in (queue, f"{queue}.dlq", f"{queue}.retry.200"):
            oracle.delete_now(name)

    # the other process: one producer span, its context in the message's headers
    (published,) = _spans_from(spans_file)
    assert published["name"] == f"publish {queue}"
    assert published["kind"] == "SpanKind.PRODUCER"
    assert published["attributes"]["messaging.system"] == "rabbitmq"
    assert published["attributes"]["messaging.rabbitmq.destination.routing_key"] == queue
    assert published["attributes"]["messaging.message.id"] == message_id
    trace_id = published["context"]["trace_id"].removeprefix("0x")
    producer_id = published["context"]["span_id"].removeprefix("0x")

    # here: attempt 1 (child of the publish), attempt 2 (child of attempt 1)
    first, second = sorted(
        (s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.CONSUMER),
        key=lambda s: s.start_time or 0,
    )
    assert [_hex_ids(s)[0] for s in (first, second)] == [trace_id, trace_id]
    assert first.parent is not None
    assert second.parent is not None
    assert format(first.parent.span_id, "016x") == producer_id
    assert format(second.parent.span_id, "016x") == _hex_ids(first)[1]
    assert first.attributes is not None
    assert second.attributes is not None
    assert (
        first.attributes["strictconsume.attempt"],
        second.attributes["strictconsume.attempt"],
    ) == (1, 2)
    assert first.attributes["strictconsume.outcome"] == "retry"
    assert second.attributes["strictconsume.outcome"] == "dead_letter"
    assert second.attributes["error.type"] == "ValueError"
    assert first.attributes["messaging.message.id"] == message_id
    # the handler ran inside each span, with the producer's baggage
    assert handled == [
        ("acme", trace_id, _hex_ids(first)[1]),
        ("acme", trace_id, _hex_ids(second)[1]),
    ]

    # the dead letter points at the last attempt
    assert dead is not None
    assert dead.headers is not None
    traceparent = dead.headers["traceparent"]
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode()
    assert traceparent.startswith(f"00-{trace_id}-{_hex_ids(second)[1]}-")  # flags: sampled
    assert int(traceparent[-2:], 16) & 1
    assert dead.headers["x-error-type"] in (b"ValueError", "ValueError")

    # every log line about the message carries the ids of its attempt's span
    span_of_attempt = {1: _hex_ids(first)[1], 2: _hex_ids(second)[1]}
    lines = [json.loads(line) for line in data.getvalue().splitlines()]
    about = [line for line in lines if message_id in line["message"]]
    assert {line["logger"] for line in about} == {"tests.tracing.handler", "strictconsume"}
    assert len(about) == 4  # the handler's line and the dispatcher's, per attempt
    for line in about:
        assert line["trace_id"] == trace_id
        attempt = line.get("attempt")
        if attempt is not None:
            assert line["span_id"] == span_of_attempt[attempt]
        else:
            assert line["span_id"] in span_of_attempt.values()
    text_about = [line for line in text.getvalue().splitlines() if message_id in line]
    assert len(text_about) == 4
    assert all(f"trace_id={trace_id} span_id=" in line for line in text_about)


@pytest.mark.broker
@pytest.mark.anyio
async def test_publish_and_request_from_the_app_are_producer_spans_of_the_handling(
    broker_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    queue = f"sc-otel-{uuid.uuid4().hex}"
    oracle = Oracle(broker_url)
    app = sc.App(url=broker_url, grace_period=1.0, tracing=provider)
    handled = anyio.Event()

    @app.consumer(queue, timeout=5.0)
    async def handle(msg: sc.Message) -> str:
        if msg.properties.reply_to is None:
            handled.set()
        return "pong"

    try:
        async with app.running(), app.publisher() as pub:
            await pub.publish(b"ping", routing_key=queue, message_id="p-1")
            with anyio.fail_after(10):
                await handled.wait()
            reply = await pub.request(b"ping", routing_key=queue, timeout=5.0)
            assert reply.body == b"pong"
    finally:
        for name in (queue, f"{queue}.dlq"):
            oracle.delete_now(name)
    spans = exporter.get_finished_spans()
    producers = [s for s in spans if s.kind is trace.SpanKind.PRODUCER]
    consumers = [s for s in spans if s.kind is trace.SpanKind.CONSUMER]
    assert [s.name for s in producers] == [f"publish {queue}"] * 2
    assert [s.name for s in consumers] == [f"process {queue}"] * 2
    for producer, consumer in zip(producers, consumers, strict=True):
        assert consumer.parent is not None
        assert _hex_ids(consumer)[0] == _hex_ids(producer)[0]
        assert format(consumer.parent.span_id, "016x") == _hex_ids(producer)[1]
        assert consumer.attributes is not None
        assert consumer.attributes["strictconsume.outcome"] == "ack"
    published, requested = producers
    assert published.attributes is not None
    assert published.attributes["messaging.message.id"] == "p-1"
    assert requested.attributes is not None
    assert "messaging.message.conversation_id" in requested.attributes
    # the request's span lasts its round trip: it ends after the handling did
    assert (requested.end_time or 0) >= (consumers[1].end_time or 0)
