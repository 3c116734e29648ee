"""One worker process of ``python -m strictconsume --workers N``: the App, linked to
its supervisor (:mod:`._workers`).

The supervisor starts ``python -m strictconsume`` N times with
``STRICTCONSUME_WORKER_LINK`` naming a Unix socket of its private directory; the
worker connects to it and speaks JSON lines:

* worker to supervisor: ``{"hello": INDEX, "pid": PID}`` once, ``{"ready": BOOL}``
  whenever its readiness changes, ``{"metrics": TEXT}`` in answer to a scrape;
* supervisor to worker: ``{"scrape": true}``.

When the link ends (the supervisor died, even by SIGKILL: the kernel closes its end)
the worker stops gracefully, as on SIGTERM: a worker never consumes on, unsupervised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

if TYPE_CHECKING:
    from anyio.abc import SocketStream
    from prometheus_client.registry import CollectorRegistry

    from ._app import App

__all__ = ["INDEX_ENV", "LINK_ENV", "MAX_LINE", "run_worker"]

logger = logging.getLogger("strictconsume")

LINK_ENV = "STRICTCONSUME_WORKER_LINK"
INDEX_ENV = "STRICTCONSUME_WORKER_INDEX"
#: The longest line on the link (a scrape of many queues stays far below).
MAX_LINE = 16 * 1024 * 1024
#: How often the worker looks at its readiness (it changes on a reconnect).
READY_POLL = 0.05


async def run_worker(app: App, link: str, index: int) -> None:
    """Run ``app`` (signals handled as without workers), reporting to ``link``."""
    stream = await anyio.connect_unix(link)
    lock = anyio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with lock:
            # The supervisor gone: _answer sees the link end and stops the App.
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await stream.send(json.dumps(message).encode() + b"\n")

    error: BaseException | None = None
    async with stream, anyio.create_task_group() as tg:
        await send({"hello": index, "pid": os.getpid()})
        tg.start_soon(_report_ready, app, send)
        tg.start_soon(_answer, app, stream, send)
        try:
            await app.run()
        except BaseException as exc:  # re-raised below, outside the task group
            error = exc
        finally:
            tg.cancel_scope.cancel()
    if error is not None:
        raise error


async def _report_ready(app: App, send: Any) -> None:
    reported: bool | None = None
    while True:
        ready = app.ready
        if ready != reported:
            await send({"ready": ready})
            reported = ready
        await anyio.sleep(READY_POLL)


async def _answer(app: App, stream: SocketStream, send: Any) -> None:
    lines = BufferedByteReceiveStream(stream)
    registry: CollectorRegistry | None = None
    while True:
        try:
            line = await lines.receive_until(b"\n", MAX_LINE)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            logger.warning(
                "the supervisor of the workers is gone: shutting down",
                extra={"event": "supervisor_gone"},
            )
            app.stop()
            return
        if json.loads(line).get("scrape"):
            from ._asgi import _registry, render_metrics

            if registry is None:
                registry = _registry(app.metrics)
            body, _ = render_metrics(registry)
            await send({"metrics": body.decode()})
