"""``python -m strictconsume [options] MODULE[:ATTR]``.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT, ``app.stop()``); 1 when the App
cannot start (unusable settings, wrong credentials, unknown vhost, a topology
mismatch: one line on stderr says which); 2 for a usage error (a bad option, a module
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
from ._settings import SettingsError
from ._supervisor import StartupError

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


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m strictconsume``; returns the exit code."""
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
            backend=args.backend,
            log_level=args.log_level,
            log_format=args.log_format,
        )
        settings = app.settings
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"strictconsume: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SettingsError as exc:
        print(f"strictconsume: error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    configure_logging(settings.log_level, settings.log_format)
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
