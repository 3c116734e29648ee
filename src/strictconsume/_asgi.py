"""Health and metrics as a pure ASGI app (design section 7), served by ``_http.py``
or mounted by a web service that embeds the App.

``/health/live``   200 while the App runs (also while it reconnects or drains)
``/health/ready``  200 while connected with every consumer subscribed, else 503; a
                   consumer disabled by its settings is listed as "disabled" and
                   not waited for
``/metrics``       the Prometheus text format, rendered by prometheus-client

The app reads the App's status through :class:`AppStatus` and its counters through
:class:`~strictconsume._metrics.Metrics`; it knows nothing of servers or sockets.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from ._metrics import Metrics

__all__ = [
    "MISSING_EXTRA",
    "NOT_FOUND",
    "ASGIApp",
    "AppStatus",
    "asgi_app",
    "health",
    "render_metrics",
    "routes_app",
]

MISSING_EXTRA = (
    "serving health and metrics over HTTP needs hypercorn and prometheus-client: "
    "pip install 'strictconsume[http]'"
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AppStatus(Protocol):
    """What the health endpoints read of the App."""

    @property
    def is_running(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    @property
    def connected(self) -> bool: ...

    @property
    def subscriptions(self) -> Mapping[str, bool]: ...

    @property
    def disabled(self) -> Collection[str]: ...


def _registry(metrics: Metrics) -> CollectorRegistry:
    try:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            Metric,
        )
        from prometheus_client.registry import CollectorRegistry
    except ImportError as exc:
        raise ImportError(MISSING_EXTRA) from exc

    class Collector:
        """Reads :class:`Metrics` when scraped; nothing is copied in between."""

        def collect(self) -> Iterable[Metric]:
            messages = CounterMetricFamily(
                "strictconsume_messages",
                "Messages handled, by queue and outcome "
                "(ack, retry, dead_letter, requeue, cancelled, duplicate).",
                labels=["queue", "outcome"],
            )
            for (queue, outcome), count in sorted(metrics.messages.items()):
                messages.add_metric([queue, outcome], count)
            yield messages
            seconds = HistogramMetricFamily(
                "strictconsume_handler_seconds",
                "How long handlers ran, by queue (settling included).",
                labels=["queue"],
            )
            for queue, histogram in sorted(metrics.handler_seconds.items()):
                seconds.add_metric([queue], histogram.exposition_buckets(), histogram.total)
            yield seconds
            inflight = GaugeMetricFamily(
                "strictconsume_inflight", "Handlers running now, by queue.", labels=["queue"]
            )
            for queue, count in sorted(metrics.inflight().items()):
                inflight.add_metric([queue], count)
            yield inflight
            yield GaugeMetricFamily(
                "strictconsume_connected",
                "1 while connected to the broker, else 0.",
                value=1 if metrics.connected() else 0,
            )
            yield CounterMetricFamily(
                "strictconsume_reconnects",
                "Connections lost and made again since the App started.",
                value=metrics.reconnects,
            )
            timeouts = CounterMetricFamily(
                "strictconsume_consumer_timeouts",
                "Deliveries the broker took back because they stayed unacked past its "
                "consumer timeout, by queue.",
                labels=["queue"],
            )
            for queue, count in sorted(metrics.consumer_timeouts.items()):
                timeouts.add_metric([queue], count)
            yield timeouts
            for collector in metrics.collectors:  # an outbox relay's
                yield from collector.collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector())
    for collector in metrics.collectors:  # queue statistics (_queue_stats.py)
        registry.register(collector)
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and content type of a scrape."""
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


Route = Callable[[str], Awaitable[tuple[int, bytes, str]]]


def health(status: int, **details: Any) -> tuple[int, bytes, str]:
    """A health endpoint's answer: JSON with ``status`` ok or unavailable."""
    body = json.dumps({"status": "ok" if status == 200 else "unavailable", **details})
    return status, body.encode() + b"\n", "application/json"


NOT_FOUND = (404, b"not found: try /health/live, /health/ready or /metrics\n", "text/plain")


def asgi_app(app: AppStatus, metrics: Metrics) -> ASGIApp:
    """The ASGI app of :meth:`App.asgi`."""
    registry = _registry(metrics)

    async def route(path: str) -> tuple[int, bytes, str]:
        if path == "/health/live":
            return health(200 if app.is_running else 503, running=app.is_running)
        if path == "/health/ready":
            return health(
                200 if app.ready else 503,
                connected=app.connected,
                consumers={
                    queue: "subscribed" if subscribed else "not subscribed"
                    for queue, subscribed in app.subscriptions.items()
                }
                | dict.fromkeys(app.disabled, "disabled"),
            )
        if path == "/metrics":
            body, content_type = render_metrics(registry)
            return 200, body, content_type
        return NOT_FOUND

    return routes_app(route)


def routes_app(route: Route) -> ASGIApp:
    """An ASGI app answering GET and HEAD with ``route(path)`` (also used by the
    supervisor of ``--workers``, whose routes read its workers)."""

    async def respond(
        send: Send, status: int, body: bytes, content_type: str, *, head: bool = False
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return  # websockets: not served (closing the scope refuses them)
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"only GET and HEAD\n", "text/plain")
            return
        # A mounted app sees its own path below root_path (Starlette's Mount).
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        status, body, content_type = await route(path.rstrip("/") or "/")
        await respond(send, status, body, content_type, head=method == "HEAD")

    return asgi
