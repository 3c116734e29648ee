"""Health and metrics over HTTP (design section 7): an ASGI app, served by hypercorn.

``/health/live``   200 while the App runs (also while it reconnects or drains)
``/health/ready``  200 while connected with every consumer subscribed, else 503
``/metrics``       the Prometheus text format, rendered by prometheus-client

The ASGI app is :meth:`App.asgi`, so a web service that embeds the App can mount it;
``--http HOST:PORT`` (``App(http=...)``) serves it with hypercorn on the App's own
event loop (trio or asyncio) for as long as the App runs. Both packages are the
``http`` extra: ``pip install 'strictconsume[http]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import sniffio

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from ._app import App
    from ._metrics import Metrics

__all__ = ["HttpServer", "asgi_app", "parse_address", "render_metrics"]

logger = logging.getLogger("strictconsume")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MISSING_EXTRA = (
    "serving health and metrics over HTTP needs hypercorn and prometheus-client: "
    "pip install 'strictconsume[http]'"
)


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; ``:PORT`` for every interface).

    Raises:
        ValueError: not of that form.
    """
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdecimal():
        raise ValueError("must be HOST:PORT, for example 127.0.0.1:9000 or :9000")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("the port must be from 0 to 65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", port


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
                buckets = [
                    ("+Inf" if math.isinf(bound) else repr(bound), count)
                    for bound, count in histogram.cumulative()
                ]
                seconds.add_metric([queue], buckets, histogram.total)
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
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body and content type of a scrape."""
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

    return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4


def asgi_app(app: App, metrics: Metrics) -> ASGIApp:
    """The ASGI app of :meth:`App.asgi`."""
    registry = _registry(metrics)

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

    def health(status: int, **details: Any) -> tuple[int, bytes, str]:
        body = json.dumps({"status": "ok" if status == 200 else "unavailable", **details})
        return status, body.encode() + b"\n", "application/json"

    def route(path: str) -> tuple[int, bytes, str]:
        if path == "/health/live":
            return health(200 if app.is_running else 503, running=app.is_running)
        if path == "/health/ready":
            return health(
                200 if app.ready else 503,
                connected=app.connected,
                consumers={
                    queue: "subscribed" if subscribed else "not subscribed"
                    for queue, subscribed in app.subscriptions.items()
                },
            )
        if path == "/metrics":
            body, content_type = render_metrics(registry)
            return 200, body, content_type
        return 404, b"not found: try /health/live, /health/ready or /metrics\n", "text/plain"

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
        status, body, content_type = route(path.rstrip("/") or "/")
        await respond(send, status, body, content_type, head=method == "HEAD")

    return asgi


class HttpServer:
    """hypercorn serving an ASGI app on one address, on the running event loop."""

    def __init__(self, asgi: ASGIApp, address: str) -> None:
        self.asgi = asgi
        self.address = address
        self.url: str | None = None
        self._socket: socket.socket | None = None
        self._stop = anyio.Event()

    def bind(self) -> str:
        """Bind the address; returns the URL (with the actual port when 0 was asked).

        Bound here rather than by hypercorn, so that a port in use is an error at
        start-up, before any consumer subscribes.

        Raises:
            OSError: the address cannot be bound (the message says which and why).
            ImportError: the http extra is not installed.
        """
        try:
            import hypercorn  # noqa: F401
        except ImportError as exc:
            raise ImportError(MISSING_EXTRA) from exc
        host, port = parse_address(self.address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno,
                f"cannot serve health and metrics on {self.address}: {exc.strerror}; "
                "choose another address with --http (or STRICTCONSUME_HTTP)",
            ) from None
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        self._socket = sock
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        """Serve for the block (binding first if :meth:`bind` was not called); yields
        the URL. On exit, connections get up to a second to finish."""
        from hypercorn.config import Config

        if self._socket is None:
            self.bind()
        sock, url = self._socket, self.url
        assert sock is not None
        assert url is not None
        try:
            config = Config()
            # hypercorn owns (and closes) a duplicate; ours is closed on the way out.
            config.bind = [f"fd://{sock.dup().detach()}"]
            config.accesslog = None
            config.errorlog = _HTTP_LOGGER
            config.graceful_timeout = 1.0
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve, config)
                logger.info(
                    "serving health and metrics on %s", url, extra={"event": "http_serving"}
                )
                try:
                    yield url
                finally:
                    self._stop.set()
        finally:
            sock.close()
            self._socket = None

    async def _serve(self, config: Any) -> None:
        if sniffio.current_async_library() == "trio":
            from hypercorn.trio import serve
        else:
            from hypercorn.asyncio import serve  # type: ignore[assignment]
        try:
            await serve(self.asgi, config, shutdown_trigger=self._stop.wait, mode="asgi")  # type: ignore[arg-type]
        except Exception:  # the consumers go on: health and metrics are not worth a stop
            logger.exception("the health and metrics server on %s failed", self.url)


def _http_logger() -> logging.Logger:
    """hypercorn's error log: warnings and errors only (its "Running on ..." line
    would repeat ours), passed on to the ``strictconsume`` logger's handlers."""
    http_logger = logging.Logger("strictconsume.http", logging.WARNING)
    http_logger.parent = logging.getLogger("strictconsume")
    return http_logger


_HTTP_LOGGER = _http_logger()
