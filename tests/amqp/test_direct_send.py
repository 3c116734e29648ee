"""Frames sent from the queuing task (``Channel.send_queued``) instead of the writer.

The connection hands what the core queued to a send that never waits when its writer
is idle; what that send does not take goes to the writer, before anything queued
later. Against the fake broker the "socket" is a function the test controls (it takes
a prefix of the bytes, nothing, or fails), so the byte stream the broker parses shows
whether a partial send ever reorders or tears frames. ``direct_sender`` itself is
checked on real loopback sockets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest
from pamqp import commands

from strictconsume.amqp import connect_stream
from strictconsume.amqp._direct import direct_sender

from .fake_broker import FakeBroker, MemoryByteStream, pair
from .test_connection_fake import PARAMS

if TYPE_CHECKING:
    from collections.abc import Callable

    from strictconsume.amqp import Connection

pytestmark = pytest.mark.anyio


class Socket:
    """A direct send that writes to the client's memory stream as a socket would:
    ``takes`` says how many bytes each call accepts (None: all; an exception: fails)."""

    def __init__(self, client: MemoryByteStream, takes: list[int | OSError | None]) -> None:
        self._client = client
        self._takes = takes
        self.calls: list[int] = []

    def __call__(self, data: bytes) -> int:
        take = self._takes.pop(0) if self._takes else None
        if isinstance(take, OSError):
            raise take
        n = len(data) if take is None else min(take, len(data))
        self.calls.append(n)
        if n:
            self._client._send.send_nowait(bytes(data[:n]))
        return n


async def acks_in_order(broker: FakeBroker, expected: list[tuple[int, bool]]) -> None:
    for delivery_tag, multiple in expected:
        ack = await broker.expect(commands.Basic.Ack, 1)
        assert (ack.delivery_tag, ack.multiple) == (delivery_tag, multiple)


async def run_acks(
    takes: list[int | OSError | None],
    sends: Callable[[Connection, Any], None],
    expected: list[tuple[int, bool]],
) -> Socket:
    client, broker = pair()

    async def script() -> None:
        await broker.handshake()
        await broker.open_channel(1)
        await acks_in_order(broker, expected)
        await broker.close_channel(1)
        await broker.close_connection()

    socket = Socket(client, takes)
    async with anyio.create_task_group() as tg:
        tg.start_soon(broker.serve, script)
        async with connect_stream(client, PARAMS) as conn, conn.channel() as ch:
            await conn._flushed()  # the channel.open went through the writer
            conn._direct = socket
            sends(conn, ch)
    return socket


async def test_a_batch_the_socket_takes_whole_needs_no_writer(anyio_backend: Any) -> None:
    def sends(conn: Connection, ch: Any) -> None:
        ch.ack_nowait(2, multiple=True, batch=True)
        ch.ack_nowait(4, batch=True)
        ch.send_queued()
        assert not conn._write_wanted.is_set()  # nothing left for the writer
        assert conn._core.bytes_pending() == 0

    socket = await run_acks([None], sends, [(2, True), (4, False)])
    assert len(socket.calls) == 1  # one send for the whole batch


@pytest.mark.parametrize("first", [0, 1, 7, 20], ids=lambda n: f"takes-{n}")
async def test_what_the_socket_did_not_take_goes_first_through_the_writer(
    anyio_backend: Any, first: int
) -> None:
    def sends(conn: Connection, ch: Any) -> None:
        ch.ack_nowait(1, batch=True)
        ch.ack_nowait(2, batch=True)
        ch.send_queued()  # takes `first` bytes: a torn frame is left
        assert conn._unsent
        ch.ack_nowait(3, batch=True)
        ch.send_queued()  # the writer owns the rest now: no direct send
        ch.ack_nowait(5, multiple=True)  # an ordinary ack, through the writer too

    socket = await run_acks([first], sends, [(1, False), (2, False), (3, False), (5, True)])
    assert socket.calls == [first]


async def test_a_failing_socket_leaves_every_byte_to_the_writer(anyio_backend: Any) -> None:
    def sends(conn: Connection, ch: Any) -> None:
        ch.ack_nowait(1, batch=True)
        ch.send_queued()
        assert conn._unsent  # nothing lost: all of it waits for the writer

    socket = await run_acks([OSError("EPIPE")], sends, [(1, False)])
    assert socket.calls == []


async def test_direct_sender_writes_to_a_tcp_socket(anyio_backend: Any) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, await anyio.connect_tcp("127.0.0.1", port) as stream:
        send = direct_sender(stream)
        assert send is not None
        received = bytearray()
        all_received = anyio.Event()

        async def serve(peer: anyio.abc.SocketStream) -> None:
            async with peer:
                while len(received) < 6:
                    received.extend(await peer.receive())
            all_received.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, serve, tg)
                assert send(b"abc") == 3
                await stream.send(b"de")  # the stream's own send still works after it
                assert send(b"f") == 1
                await all_received.wait()
                tg.cancel_scope.cancel()
    assert bytes(received) == b"abcdef"


async def test_no_direct_sender_for_a_stream_that_is_not_a_socket(anyio_backend: Any) -> None:
    client, broker = pair()
    try:
        assert direct_sender(client) is None
    finally:
        await client.aclose()
        await broker.stream.aclose()
