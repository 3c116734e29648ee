"""An AMQP 0-9-1 client for trio and asyncio (through anyio), with a sans-IO core.

Usable on its own::

    async with strictconsume.amqp.connect("amqp://guest:guest@localhost/") as conn:
        async with conn.channel(confirms=True) as ch:
            await ch.queue_declare("hello")
            await ch.publish(b"hi", routing_key="hello")
"""

from __future__ import annotations

from ._errors import AMQPError as AMQPError
from ._errors import ChannelClosed as ChannelClosed
from ._errors import ConnectionClosed as ConnectionClosed
from ._errors import ConnectionLost as ConnectionLost
from ._errors import ConsumerCancelled as ConsumerCancelled
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import MessageReturned as MessageReturned
from ._errors import PublishNacked as PublishNacked
from ._errors import RemoteProtocolError as RemoteProtocolError
