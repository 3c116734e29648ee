"""Health and metrics over HTTP (design section 7): the server of the ASGI app.

The ASGI app (``_asgi.py``) is :meth:`App.asgi`, so a web service that embeds the App
can mount it;
``--http HOST:PORT`` (``App(http=...)``) serves it with hypercorn on the App's own
event loop (trio or asyncio) for as long as the App runs. Both packages are the
``http`` extra: ``pip install 'strictconsume[http]'``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import sniffio

from ._asgi import MISSING_EXTRA

# Re-exported for the callers that knew them here.
from ._asgi import asgi_app as asgi_app
from ._asgi import render_metrics as render_metrics
from ._settings import parse_address as parse_address

if TYPE_CHECKING:
    from ._asgi import ASGIApp

__all__ = ["HttpServer", "asgi_app", "parse_address", "render_metrics"]

logger = logging.getLogger("strictconsume")


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
