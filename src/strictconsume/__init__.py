"""strictconsume: RabbitMQ consumers that never lose a message.

The framework (``@consumer``, ``App``) is built on :mod:`strictconsume.amqp`, an
AMQP 0-9-1 client on anyio that runs on trio and asyncio.
"""

from __future__ import annotations

__version__ = "0.1.0.dev0"
