"""A scripted fake AMQP broker over in-memory streams, for the client's I/O tests.

:func:`pair` returns the client's end (an anyio byte stream, given to
``connect_stream``) and a :class:`FakeBroker` driving the other end. A test writes the
broker's side as a script: ``await broker.handshake()``, ``await broker.expect(...)``,
``await broker.send(channel, frame)``. Frames are encoded and decoded with pamqp, the
same codec the client uses, so a script reads like the protocol trace it stands for.

The broker side never guesses: :meth:`FakeBroker.expect` fails the test when the
client sent something else, and :meth:`FakeBroker.expect_eof` when the client did
not close the connection. Every frame received is kept in
:attr:`FakeBroker.received` with the (virtual) time the script read it; a script whose
test asserts when frames arrive keeps reading (``expect_eof``) while it waits.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.abc
import attrs
import pamqp.frame
from pamqp import body, commands, header
from pamqp.base import Frame

if TYPE_CHECKING:
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from pamqp.common import FieldTable

__all__ = ["FakeBroker", "MemoryByteStream", "Received", "pair"]

F = TypeVar("F", bound=Frame)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
SERVER_PROPERTIES: FieldTable = {
    "product": "FakeMQ",
    "version": "0.0.1",
    "capabilities": {"publisher_confirms": True, "consumer_cancel_notify": True},
}


class MemoryByteStream(anyio.abc.ByteStream):
    """One end of an in-memory byte pipe (two memory object streams of bytes).

    Closing a side behaves like a socket: the peer's ``receive`` raises
    ``anyio.EndOfStream`` once it has read what was sent, and sending to a peer that
    closed raises ``anyio.BrokenResourceError``.
    """

    def __init__(
        self, send: MemoryObjectSendStream[bytes], receive: MemoryObjectReceiveStream[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self._pending = b""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if not self._pending:
            self._pending = await self._receive.receive()
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def send(self, item: bytes) -> None:
        await self._send.send(bytes(item))

    async def send_eof(self) -> None:
        self._send.close()

    async def close_receive(self) -> None:
        self._receive.close()

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()


@attrs.frozen
class Received:
    """One frame the broker received: its channel, the decoded frame, and when."""

    channel: int
    frame: object
    time: float


class ClientClosed(Exception):
    """The client closed its end while the script expected a frame."""


class FakeBroker:
    """The broker's end of the pipe, driven by a test script."""

    def __init__(self, stream: MemoryByteStream) -> None:
        self.stream = stream
        #: What connection.start says; a script may set another version first.
        self.server_properties: FieldTable = dict(SERVER_PROPERTIES)
        self.received: list[Received] = []
        self._buffer = bytearray()

    async def serve(self, script: Callable[[], Awaitable[None]]) -> None:
        """Run a test's script of the broker's side, then close the broker's end."""
        try:
            await script()
        finally:
            await self.stream.aclose()

    # -- reading ---------------------------------------------------------------------

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            try:
                self._buffer += await self.stream.receive()
            except anyio.EndOfStream:
                raise ClientClosed(
                    f"the client closed the connection; {len(self._buffer)} bytes left "
                    f"unparsed: {bytes(self._buffer)!r}"
                ) from None

    async def receive_protocol_header(self) -> None:
        await self._fill(8)
        data = bytes(self._buffer[:8])
        del self._buffer[:8]
        assert data == PROTOCOL_HEADER, f"expected the AMQP 0-9-1 header, got {data!r}"

    async def receive_frame(self) -> Received:
        """The next frame the client sent (heartbeats included)."""
        await self._fill(7)
        size = int.from_bytes(self._buffer[3:7], "big")
        await self._fill(7 + size + 1)
        consumed, channel, frame = pamqp.frame.unmarshal(bytes(self._buffer[: 7 + size + 1]))
        assert consumed == 7 + size + 1
        del self._buffer[:consumed]
        received = Received(channel, frame, anyio.current_time())
        self.received.append(received)
        return received

    async def expect(self, kind: type[F], channel: int | None = None) -> F:
        """The next frame, which must be the method ``kind`` (on ``channel`` if given)."""
        got = await self.receive_frame()
        assert isinstance(got.frame, kind), (
            f"expected {kind.name}, the client sent {got.frame!r} on channel {got.channel}"
        )
        if channel is not None:
            assert got.channel == channel, (
                f"expected {kind.name} on channel {channel}, got it on channel {got.channel}"
            )
        return got.frame

    async def expect_publish(self, channel: int) -> tuple[commands.Basic.Publish, bytes]:
        """A basic.publish with its content header and body frames."""
        method = await self.expect(commands.Basic.Publish, channel)
        content = await self.receive_frame()
        assert isinstance(content.frame, header.ContentHeader)
        data = b""
        while len(data) < content.frame.body_size:
            chunk = await self.receive_frame()
            assert isinstance(chunk.frame, body.ContentBody)
            data += chunk.frame.value
        return method, data

    async def expect_eof(self) -> list[object]:
        """Read until the client closes the connection; return what it sent meanwhile."""
        frames: list[object] = []
        while True:
            try:
                frames.append((await self.receive_frame()).frame)
            except ClientClosed:
                assert not self._buffer, f"the client left half a frame: {bytes(self._buffer)!r}"
                return frames

    # -- writing ---------------------------------------------------------------------

    @staticmethod
    def frame(channel: int, frame: pamqp.frame.FrameTypes) -> bytes:
        """The bytes of one frame, to combine several channels' frames in one write."""
        return pamqp.frame.marshal(frame, channel)

    async def send(self, channel: int, *frames: pamqp.frame.FrameTypes) -> None:
        """Send frames on ``channel`` in one write."""
        await self.send_raw(b"".join(pamqp.frame.marshal(f, channel) for f in frames))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send(data)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def stop_reading(self) -> None:
        """Close the broker's receiving side: the client's next write fails."""
        await self.stream.close_receive()

    @staticmethod
    def deliver_bytes(
        channel: int,
        consumer_tag: str,
        delivery_tag: int,
        data: bytes,
        *,
        routing_key: str = "q",
    ) -> bytes:
        """The frames of one basic.deliver with its content."""
        frames = [
            pamqp.frame.marshal(
                commands.Basic.Deliver(consumer_tag, delivery_tag, False, "", routing_key),
                channel,
            ),
            pamqp.frame.marshal(
                header.ContentHeader(0, len(data), commands.Basic.Properties()), channel
            ),
        ]
        if data:
            frames.append(pamqp.frame.marshal(body.ContentBody(data), channel))
        return b"".join(frames)

    async def deliver(
        self, channel: int, consumer_tag: str, delivery_tag: int, data: bytes
    ) -> None:
        await self.send_raw(self.deliver_bytes(channel, consumer_tag, delivery_tag, data))

    # -- whole exchanges -------------------------------------------------------------

    async def start(self) -> commands.Connection.StartOk:
        """Read the protocol header, send connection.start, read start-ok."""
        await self.receive_protocol_header()
        await self.send(
            0,
            commands.Connection.Start(
                server_properties=self.server_properties,
                mechanisms="PLAIN AMQPLAIN",
                locales="en_US",
            ),
        )
        return await self.expect(commands.Connection.StartOk, 0)

    async def handshake(
        self, *, heartbeat: int = 0, frame_max: int = 131072, channel_max: int = 2047
    ) -> tuple[commands.Connection.StartOk, commands.Connection.TuneOk, commands.Connection.Open]:
        """The whole handshake up to connection.open-ok; returns what the client sent."""
        start_ok = await self.start()
        await self.send(0, commands.Connection.Tune(channel_max, frame_max, heartbeat))
        tune_ok = await self.expect(commands.Connection.TuneOk, 0)
        open_ = await self.expect(commands.Connection.Open, 0)
        await self.send(0, commands.Connection.OpenOk())
        return start_ok, tune_ok, open_

    async def open_channel(self, channel: int) -> None:
        await self.expect(commands.Channel.Open, channel)
        await self.send(channel, commands.Channel.OpenOk())

    async def close_channel(self, channel: int) -> None:
        """Answer the client's channel.close."""
        await self.expect(commands.Channel.Close, channel)
        await self.send(channel, commands.Channel.CloseOk())

    async def close_connection(self) -> None:
        """Answer the client's connection.close, then see the client drop the socket."""
        close = await self.expect(commands.Connection.Close, 0)
        assert close.reply_code == 200
        await self.send(0, commands.Connection.CloseOk())
        assert await self.expect_eof() == []


def pair(*, client_buffer: float = math.inf) -> tuple[MemoryByteStream, FakeBroker]:
    """A connected (client stream, fake broker) pair.

    Args:
        client_buffer: How many of the client's writes may wait unread; with 0 every
            write of the client blocks until the broker reads it (a full socket).
    """
    to_broker_send, to_broker_receive = anyio.create_memory_object_stream[bytes](client_buffer)
    to_client_send, to_client_receive = anyio.create_memory_object_stream[bytes](math.inf)
    client = MemoryByteStream(to_broker_send, to_client_receive)
    broker = FakeBroker(MemoryByteStream(to_client_send, to_broker_receive))
    return client, broker
