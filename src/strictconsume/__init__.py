"""strictconsume: RabbitMQ consumers that never lose a message.

::

    import strictconsume as sc

    app = sc.App(url="amqp://guest:guest@localhost:5672/")

    @app.consumer("orders", timeout=30.0, retry=sc.Retry(delays=(1.0, 10.0, 60.0)))
    async def handle_order(msg: sc.Message) -> None:
        order = msg.json()
        ...

Run it with ``python -m strictconsume module:app``. The framework is built on
:mod:`strictconsume.amqp`, an AMQP 0-9-1 client on anyio that runs on trio and asyncio.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

from .amqp import __version__ as __version__

if _typing.TYPE_CHECKING:
    from ._app import App as App
    from ._consumer import Binding as Binding
    from ._consumer import ConsumerSpec as ConsumerSpec
    from ._consumer import consumer as consumer
    from ._message import DecodeError as DecodeError
    from ._message import Message as Message
    from ._middleware import CallNext as CallNext
    from ._middleware import Middleware as Middleware
    from ._outcome import Duplicate as Duplicate
    from ._outcome import Reject as Reject
    from ._outcome import Requeue as Requeue
    from ._outcome import RetryLater as RetryLater
    from ._publisher import Publisher as Publisher
    from ._retry import Retry as Retry
    from ._settings import SettingsError as SettingsError
    from ._supervisor import StartupError as StartupError
    from ._tracing import TraceContextFilter as TraceContextFilter
    from ._tracing import TraceContextFormatter as TraceContextFormatter
    from ._typed import InvalidBody as InvalidBody
    from .idempotency import Idempotency as Idempotency

# The framework's names load on first use, so that ``import strictconsume.amqp`` (which
# runs this module first) gives the client alone: name -> the module defining it.
_FRAMEWORK: dict[str, str] = {
    "App": "._app",
    "Binding": "._consumer",
    "ConsumerSpec": "._consumer",
    "consumer": "._consumer",
    "DecodeError": "._message",
    "Message": "._message",
    "CallNext": "._middleware",
    "Middleware": "._middleware",
    "Duplicate": "._outcome",
    "Reject": "._outcome",
    "Requeue": "._outcome",
    "RetryLater": "._outcome",
    "Publisher": "._publisher",
    "Retry": "._retry",
    "SettingsError": "._settings",
    "StartupError": "._supervisor",
    "TraceContextFilter": "._tracing",
    "TraceContextFormatter": "._tracing",
    "InvalidBody": "._typed",
    "Idempotency": ".idempotency",
}


def _load_framework() -> None:
    """Import every framework name into this module at once."""
    namespace = globals()
    for name, module in _FRAMEWORK.items():
        value = getattr(_importlib.import_module(module, __name__), name)
        # Show public classes as strictconsume.X (in reprs, tracebacks and the
        # x-error-type header of dead letters), not as the private module that
        # defines them.
        if isinstance(value, type):
            value.__module__ = __name__
        namespace[name] = value


def __getattr__(name: str) -> object:
    if name in _FRAMEWORK:
        _load_framework()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FRAMEWORK))
