"""``python -m strictconsume [options] MODULE[:ATTR]``.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT, ``app.stop()``) and after
``--print-settings``; 1 when the App cannot start (unusable settings or settings
file, wrong credentials, unknown vhost, a topology mismatch: one line on stderr says
which); 2 for a usage error (a bad option, a module
that cannot be imported, nothing to run in it).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import anyio

from . import __version__
from ._app import App
from ._consumer import SPEC_ATTRIBUTE, ConsumerSpec
from ._settings import Settings, SettingsError
from ._supervisor import StartupError
from ._tracing import TraceContextFilter, TraceContextFormatter
from ._worker import INDEX_ENV, LINK_ENV, run_worker
from ._workers import WorkerSet, worker_command

__all__ = ["load_app", "main"]

EXIT_OK = 0
EXIT_STARTUP = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """The command line names something that cannot be run."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m strictconsume",
        description=(
            "Run the RabbitMQ consumers of MODULE: the App named ATTR, or every function "
            "decorated with @strictconsume.consumer in MODULE; `relay MODULE:ATTR` runs "
            "the outbox Relay named ATTR. Settings come from the "
            "code, then STRICTCONSUME_* environment variables, then these options. "
            "SIGTERM or SIGINT stops gracefully; a second signal skips the grace period."
        ),
        epilog="python -m strictconsume dlq --help: list, show, replay or purge dead letters.",
    )
    parser.add_argument(
        "target",
        metavar="MODULE[:ATTR]",
        help="a module (importable from the current directory) and optionally the name "
        "of its App, e.g. 'shop.consumers:app'",
    )
    parser.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="the broker, amqp[s]://user:password@host:port/vhost; repeat it (or separate "
        "with commas) for the nodes of a cluster (env STRICTCONSUME_URL or AMQP_URL)",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        metavar="N",
        help="default deliveries in flight per consumer (env STRICTCONSUME_PREFETCH; 64)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        metavar="S",
        help="seconds running handlers get to finish on shutdown before their messages "
        "are requeued (env STRICTCONSUME_GRACE_PERIOD; 30)",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve /health/live, /health/ready and /metrics (Prometheus) there, e.g. "
        "127.0.0.1:9000 or :9000 for every interface (env STRICTCONSUME_HTTP; off)",
    )
    parser.add_argument(
        "--queue-stats-interval",
        type=float,
        metavar="S",
        help="seconds between two polls of each queue's depth and consumers for "
        "/metrics; 0 never (env STRICTCONSUME_QUEUE_STATS_INTERVAL; 15)",
    )
    parser.add_argument(
        "--backend",
        choices=("trio", "asyncio"),
        help="the event loop (env STRICTCONSUME_BACKEND; trio)",
    )
    parser.add_argument(
        "--log-level",
        metavar="L",
        help="DEBUG, INFO, WARNING or ERROR (env STRICTCONSUME_LOG_LEVEL; INFO)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text lines, or one JSON object per line for log shippers "
        "(env STRICTCONSUME_LOG_FORMAT; text)",
    )
    # -- settings files and consumer settings (see _config) --
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML settings file: [app] and [consumers.NAME] tables, and per environment "
        "[env.ENV.app], [env.ENV.consumers.NAME] (env STRICTCONSUME_CONFIG)",
    )
    parser.add_argument(
        "--env",
        metavar="ENV",
        help="the environment of the settings file to apply, e.g. prod (env STRICTCONSUME_ENV)",
    )
    parser.add_argument(
        "--consumer",
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="a consumer's setting (enabled, prefetch, concurrency, timeout, retry_delays, "
        "delivery_limit, consumer_timeout), e.g. orders.prefetch=10; repeatable "
        "(env STRICTCONSUME_CONSUMERS__NAME__KEY)",
    )
    parser.add_argument(
        "--print-settings",
        action="store_true",
        help="print the effective settings of the App and of every consumer, and where "
        "each came from, then exit without connecting",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        help="run N worker processes of the App under one supervisor (auto: one per "
        "CPU); --http then serves the whole set (env STRICTCONSUME_WORKERS; 1)",
    )
    parser.add_argument("--version", action="version", version=f"strictconsume {__version__}")
    return parser


def load_app(target: str) -> App:
    """Import ``MODULE[:ATTR]`` and return the App to run.

    Without ``:ATTR`` every function of the module decorated with
    ``@strictconsume.consumer`` goes into a new App (in definition order); a module
    without such functions but with exactly one App uses that App.
    """
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise UsageError(f"{target!r} names no module; write MODULE or MODULE:ATTR")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            raise UsageError(
                f"cannot import module {module_name!r}: {exc}; run from the directory "
                "that contains it, or install it"
            ) from exc
        raise
    if attr:
        try:
            app = getattr(module, attr)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}") from None
        from .outbox import Relay

        if isinstance(app, Relay):  # python -m strictconsume relay MODULE:ATTR
            return app.standalone_app()
        if not isinstance(app, App):
            raise UsageError(f"{target} is a {type(app).__name__}, not a strictconsume.App")
        return app
    return _collect(module)


def _collect(module: types.ModuleType) -> App:
    apps = [value for value in vars(module).values() if isinstance(value, App)]
    in_apps = {id(spec) for app in apps for spec in app.consumers}
    specs = [
        value.__dict__[SPEC_ATTRIBUTE]
        for value in vars(module).values()
        if inspect.isfunction(value)
        and isinstance(value.__dict__.get(SPEC_ATTRIBUTE), ConsumerSpec)
        and id(value.__dict__[SPEC_ATTRIBUTE]) not in in_apps
    ]
    if specs and apps:
        raise UsageError(
            f"module {module.__name__!r} has both an App and @strictconsume.consumer "
            f"functions outside it; name the App as {module.__name__}:ATTR"
        )
    if specs:
        app = App()
        for spec in specs:
            app.add_consumer(spec)
        return app
    if len(apps) == 1:
        return apps[0]
    raise UsageError(
        f"module {module.__name__!r} has no functions decorated with "
        "@strictconsume.consumer"
        + (f" and {len(apps)} Apps: name one as {module.__name__}:ATTR" if apps else "")
    )


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the message fields."""

    FIELDS = (
        "event",
        "queue",
        "message_id",
        "delivery_tag",
        "attempt",
        "duration",
        "outcome",
        "error",
        "delay",
        "trace_id",  # while a span is current (see _tracing.TraceContextFilter)
        "span_id",
        "worker",
    )

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in self.FIELDS:
            if hasattr(record, field):
                data[field] = getattr(record, field)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str, log_format: str, worker: int | None = None) -> None:
    """Log to stderr; a worker of ``--workers`` says which it is on every line."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        name = "%(name)s" if worker is None else f"%(name)s[worker {worker}]"
        handler.setFormatter(
            TraceContextFormatter(f"%(asctime)s %(levelname)-7s {name}: %(message)s")
        )
    handler.addFilter(TraceContextFilter())  # trace and span ids, when a span is current
    if worker is not None:

        def label(record: logging.LogRecord) -> bool:
            record.worker = worker
            return True

        handler.addFilter(label)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m strictconsume``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dlq"]:  # python -m strictconsume dlq ...: the dead-letter tool
        from ._dlq_tool import main as dlq_main

        return dlq_main(argv[1:])
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relay"]:  # python -m strictconsume relay MODULE:ATTR (an outbox Relay)
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        app = load_app(args.target)
        app.configure(
            urls=args.url,
            prefetch=args.prefetch,
            grace_period=args.grace_period,
            http=args.http,
            queue_stats_interval=args.queue_stats_interval,
            backend=args.backend,
            log_level=args.log_level,
            log_format=args.log_format,
            config=args.config,
            env=args.env,
            consumer_options=args.consumer,
            workers=args.workers,
        )
        settings = app.settings
        app.resolve_consumers()  # an unknown consumer or key: an error before connecting
        report = app.settings_report() if args.print_settings else None
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"strictconsume: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SettingsError as exc:
        print(f"strictconsume: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    if report is not None:
        print(report)
        return EXIT_OK
    index = os.environ.get(INDEX_ENV) if os.environ.get(LINK_ENV) else None
    configure_logging(
        settings.log_level, settings.log_format, None if index is None else int(index)
    )
    if os.environ.get(LINK_ENV) or settings.workers > 1:
        return _run_workers(app, args, settings)
    logging.getLogger("strictconsume").info(
        "strictconsume %s on %s, broker %s",
        __version__,
        settings.backend,
        ", ".join(settings.redacted_urls),
    )
    try:
        anyio.run(app.run, backend=settings.backend)
    except StartupError as exc:
        print(f"strictconsume: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:  # raised by a handler; the App stopped gracefully first
        return EXIT_INTERRUPTED
    return EXIT_OK


def _run_workers(app: App, args: argparse.Namespace, settings: Settings) -> int:
    """``--workers N``: the supervisor, or (``STRICTCONSUME_WORKER_LINK`` set) one of
    its workers; see :mod:`strictconsume._workers`."""
    link = os.environ.get(LINK_ENV)
    if link:
        app._code_settings["http"] = None  # the supervisor serves for the whole set
        try:
            anyio.run(
                run_worker, app, link, int(os.environ.get(INDEX_ENV, "0")), backend=settings.backend
            )
        except StartupError as exc:
            print(f"strictconsume: error: {exc}", file=sys.stderr)
            return EXIT_STARTUP
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        return EXIT_OK
    # Each worker gets the supervisor's command line but --workers and --http.
    options = [f"--url={url}" for url in args.url or ()]
    for name in (
        "prefetch",
        "grace_period",
        "queue_stats_interval",
        "backend",
        "log_level",
        "log_format",
        "config",
        "env",
    ):
        value = getattr(args, name)
        if value is not None:
            options.append(f"--{name.replace('_', '-')}={value}")
    options.extend(f"--consumer={option}" for option in args.consumer)
    logging.getLogger("strictconsume").info(
        "strictconsume %s: %d workers on %s, broker %s",
        __version__,
        settings.workers,
        settings.backend,
        ", ".join(settings.redacted_urls),
    )
    workers = WorkerSet(
        worker_command(args.target, options),
        settings.workers,
        grace_period=settings.grace_period,
        http=settings.http,
    )
    try:
        return anyio.run(workers.run, backend=settings.backend)
    except (OSError, ImportError) as exc:
        print(f"strictconsume: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
