"""Errors raised by the AMQP client.

Who broke it decides the class (as in h11 and trio):

- :class:`LocalProtocolError`: the caller asked for something the protocol does not
  allow in the current state (a method on a closed channel, a publish before the
  handshake, an ack on a channel without consumers...). Fix the calling code.
- :class:`RemoteProtocolError`: the peer sent bytes that are not AMQP 0-9-1 or break
  its rules (garbage, an HTTP server on the port, a body frame without a header...).
  The connection cannot continue.
- :class:`ConnectionLost`: the transport went away (EOF, reset, TLS failure, the
  broker fell silent for two heartbeat intervals).
- :class:`ConnectionClosed` / :class:`ChannelClosed`: the broker closed the
  connection or a channel with a reply code and text (403 ACCESS_REFUSED,
  404 NOT_FOUND, 406 PRECONDITION_FAILED, 530 NOT_ALLOWED, 320 CONNECTION_FORCED...).
  Reply codes are attributes, not subclasses.
- :class:`ConsumerCancelled`: the broker cancelled a consumer (queue deleted, node
  lost); the caller may subscribe again.
- :class:`MessageReturned` / :class:`PublishNacked`: a confirmed publish did not
  reach a queue.
- :class:`ReplyTimeout`: the broker did not answer a synchronous method in time (its
  channel is then closed, since a late reply could no longer be matched).

Every error's message says what happened and what to do; none ever contains a
password.
"""

from __future__ import annotations

__all__ = [
    "AMQPError",
    "ChannelClosed",
    "ConnectionClosed",
    "ConnectionLost",
    "ConsumerCancelled",
    "LocalProtocolError",
    "MessageReturned",
    "PublishNacked",
    "RemoteProtocolError",
    "ReplyTimeout",
]

# Reply codes of AMQP 0-9-1 (and RabbitMQ's use of them), for readable messages.
REPLY_CODE_NAMES: dict[int, str] = {
    200: "REPLY_SUCCESS",
    311: "CONTENT_TOO_LARGE",
    312: "NO_ROUTE",
    313: "NO_CONSUMERS",
    320: "CONNECTION_FORCED",
    402: "INVALID_PATH",
    403: "ACCESS_REFUSED",
    404: "NOT_FOUND",
    405: "RESOURCE_LOCKED",
    406: "PRECONDITION_FAILED",
    501: "FRAME_ERROR",
    502: "SYNTAX_ERROR",
    503: "COMMAND_INVALID",
    504: "CHANNEL_ERROR",
    505: "UNEXPECTED_FRAME",
    506: "RESOURCE_ERROR",
    530: "NOT_ALLOWED",
    540: "NOT_IMPLEMENTED",
    541: "INTERNAL_ERROR",
}

# What a user can do about a given reply code; appended to error messages.
_ADVICE: dict[int, str] = {
    320: "the broker or an operator closed the connection; reconnect",
    403: "check the user name and password (or the user's permissions on this vhost)",
    404: "declare the queue or exchange first, or check its name",
    405: "another connection holds this queue exclusively",
    406: "the arguments differ from what is declared on the broker, or a delivery "
    "tag is unknown on this channel",
    530: "check that the vhost exists and the user may access it",
}


class AMQPError(Exception):
    """Base class of every error raised by :mod:`strictconsume.amqp`."""


class LocalProtocolError(AMQPError):
    """The caller used the client in a way the protocol or its state forbids."""


class UnsupportedSetting(LocalProtocolError):
    """A connection setting the broker cannot accept, found during the handshake
    (for example a frame_max below the broker's minimum). Retrying cannot help."""


class RemoteProtocolError(AMQPError):
    """The peer sent something that is not valid AMQP 0-9-1 at this point."""


class ConnectionLost(AMQPError):
    """The connection to the broker broke without a connection.close."""


# Advice for a reply whose text says more than its code, checked before _ADVICE:
# (reply code, what the reply text contains, the advice).
_TEXT_ADVICE: tuple[tuple[int, str, str], ...] = (
    (
        406,
        "larger than configured max size",
        "the message is larger than the broker's max_message_size (16 MiB by default "
        "from RabbitMQ 4.0, 128 MiB before): send a smaller body (store large payloads "
        "elsewhere and send a reference), or raise max_message_size on the broker",
    ),
    (
        541,
        "transient_nonexcl_queues",
        "this broker refuses transient non-exclusive queues (a feature RabbitMQ 4.3 "
        "deprecates): declare the queue durable",
    ),
)

#: The broker's reply text when a publish exceeds its max_message_size (406).
_TOO_LARGE_TEXT = _TEXT_ADVICE[0][1]


class _ReplyError(AMQPError):
    """An error that carries the broker's reply code and text."""

    def __init__(
        self,
        reply_code: int,
        reply_text: str,
        class_id: int = 0,
        method_id: int = 0,
        *,
        context: str = "",
    ) -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.class_id = class_id
        self.method_id = method_id
        self.context = context
        super().__init__(self._message())

    @property
    def reply_name(self) -> str:
        """The symbolic name of the reply code, for example ``"ACCESS_REFUSED"``."""
        return REPLY_CODE_NAMES.get(self.reply_code, "UNKNOWN")

    def _what(self) -> str:
        raise NotImplementedError

    def _message(self) -> str:
        text = f"{self._what()}: {self.reply_code} {self.reply_text or self.reply_name}"
        if self.context:
            text = f"{text} ({self.context})"
        advice = next(
            (
                advice
                for code, contains, advice in _TEXT_ADVICE
                if code == self.reply_code and contains in self.reply_text
            ),
            _ADVICE.get(self.reply_code),
        )
        if advice:
            text = f"{text}; {advice}"
        return text


class ConnectionClosed(_ReplyError):
    """The broker closed the connection (connection.close) with a reply code."""

    def _what(self) -> str:
        return "the broker closed the connection"

    @property
    def deprecated_feature(self) -> bool:
        """The broker refused a deprecated feature it is configured not to permit
        (541, for example a transient non-exclusive queue on RabbitMQ 4.3): trying
        again cannot help."""
        return self.reply_code == 541 and "is deprecated" in self.reply_text


class ChannelClosed(_ReplyError):
    """The broker closed a channel (channel.close); the connection is still usable."""

    def __init__(
        self,
        reply_code: int,
        reply_text: str,
        class_id: int = 0,
        method_id: int = 0,
        *,
        channel_id: int = 0,
        context: str = "",
    ) -> None:
        self.channel_id = channel_id
        super().__init__(reply_code, reply_text, class_id, method_id, context=context)

    @property
    def message_too_large(self) -> bool:
        """The broker refused a publish larger than its max_message_size: sending the
        same body again cannot succeed."""
        return self.reply_code == 406 and _TOO_LARGE_TEXT in self.reply_text

    def _what(self) -> str:
        return f"the broker closed channel {self.channel_id}"


class ConsumerCancelled(AMQPError):
    """The broker cancelled a consumer (basic.cancel): the queue was deleted or its
    node went away. Subscribe again (after declaring the queue) to resume."""

    def __init__(self, consumer_tag: str, queue: str = "") -> None:
        self.consumer_tag = consumer_tag
        self.queue = queue
        where = f" on queue {queue!r}" if queue else ""
        super().__init__(
            f"the broker cancelled consumer {consumer_tag!r}{where} (the queue was deleted "
            "or its node is gone); declare the queue and consume again"
        )


class MessageReturned(AMQPError):
    """A mandatory publish could not be routed to any queue (basic.return)."""

    def __init__(self, reply_code: int, reply_text: str, exchange: str, routing_key: str) -> None:
        self.reply_code = reply_code
        self.reply_text = reply_text
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(
            f"the broker returned the message published to exchange {exchange!r} with "
            f"routing key {routing_key!r}: {reply_code} {reply_text}; no queue is bound "
            "for it: declare and bind the queue first"
        )


class PublishNacked(AMQPError):
    """The broker refused a confirmed publish (basic.nack): the message was not stored."""

    def __init__(self, exchange: str, routing_key: str) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(
            f"the broker nacked the message published to exchange {exchange!r} with routing "
            f"key {routing_key!r}: it was not stored (a full queue with overflow "
            "reject-publish, or an internal error); retry later or make room"
        )


class ReplyTimeout(AMQPError, TimeoutError):
    """The broker did not answer a synchronous method (qos, declare, consume...) in
    time. The channel is closed (channel.close), since a late reply could no longer
    be matched to its call; the connection and its other channels go on."""
