"""What the connection takes from the running event loop once, instead of per call:
its clock, and a write that never waits.

anyio looks the backend up on every ``anyio.current_time()`` (on asyncio under Python
3.11 that includes a ``getpid()`` system call), and the connection reads the clock on
every read and write for its heartbeat. The loop's own clock is the same clock
(``trio.current_time`` is what anyio calls on trio; ``loop.time`` on asyncio), taken
once per connection.

A write that never waits lets the task that queued frames (an ack, mostly) hand them
to the socket itself when the writer task is idle, instead of waking the writer: at a
prefetch of 1 that is one scheduler round and two task steps less per message. It is
only used where it cannot reorder or tear the byte stream:

- on trio, the stream's socket (non-blocking, as trio sets every socket) is sent to
  directly. ``socket.send`` writes a prefix of the bytes or nothing; the connection
  keeps what was not taken and hands it to the writer before anything else;
- on asyncio, the stream's transport is written to when its buffer is empty (the
  transport sends at once, and keeps any rest in order); otherwise the writer sends,
  through the stream, with its backpressure;
- never through TLS (the bytes must go through the TLS object), nor over any other
  stream (a test's memory stream, a proxy): there the writer sends everything, as
  before.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import anyio
import anyio.abc
import sniffio

__all__ = ["DirectSend", "direct_sender", "loop_clock"]

#: Sends a prefix of the bytes given without waiting, and returns its length (0 when
#: the socket takes nothing now). Raises ``OSError`` when the socket is broken.
DirectSend = Callable[[bytes], int]


def loop_clock() -> Callable[[], float]:
    """The running loop's clock (what ``anyio.current_time`` returns), without the
    per-call backend lookup. Call it inside the loop."""
    # Imported here: a process on trio never loads asyncio, nor one on asyncio trio.
    if sniffio.current_async_library() == "trio":
        return importlib.import_module("trio").current_time  # type: ignore[no-any-return]
    return importlib.import_module("asyncio").get_running_loop().time  # type: ignore[no-any-return]


def direct_sender(stream: anyio.abc.ByteStream) -> DirectSend | None:
    """A write to ``stream`` that never waits, or None when it has none (see above)."""
    if not isinstance(stream, anyio.abc.SocketStream):
        return None  # TLS, memory streams, wrappers: only the writer writes
    if sniffio.current_async_library() == "trio":
        sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        send = sock.send

        def send_to_socket(data: bytes) -> int:
            try:
                return send(data)
            except BlockingIOError:
                return 0

        return send_to_socket
    # anyio's asyncio SocketStream writes through its transport; nothing public
    # names it, so look for it and do without when it is not there.
    transport = getattr(stream, "_transport", None)
    if not isinstance(transport, importlib.import_module("asyncio").WriteTransport):
        return None

    def send_to_transport(data: bytes) -> int:
        if transport.is_closing() or transport.get_write_buffer_size():
            return 0  # behind, or closing: the writer sends, and reports the error
        transport.write(data)
        return len(data)

    return send_to_transport
