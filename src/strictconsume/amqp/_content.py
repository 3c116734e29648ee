"""Content assembly on one channel: a method, its content header, its body frames.

basic.deliver, basic.get-ok and basic.return are each followed on their channel by
one content header (class 60) and body frames until body_size bytes have arrived
(none when body_size is 0). Any other frame on that channel in the meantime is a
protocol error (the connection checks that); frames of other channels may
interleave. A body frame's payload is the content's bytes as they are (no codec).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import attrs
from pamqp import commands

from ._errors import RemoteProtocolError
from ._events import Delivery, GetResult, Returned
from ._framing import BASIC_CLASS, CONTENT_PREFIX, decode_header

__all__ = ["ContentAssembly", "ContentMethod"]

ContentMethod: TypeAlias = commands.Basic.Deliver | commands.Basic.GetOk | commands.Basic.Return


@attrs.define(slots=True, eq=False)
class ContentAssembly:
    """The content being assembled on one channel: the method, then the header, then
    body chunks."""

    content_method: ContentMethod | None = None
    content_properties: commands.Basic.Properties | None = None
    content_size: int = 0
    content_received: int = 0
    content_chunks: list[bytes] = attrs.Factory(list)
    # Why the content header's properties could not be decoded (a delivery only).
    content_error: str | None = None

    def reset_content(self) -> None:
        """Forget any content being assembled."""
        self.content_method = None
        self.content_properties = None
        self.content_error = None
        self.content_size = 0
        self.content_received = 0
        self.content_chunks = []

    def content_header(self, channel_id: int, payload: bytes) -> bool:
        """A content header frame's payload arrived.

        Returns:
            True when the content is complete with it (an empty body).

        Raises:
            RemoteProtocolError: No content method came before it, a header came
                already, it cannot be decoded, or its class is not basic.
        """
        method = self.content_method
        if method is None:
            raise RemoteProtocolError(
                f"the broker sent a content header on channel {channel_id} without a "
                "basic.deliver, basic.get-ok or basic.return before it"
            )
        if self.content_properties is not None:
            raise RemoteProtocolError(
                f"the broker sent a second content header on channel {channel_id} for "
                f"{method.name} while its body was still expected"
            )
        try:
            class_id, body_size, properties = decode_header(payload)
        except RemoteProtocolError as exc:
            # The frame is whole (its end octet checked); only its properties are not
            # valid Python values (a header name or short string that is not UTF-8, an
            # unknown field type), as any client may publish. A delivery is then handed
            # on with empty properties and the reason, for the consumer to reject it
            # to its dead-letter queue, raw properties intact; the connection lives.
            if type(method) is not commands.Basic.Deliver or len(payload) < 12:
                raise
            class_id, body_size = CONTENT_PREFIX.unpack_from(payload)
            if class_id != BASIC_CLASS:
                raise
            self.content_error = f"its properties cannot be decoded ({exc.__cause__ or exc})"
            properties = commands.Basic.Properties()
        if class_id != BASIC_CLASS:
            raise RemoteProtocolError(
                f"the broker sent a content header of class {class_id} on channel "
                f"{channel_id}; only the basic class (60) has content"
            )
        self.content_properties = properties
        self.content_size = body_size
        return not body_size

    def content_body(self, channel_id: int, payload: bytes) -> bytes | None:
        """A body frame's payload arrived.

        Returns:
            The whole body once it is complete, else None.

        Raises:
            RemoteProtocolError: No content header came before it, or the body is
                longer than the header announced.
        """
        if self.content_properties is None:
            raise RemoteProtocolError(
                f"the broker sent a body frame on channel {channel_id} without a content "
                "header before it"
            )
        received = self.content_received + len(payload)
        if received > self.content_size:
            raise RemoteProtocolError(
                f"the broker sent more body bytes on channel {channel_id} than the "
                f"{self.content_size} its content header announced"
            )
        if received == self.content_size:
            chunks = self.content_chunks
            if chunks:
                chunks.append(payload)
                payload = b"".join(chunks)
            return payload
        self.content_chunks.append(payload)
        self.content_received = received
        return None

    def content_complete(
        self,
        channel_id: int,
        body: bytes,
        match_return: Callable[[str, str, bytes], int | None],
    ) -> Delivery | GetResult | Returned:
        """The content is whole: the event it makes (``match_return`` gives a returned
        message its publish sequence number); the channel is ready for the next."""
        method = self.content_method
        properties = self.content_properties
        error = self.content_error
        assert method is not None
        assert properties is not None
        self.content_method = None
        self.content_properties = None
        self.content_error = None
        self.content_size = 0
        self.content_received = 0
        if self.content_chunks:
            self.content_chunks = []
        if type(method) is commands.Basic.Deliver:
            return Delivery(
                channel_id,
                method.consumer_tag or "",
                method.delivery_tag or 0,
                method.redelivered,
                method.exchange,
                method.routing_key or "",
                properties,
                body,
                error,
            )
        if isinstance(method, commands.Basic.GetOk):
            return GetResult(
                channel_id,
                method.delivery_tag or 0,
                method.redelivered,
                method.exchange,
                method.routing_key or "",
                method.message_count or 0,
                properties,
                body,
            )
        assert isinstance(method, commands.Basic.Return)
        exchange = method.exchange
        routing_key = method.routing_key or ""
        return Returned(
            channel_id,
            match_return(exchange, routing_key, body),
            method.reply_code or 0,
            method.reply_text,
            exchange,
            routing_key,
            properties,
            body,
        )
