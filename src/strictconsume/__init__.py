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

__version__ = "0.1.0.dev0"

from ._app import App as App
from ._consumer import Binding as Binding
from ._consumer import ConsumerSpec as ConsumerSpec
from ._consumer import consumer as consumer
from ._message import DecodeError as DecodeError
from ._message import Message as Message
from ._outcome import Duplicate as Duplicate
from ._outcome import Reject as Reject
from ._outcome import Requeue as Requeue
from ._outcome import RetryLater as RetryLater
from ._publisher import Publisher as Publisher
from ._retry import Retry as Retry
from ._settings import SettingsError as SettingsError
from ._supervisor import StartupError as StartupError
from .idempotency import Idempotency as Idempotency

# Show public classes as strictconsume.X (in reprs, tracebacks and the x-error-type
# header of dead letters), not as the private module that defines them.
for _cls in (
    App,
    Binding,
    ConsumerSpec,
    DecodeError,
    Duplicate,
    Idempotency,
    Message,
    Reject,
    Requeue,
    Publisher,
    Retry,
    RetryLater,
    SettingsError,
    StartupError,
):
    _cls.__module__ = __name__
del _cls
