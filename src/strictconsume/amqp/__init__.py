"""An AMQP 0-9-1 client for trio and asyncio (through anyio), with a sans-IO core.

Usable on its own::

    async with strictconsume.amqp.connect("amqp://guest:guest@localhost/") as conn:
        async with conn.channel(confirms=True) as ch:
            await ch.queue_declare("hello")
            await ch.publish(b"hi", routing_key="hello")
"""

from __future__ import annotations

from pamqp.commands import Basic as _Basic

from ._channel import Channel as Channel
from ._channel import Consumer as Consumer
from ._channel import QueueDeclareOk as QueueDeclareOk
from ._codec import Headers as Headers
from ._codec import Timestamp as Timestamp
from ._codec import decode_properties as decode_properties
from ._codec import encode_properties as encode_properties
from ._connection import Connection as Connection
from ._connection import asyncio_cancel_requested as asyncio_cancel_requested
from ._connection import connect as connect
from ._connection import connect_stream as connect_stream
from ._errors import AMQPError as AMQPError
from ._errors import ChannelClosed as ChannelClosed
from ._errors import ConnectionClosed as ConnectionClosed
from ._errors import ConnectionLost as ConnectionLost
from ._errors import ConsumerCancelled as ConsumerCancelled
from ._errors import LocalProtocolError as LocalProtocolError
from ._errors import MessageReturned as MessageReturned
from ._errors import PublishNacked as PublishNacked
from ._errors import RemoteProtocolError as RemoteProtocolError
from ._errors import ReplyTimeout as ReplyTimeout
from ._errors import UnsupportedSetting as UnsupportedSetting
from ._protocol import Delivery as Delivery
from ._protocol import GetResult as GetResult
from ._url import ConnectionParameters as ConnectionParameters
from ._url import parse_url as parse_url
from ._url import redact_url as redact_url
from ._version import __version__ as __version__
from ._waiter import Flag as Flag

#: Message properties (content_type, headers, message_id, delivery_mode, ...): pamqp's
#: ``Basic.Properties``, so that no per-message conversion is needed.
Properties = _Basic.Properties
