"""The App: a registry of consumers, their settings, and their run."""

from __future__ import annotations

import contextlib
import logging
import os
import random as random_module
import signal
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Unpack

import anyio

from ._config import ResolvedConsumer, SettingsLayers, render_settings
from ._consumer import SPEC_ATTRIBUTE, ConsumerOptions, ConsumerSpec, check_options, consumer
from ._metrics import Metrics
from ._middleware import Middleware, check_middleware
from ._outcome import OutcomeKind, sole_exception
from ._pipeline import Pipeline, build_pipeline
from ._publisher import PublishChannelSlot, Publisher, own_connection_publisher
from ._queue_stats import QueueStats
from ._reply import publishing_replier
from ._settings import Settings, SettingsError, resolve_settings
from ._shutdown import Shutdown
from ._supervisor import StartupError, Supervisor
from ._tracing import Tracing, resolve_tracing
from ._versions import (
    consumer_timeout_argument,
    consumer_timeout_cancels,
    consumer_timeout_enforced,
    describe,
    transient_queues_deprecated,
)
from .idempotency._stores import open_stores

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from opentelemetry.trace import TracerProvider

    from ._asgi import ASGIApp
    from ._http import HttpServer
    from .amqp import Connection

__all__ = ["App"]

logger = logging.getLogger("strictconsume")

_NOT_WARNED = object()

H = TypeVar("H", bound="Callable[..., Any]")


class App:
    """A set of consumers sharing one connection, and how to run them.

    Args:
        url: The broker's URL, or several (the nodes of a cluster), tried in turn.
        prefetch: The default prefetch of the consumers (64).
        grace_period: Seconds in-flight handlers get to finish on shutdown (30).
        consumer_timeout: The broker's ``consumer_timeout`` in seconds (RabbitMQ's
            default, 1800); handler timeouts unset or longer are warned about.
        http: ``HOST:PORT`` to serve ``/health/live``, ``/health/ready`` and
            ``/metrics`` on while the App runs (needs the ``http`` extra).
        queue_stats_interval: Seconds between two polls of the queues' depth and
            consumers for ``/metrics`` (15; 0: never).
        backend, log_level, log_format: Used by ``python -m strictconsume``.
        middleware: Middleware around every handler of the App (outside each
            consumer's own), the first outermost; see :meth:`add_middleware`.
        tracing: OpenTelemetry trace context (the ``otel`` extra; see README,
            "Trace context"): None (the default) is on when a tracer provider is
            set when the App starts, True on, False off; or the ``TracerProvider``.

    Every setting can also come from a settings file (``configure(config=...)``,
    ``--config`` or ``STRICTCONSUME_CONFIG``; see :mod:`._config`), which overrides the
    code, from the environment (``STRICTCONSUME_URL``, else ``AMQP_URL``;
    ``STRICTCONSUME_PREFETCH``, ...), which overrides both, and from the command line,
    which overrides all. The consumers' operational options are layered the same way,
    per consumer (:meth:`resolve_consumers`).
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        prefetch: int | None = None,
        grace_period: float | None = None,
        consumer_timeout: float | None = None,
        http: str | None = None,
        queue_stats_interval: float | None = None,
        backend: Literal["trio", "asyncio"] | None = None,
        log_level: str | None = None,
        log_format: Literal["text", "json"] | None = None,
        middleware: Iterable[Middleware] = (),
        tracing: bool | TracerProvider | None = None,
    ) -> None:
        self._code_settings: dict[str, Any] = {
            "urls": url,
            "prefetch": prefetch,
            "grace_period": grace_period,
            "consumer_timeout": consumer_timeout,
            "http": http,
            "queue_stats_interval": queue_stats_interval,
            "backend": backend,
            "log_level": log_level,
            "log_format": log_format,
            "workers": None,  # the command line's (python -m strictconsume --workers)
        }
        resolve_settings(self._code_settings, {})  # fail early on a bad argument
        self._overrides: dict[str, Any] = {}
        #: The settings file, its environment and --consumer options (see _config).
        self._layers = SettingsLayers()
        #: While running: the enabled consumers with their settings applied, and the
        #: queues of the disabled ones.
        self._running_specs: tuple[ConsumerSpec, ...] | None = None
        self._disabled: tuple[str, ...] = ()
        self._specs: list[ConsumerSpec] = []
        self._middleware: list[Middleware] = list(middleware)
        for mw in self._middleware:
            check_middleware(mw)
        self._shutdown: Shutdown | None = None
        self._supervisor: Supervisor | None = None
        self._publishing = PublishChannelSlot()
        self._tracing_setting = tracing
        #: Resolved when the App starts (a provider may be set after it was made).
        self._tracing: Tracing | None = None
        self._random = random_module.Random()
        self._grace_period: float | None = None
        self._fatal_error: BaseException | None = None
        self._http_url: str | None = None
        #: Tasks run in the App's task group once it started (outbox relays).
        self._tasks: list[Callable[[Shutdown], Coroutine[Any, Any, None]]] = []
        #: The broker version the start-up warnings were given for (a sentinel: none).
        self._warned_for: object = _NOT_WARNED
        #: What ``/metrics`` shows; kept across runs of the App.
        self.metrics = Metrics(connected=lambda: self.connected, inflight=self._inflight)
        self._queue_stats = QueueStats(ready=lambda: self.ready)  # depth, age, readiness
        self.metrics.collectors.append(self._queue_stats)

    def __repr__(self) -> str:
        queues = ", ".join(spec.queue for spec in self._specs)
        return f"<strictconsume.App consuming [{queues}]>"

    # -- consumers ----------------------------------------------------------------------

    def consumer(self, queue: str, **options: Unpack[ConsumerOptions]) -> Callable[[H], H]:
        """Register a handler, ``async def`` or ``def``, for ``queue`` (options as
        :func:`consumer`)."""
        check_options(options, "App.consumer")
        decorate = consumer(queue, **options)

        def register(handler: H) -> H:
            self.add_consumer(decorate(handler))
            return handler

        return register

    def add_consumer(self, handler: Callable[..., Any] | ConsumerSpec) -> None:
        """Add a function decorated with :func:`strictconsume.consumer` (or a spec)."""
        spec: object = handler
        if not isinstance(spec, ConsumerSpec):
            spec = getattr(handler, SPEC_ATTRIBUTE, None)
        if not isinstance(spec, ConsumerSpec):
            raise TypeError(
                f"{handler!r} is not a consumer: decorate it with @strictconsume.consumer(queue)"
            )
        if self._supervisor is not None:
            raise RuntimeError("consumers cannot be added while the App is running")
        if any(existing.queue == spec.queue for existing in self._specs):
            raise ValueError(f"queue {spec.queue!r} already has a consumer in this App")
        self._specs.append(spec)

    def add_middleware(self, middleware: Middleware) -> None:
        """Wrap every handler of the App in ``middleware`` (inside the middleware added
        before): an ``async def mw(msg, call_next)`` or an async context manager
        factory taking the message (see the README's "Middleware")."""
        check_middleware(middleware)
        if self._supervisor is not None:
            raise RuntimeError("middleware cannot be added while the App is running")
        self._middleware.append(middleware)

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The App's middleware, outermost first."""
        return tuple(self._middleware)

    def _pipelines(self) -> dict[str, Pipeline]:
        """How each consumer's handler is called (typed body, middleware, thread,
        reply), by queue; built when the App starts.

        Raises:
            TypeError: a handler's signature or body type cannot be served.
        """
        prefetch = self.settings.prefetch
        return {
            spec.queue: build_pipeline(
                spec,
                middleware=self._middleware,
                reply=publishing_replier(self._publishing),
                threads=spec.concurrency or spec.prefetch or prefetch,
                tracing=self._tracing,
            )
            for spec in self._active_specs
        }

    @property
    def consumers(self) -> tuple[ConsumerSpec, ...]:
        return tuple(self._specs)

    def add_task(self, task: Callable[[Shutdown], Coroutine[Any, Any, None]]) -> None:
        """Run ``task(shutdown)`` in the App's task group while the App runs, from the
        moment it is ready (an outbox relay, see ``strictconsume.outbox.Relay``). It
        must return soon after ``await shutdown.wait()`` returns (a graceful stop)."""
        self._tasks.append(task)

    # -- settings -----------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The effective settings: code < settings file < environment < command line."""
        return self._layers.settings(self._code_settings, os.environ, self._overrides)

    def resolve_consumers(self) -> list[ResolvedConsumer]:
        """Every consumer with its settings from the file, the environment and the
        command line applied, and where each came from.

        Raises:
            SettingsError: an unknown consumer or key, or an unusable value (named).
        """
        return self._layers.consumers(self._specs, os.environ)

    def settings_report(self) -> str:
        """The effective settings of the App and of each consumer, and where each
        came from, passwords redacted (``python -m strictconsume ... --print-settings``).

        Raises:
            SettingsError: as :meth:`resolve_consumers`.
        """
        layers = self._layers.app_layers(self._code_settings, os.environ, self._overrides)
        return render_settings(
            layers, self.settings, self.resolve_consumers(), self._layers.file(os.environ)
        )

    @property
    def _active_specs(self) -> tuple[ConsumerSpec, ...]:
        if self._running_specs is not None:
            return self._running_specs
        return tuple(self._specs)

    @property
    def disabled(self) -> tuple[str, ...]:
        """While running: the queues of the consumers disabled by their settings."""
        return self._disabled

    def configure(
        self,
        *,
        config: str | None = None,
        env: str | None = None,
        consumer_options: Iterable[str] = (),
        **overrides: Any,
    ) -> None:
        """Override settings as the command line does (``None`` leaves one alone):
        the App's, a settings file ``config`` and its environment ``env``, and
        consumer settings as ``"NAME.KEY=VALUE"``."""
        unknown = set(overrides) - set(self._code_settings)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        merged = {**self._overrides, **{k: v for k, v in overrides.items() if v is not None}}
        resolve_settings({}, {}, merged)
        self._overrides = merged
        layers = self._layers
        options = (*layers.consumer_options, *consumer_options)
        self._layers = SettingsLayers(config or layers.config, env or layers.env, options)

    # -- state --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while connected with every consumer subscribed."""
        return self._supervisor is not None and self._supervisor.ready

    @property
    def connected(self) -> bool:
        return self._supervisor is not None and self._supervisor.connected

    @property
    def is_running(self) -> bool:
        """True from the start of :meth:`running` (or :meth:`run`) to its end,
        reconnects and the shutdown's grace period included."""
        return self._supervisor is not None

    @property
    def subscriptions(self) -> dict[str, bool]:
        """Whether each consumer's queue is subscribed now."""
        subscribed = self._supervisor.subscribed if self._supervisor is not None else set()
        return {spec.queue: spec.queue in subscribed for spec in self._active_specs}

    @property
    def reconnects(self) -> int:
        """Connections lost (and made again) since the App was created."""
        return self.metrics.reconnects

    @property
    def outcomes(self) -> Counter[tuple[str, str]]:
        """Messages handled since the App was created, by (queue, outcome): "ack",
        "retry", "dead_letter", "requeue", "cancelled"."""
        return self.metrics.messages

    @property
    def http_url(self) -> str | None:
        """Where health and metrics are served while the App runs (``http=``)."""
        return self._http_url

    def _inflight(self) -> dict[str, int]:
        supervisor = self._supervisor
        if supervisor is None:
            return {spec.queue: 0 for spec in self._specs}
        return {dispatcher.queue: dispatcher.inflight for dispatcher in supervisor.dispatchers}

    def _record(self, queue: str, kind: OutcomeKind, duration: float) -> None:
        self.metrics.record(queue, kind, duration)

    def _reconnected(self) -> None:
        self.metrics.reconnects += 1

    def _consumer_timed_out(self, queue: str) -> None:
        self.metrics.consumer_timeouts[queue] += 1

    def _fatal(self, exc: BaseException) -> None:
        """A handler raised SystemExit, KeyboardInterrupt or another BaseException: stop
        gracefully, then :meth:`run` raises it."""
        if self._fatal_error is None:
            # sys.exit(3) in a task group of the handler's is a group of one SystemExit
            self._fatal_error = sole_exception(exc)
        if self._shutdown is not None and not self._shutdown.requested:
            self.stop()

    # -- running ------------------------------------------------------------------------

    def _connected(self, conn: Connection) -> None:
        """Once per broker version: warn about what this broker will do to the
        consumers (design section 4: the consumer timeout must never be hit silently;
        section 9: what differs by version)."""
        version = conn.server_version
        if version == self._warned_for:
            return
        self._warned_for = version
        settings = self.settings
        broker = describe(version)
        for spec in self._active_specs:
            if not consumer_timeout_enforced(version, spec.queue_type):
                continue  # 4.3 takes no delivery of a classic queue back
            limit = spec.broker_consumer_timeout(settings.consumer_timeout)
            if spec.timeout is None:
                logger.warning(
                    "the handler of queue %r has no timeout: a handler that hangs keeps "
                    "its message until the broker's consumer timeout (%g s) takes it "
                    "back (%s %s); set timeout= on the consumer",
                    spec.queue,
                    limit or 0,  # 0: the broker's timeout is disabled
                    broker,
                    "cancels the consumer"
                    if consumer_timeout_cancels(version)
                    else "closes the channel",
                )
            elif limit is not None and spec.timeout > limit:
                logger.warning(
                    "the handler timeout of queue %r (%g s) is longer than the broker's "
                    "consumer timeout (%g s): the broker would take the message back "
                    "first; lower the timeout, or raise the consumer timeout with "
                    "consumer_timeout= on the consumer (or on the broker, and tell the "
                    "App with consumer_timeout=)",
                    spec.queue,
                    spec.timeout,
                    limit,
                )
            if spec.consumer_timeout is not None and not consumer_timeout_argument(
                version, spec.queue_type
            ):
                logger.warning(
                    "queue %r: %s does not honour a per-consumer consumer_timeout "
                    "(x-consumer-timeout, from RabbitMQ 3.12); its own consumer_timeout "
                    "setting applies",
                    spec.queue,
                    broker,
                )
        for spec in self._active_specs:
            if not spec.durable and transient_queues_deprecated(version):
                logger.warning(
                    "queue %r is declared durable=False: %s deprecates transient "
                    "non-exclusive queues, and a broker configured to refuse them closes "
                    "the connection at the declaration; declare it durable",
                    spec.queue,
                    broker,
                )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[App]:
        """Run the consumers in the background of the block; stop them gracefully on exit.

        The block is entered once every consumer is subscribed. Leaving it (or
        :meth:`stop`) stops intake, gives in-flight handlers the grace period,
        requeues what did not finish and closes the connection.

        Raises:
            StartupError: the App cannot start (wrong credentials, unknown vhost, not an
                AMQP broker, a queue that exists with other arguments).
        """
        if self._supervisor is not None:
            raise RuntimeError("this App is running already")
        settings = self.settings
        if not self._specs and not self._tasks:
            logger.warning("the App has no consumers")
        self._start_consumers()
        try:
            for spec in self._active_specs:
                prefetch = spec.prefetch or settings.prefetch
                if spec.concurrency is not None and spec.concurrency > prefetch:
                    raise ValueError(
                        f"queue {spec.queue!r}: concurrency ({spec.concurrency}) cannot exceed "
                        f"prefetch ({prefetch})"
                    )
            try:
                self._tracing = resolve_tracing(self._tracing_setting)
                pipelines = self._pipelines()
            except (TypeError, RuntimeError) as exc:
                raise StartupError(str(exc)) from exc
        except BaseException:
            self._running_specs, self._disabled = None, ()
            raise
        self.metrics.add_queues(spec.queue for spec in self._active_specs)
        self._queue_stats.interval = settings.queue_stats_interval
        self._queue_stats.watch(self._active_specs)
        counted_before = Counter(self.metrics.messages)
        shutdown = self._shutdown if self._shutdown is not None else Shutdown()
        shutdown.grace_period = settings.grace_period
        self._shutdown = shutdown
        supervisor = Supervisor(
            self._active_specs,
            settings.parameters,
            prefetch=settings.prefetch,
            shutdown=shutdown,
            publishing=self._publishing,
            on_outcome=self._record,
            on_fatal=self._fatal,
            on_reconnect=self._reconnected,
            on_connected=self._connected,
            on_consumer_timeout=self._consumer_timed_out,
            on_message=self._queue_stats.message_started,
            watch_queues=self._queue_stats.poll,
            consumer_timeout=settings.consumer_timeout,
            random=self._random,
            pipelines=pipelines,
        )
        self._supervisor = supervisor
        self._grace_period = settings.grace_period
        self._publishing.start()
        startup_error: BaseException | None = None
        body_error: BaseException | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                if settings.http is not None:
                    server = self._http_server(settings.http)
                    self._http_url = await stack.enter_async_context(server.serving())
                await stack.enter_async_context(open_stores(self._specs))  # idempotency
                async with anyio.create_task_group() as tg:
                    try:
                        await tg.start(supervisor.run)
                    except StartupError as exc:
                        startup_error = exc
                    if startup_error is None:
                        for task in self._tasks:  # outbox relays
                            tg.start_soon(task, shutdown)
                        try:
                            yield self
                        except BaseException as exc:  # re-raised below, outside the group
                            body_error = exc
                        finally:
                            if not shutdown.requested:
                                self.stop()
        except anyio.get_cancelled_exc_class():
            # The program around the App cancelled it (a web server's shutdown timeout,
            # a cancel scope): no grace period; the handlers' messages were requeued.
            if startup_error is None:
                self._log_stopped(counted_before, cancelled=True)
            raise
        finally:
            self._publishing.stop()
            self._running_specs, self._disabled = None, ()
            self._supervisor = None
            self._shutdown = None
            self._http_url = None
        if startup_error is None:
            self._log_stopped(counted_before)
        if startup_error is not None:
            raise startup_error
        if body_error is not None:
            raise body_error
        fatal, self._fatal_error = self._fatal_error, None
        if fatal is not None:
            raise fatal

    def _start_consumers(self) -> None:
        """Apply the consumers' settings; leave the disabled ones out (see _config)."""
        try:
            resolved = self.resolve_consumers()
        except SettingsError as exc:
            raise StartupError(str(exc)) from exc
        prefetch = self.settings.prefetch
        for resolved_consumer in resolved:
            spec, sources = resolved_consumer.spec, resolved_consumer.sources
            limit = spec.prefetch or prefetch
            if spec.concurrency is not None and spec.concurrency > limit and sources:
                raise StartupError(
                    f"consumer {resolved_consumer.name!r}: concurrency ({spec.concurrency}) cannot "
                    f"exceed prefetch ({limit}) (settings from {'; '.join(sources.values())})"
                )
            if not spec.enabled:
                logger.info(
                    "consumer %r is disabled (%s): queue %r is not declared or consumed",
                    resolved_consumer.name,
                    sources.get("enabled", "code"),
                    spec.queue,
                    extra={"event": "disabled", "queue": spec.queue},
                )
        self._running_specs = tuple(c.spec for c in resolved if c.spec.enabled)
        self._disabled = tuple(c.spec.queue for c in resolved if not c.spec.enabled)

    def _log_stopped(self, before: Counter[tuple[str, str]], *, cancelled: bool = False) -> None:
        """One line for the end of a run, with its count of each outcome."""
        run = self.metrics.messages - before
        totals = {
            kind: sum(n for (_, outcome), n in run.items() if outcome == kind.value)
            for kind in OutcomeKind
        }
        counts = ", ".join(
            f"{kind.value} {n}"
            for kind, n in totals.items()
            if n or kind is not OutcomeKind.DUPLICATE  # only idempotent consumers have them
        )
        if cancelled:
            logger.warning(
                "stopped by a cancellation from the program around the App, without a grace "
                "period (the messages of cancelled handlers go back to the queue); handled "
                "%d message(s) (%s)",
                run.total(),
                counts,
                extra={"event": "stopped"},
            )
        else:
            logger.info(
                "stopped after handling %d message(s) (%s)",
                run.total(),
                counts,
                extra={"event": "stopped"},
            )

    def _http_server(self, address: str) -> HttpServer:
        from ._http import HttpServer

        try:
            server = HttpServer(self.asgi(), address)
            server.bind()
        except (OSError, ImportError) as exc:
            raise StartupError(str(exc)) from exc
        return server

    def asgi(self) -> ASGIApp:
        """The ASGI app of ``/health/live``, ``/health/ready`` and ``/metrics``, for a
        web service that embeds the App to mount (needs the ``http`` extra)::

            api.mount("/consumers", app.asgi())   # Starlette or FastAPI
        """
        from ._asgi import asgi_app

        return asgi_app(self, self.metrics)

    async def run(self, *, handle_signals: bool = True) -> None:
        """Run until :meth:`stop`, SIGTERM or SIGINT (a second signal skips the grace).

        Signals are only handled in the main thread; pass ``handle_signals=False``
        when the host program handles them.
        """
        if self._supervisor is not None:  # before replacing the running one's shutdown
            raise RuntimeError("this App is running already")
        shutdown = self._shutdown = Shutdown()
        error: BaseException | None = None
        async with anyio.create_task_group() as tg:
            if handle_signals and threading.current_thread() is threading.main_thread():
                await tg.start(self._watch_signals)
            try:
                async with self.running():
                    await shutdown.wait()
            except BaseException as exc:  # re-raised below, outside the task group
                error = exc
            finally:
                tg.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self._shutdown is not None and self._shutdown.requested:
                    logger.warning("%s again: skipping the grace period", name)
                else:
                    logger.info("%s received: shutting down", name)
                self.stop()

    def stop(self) -> None:
        """Start a graceful stop; a second call skips the grace period.

        Intake stops at once (basic.cancel on every consumer); handlers still running
        get the grace period, then are cancelled and their messages requeued.
        """
        shutdown = self._shutdown
        if shutdown is None:
            return
        if not shutdown.requested:
            grace = self._grace_period
            if grace is None:
                grace = self.settings.grace_period
            logger.info(
                "shutting down: stopping intake; %d handler(s) running get a grace period of %g s",
                sum(self._inflight().values()),
                grace,
                extra={"event": "shutting_down"},
            )
            shutdown.request(grace)
        else:
            shutdown.force()

    # -- publishing ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def publisher(self) -> AsyncIterator[Publisher]:
        """A :class:`Publisher` for confirmed publishing from user code.

        While the App runs it uses the App's publishing connection (and waits while
        it reconnects); otherwise the block opens a connection of its own, to the
        first of the App's URLs that accepts one.
        """
        if self._supervisor is not None:
            yield Publisher(self._publishing, tracing=self._tracing)
            return
        async with own_connection_publisher(
            self.settings.parameters, tracing=resolve_tracing(self._tracing_setting)
        ) as publisher:
            yield publisher
