"""Trace context (OpenTelemetry): a consumer span per delivery, a producer span per
publish, the W3C headers carried on by retry and dead-letter copies.

Only ``opentelemetry-api`` is used (the ``otel`` extra); the application configures
the SDK (a tracer provider and its exporters) as it likes. Nothing here runs when
tracing is off: the App decides once, when it starts, and the dispatcher and the
publisher check one attribute per message.

What a delivery gets (OpenTelemetry's messaging semantic conventions, RabbitMQ)::

    span "process <queue>", kind CONSUMER        entered by the dispatcher around the
      parent: the context extracted from the     handler call AND the settlement, so the
        message's traceparent/tracestate/baggage retry or dead-letter copy and every
        headers (the API's global propagator)    log line about the message, the
      link: that same producer context           dispatcher's own included, are in it
      messaging.system            rabbitmq
      messaging.operation.type    process
      messaging.operation.name    process
      messaging.destination.name  the exchange it was published to ("" default)
      messaging.rabbitmq.destination.routing_key, messaging.rabbitmq.message.delivery_tag
      messaging.message.id, messaging.message.conversation_id (correlation_id),
      messaging.message.body.size
      strictconsume.queue, strictconsume.attempt, strictconsume.outcome
      error.type (and status ERROR) when the message was not acked

The span is not a middleware: a middleware runs inside the handler's timeout and
returns before the message is settled, while the outcome (retry, dead-letter), the
copy's publish and the dispatcher's own log lines come after. The span is the
context that is current from the handler's call to the settlement's end, which is
what the logging filter (:class:`TraceContextFilter`) reads.

Copies: a retry or dead-letter copy is published inside the consumer span, and its
trace headers are that span's (injected, replacing the original's): the retry's
handling is a child of the attempt that failed, so a trace reads publish -> process
(attempt 1) -> process (attempt 2) -> ... and the dead-letter queue's message points
at the last attempt. Each consumer span also links to the context it was parented
on, so the producer's span stays one click away.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._message import Message
    from ._outcome import Outcome

__all__ = [
    "TRACE_HEADERS",
    "TraceContextFilter",
    "TraceContextFormatter",
    "Tracing",
    "inject_current",
    "resolve_tracing",
]

#: The headers trace context travels in (W3C Trace Context and Baggage).
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")

INSTRUMENTATION = "strictconsume"
#: The variable by which the OpenTelemetry API loads a tracer provider of its own.
PROVIDER_VARIABLE = "OTEL_PYTHON_TRACER_PROVIDER"


def _carrier(headers: Mapping[str, Any]) -> dict[str, str]:
    """The trace headers of a message as the propagators read them: text values
    only (a header of another AMQP type is no trace context; it is ignored)."""
    carrier: dict[str, str] = {}
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(value, str):
            carrier[name] = value
    return carrier


def _configured(provider: Any) -> bool:
    """Whether ``provider`` is one an application set (not the API's no-op default)."""
    from opentelemetry import trace

    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class Tracing:
    """The App's tracer, and what it does per delivery and per publish."""

    __slots__ = ("_tracer",)

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    @contextmanager
    def delivery(self, msg: Message) -> Iterator[Span]:
        """The consumer span of ``msg``, current for the block (handler and settlement)."""
        from opentelemetry import context, propagate, trace

        parent = propagate.extract(_carrier(msg.headers))
        parent_span = trace.get_current_span(parent).get_span_context()
        links = [trace.Link(parent_span)] if parent_span.is_valid else None
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": msg.exchange,
            "messaging.rabbitmq.message.delivery_tag": msg.delivery_tag,
            "messaging.message.body.size": len(msg.body),
            "strictconsume.queue": msg.queue,
            "strictconsume.attempt": msg.attempt,
        }
        if msg.routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = msg.routing_key
        if msg.message_id is not None:
            attributes["messaging.message.id"] = msg.message_id
        if msg.correlation_id is not None:
            attributes["messaging.message.conversation_id"] = msg.correlation_id
        span = self._tracer.start_span(
            f"process {msg.queue}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        # the producer's baggage stays in the context, for the handler and the copies
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span
        except BaseException as exc:
            span.record_exception(exc)
            span.set_attribute("error.type", type(exc).__qualname__)
            raise
        finally:
            context.detach(token)
            span.end()

    @staticmethod
    def outcome(outcome: Outcome, error: BaseException | None) -> None:
        """Note on the current consumer span what became of its message."""
        from opentelemetry import trace

        from ._outcome import OutcomeKind, error_type

        span = trace.get_current_span()
        span.set_attribute("strictconsume.outcome", outcome.kind.value)
        if outcome.kind is OutcomeKind.ACK:
            return
        kind = (
            error_type(error) if error is not None else (outcome.error_type or outcome.kind.value)
        )
        span.set_attribute("error.type", kind)
        if error is not None:
            span.record_exception(error)
        span.set_status(trace.StatusCode.ERROR, f"{outcome.kind.value}: {kind}")

    @contextmanager
    def publish(
        self,
        headers: MutableMapping[str, Any],
        *,
        exchange: str,
        routing_key: str,
        message_id: str | None,
        correlation_id: str | None,
        body_size: int,
    ) -> Iterator[Span]:
        """A producer span around a publish; its context is injected into ``headers``."""
        from opentelemetry import propagate, trace

        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "send",
            "messaging.operation.name": "publish",
            "messaging.destination.name": exchange,
            "messaging.message.body.size": body_size,
        }
        if routing_key:
            attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        if correlation_id is not None:
            attributes["messaging.message.conversation_id"] = correlation_id
        # the default exchange routes by queue name: name the span after the queue
        with self._tracer.start_as_current_span(
            f"publish {exchange or routing_key}",
            kind=trace.SpanKind.PRODUCER,
            attributes=attributes,
        ) as span:
            propagate.inject(headers)
            yield span


def resolve_tracing(tracing: bool | TracerProvider | None) -> Tracing | None:
    """The App's :class:`Tracing`, or None when off.

    Args:
        tracing: None: on when ``opentelemetry-api`` is importable and the
            application set a tracer provider (``trace.set_tracer_provider``); True:
            on (the global provider, which may be the no-op one); False: off; a
            ``TracerProvider``: on, with that provider.

    Raises:
        RuntimeError: tracing is asked for but ``opentelemetry-api`` is not installed.
    """
    if tracing is False:
        return None
    if (
        tracing is None
        and "opentelemetry.trace" not in sys.modules
        and PROVIDER_VARIABLE not in os.environ
    ):
        # An application that set a tracer provider imported the API to do it; one
        # that did not has none to set, unless the API would load one named in the
        # environment. Leave the API unloaded (about 0.4 MB of modules) otherwise.
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        if tracing is None:
            return None
        raise RuntimeError(
            "tracing=... needs the OpenTelemetry API: pip install 'strictconsume[otel]'"
        ) from None
    from .amqp import __version__

    if tracing is None or tracing is True:
        provider = trace.get_tracer_provider()
        if tracing is None and not _configured(provider):
            return None
    else:
        provider = tracing
    return Tracing(provider.get_tracer(INSTRUMENTATION, __version__))


def inject_current(headers: MutableMapping[str, Any]) -> None:
    """Write the current trace context (a consumer span's, during a settlement) into
    ``headers``; nothing when OpenTelemetry is not loaded or no span is current."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return
    from opentelemetry import propagate

    propagate.inject(headers)


def _ids() -> tuple[str, str] | None:
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported: no span can be current
        return None
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x"), format(span_context.span_id, "016x")


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex, as W3C traceparent writes them) to each
    log record made while a span is current: during a message's handling and
    settlement, its consumer span. Add it to a handler (``handler.addFilter``): it
    then covers every logger whose records reach that handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _ids()
        if ids is not None and not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = ids
        return True


class TraceContextFormatter(logging.Formatter):
    """A text formatter that ends a line with ``trace_id=... span_id=...`` when the
    record has them (see :class:`TraceContextFilter`)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id is None:
            return line
        first, newline, rest = line.partition("\n")  # before a traceback
        span_id = getattr(record, "span_id", None)
        return f"{first} trace_id={trace_id} span_id={span_id}{newline}{rest}"
