"""Coverage-guided fuzzing of the AMQP core's input side (atheris, i.e. libFuzzer).

Whatever bytes a broker sends, ``ProtocolConnection.receive_data`` must return
documented events or raise RemoteProtocolError: never another exception, never a
hang (libFuzzer's ``-timeout``), and never grow without bound. After every piece of
input :func:`run` checks that the events are of the documented types down to each
field, that the core buffers no more than the tail of one incomplete frame, that
content being assembled stays within its announced size, and that what the core
queued in answer is well-formed frames; after a protocol error, that the connection
is closed and refuses more input. Any other exception (an AssertionError of these
checks included) propagates out of :func:`TestOneInput`: atheris reports a crash.

Run as the fuzzer, from the repository root (libFuzzer flags follow the corpus)::

    .venv/bin/python -m tests.fuzz.fuzz_frames CORPUS_DIR -max_total_time=60 -max_len=4096

Fuzz over a copy of ``tests/fuzz/corpus`` (libFuzzer adds what it finds to the first
directory), then add to the committed corpus only the inputs that add coverage to it
(``-set_cover_merge=1`` keeps fewer files than ``-merge=1`` for the same features)::

    .venv/bin/python -m tests.fuzz.fuzz_frames -set_cover_merge=1 tests/fuzz/corpus COPY_DIR

To minimise a crashing input (libFuzzer runs itself again for this, see :func:`main`)::

    .venv/bin/python -m tests.fuzz.fuzz_frames -minimize_crash=1 -runs=20000 \
        -exact_artifact_path=tests/fuzz/corpus/regress-NAME CRASH_FILE

Imported, this module needs no atheris: ``tests/fuzz/test_fuzz.py`` replays every
corpus file through :func:`TestOneInput` in-process.

An input is laid out as follows (:func:`decode_input`; :func:`encode_input` writes
it). The splitting is done here rather than with atheris' FuzzedDataProvider so that
an input means the same thing with or without atheris::

    byte 0          the phase the connection is driven to first: byte 0 % len(PHASES)
    byte 1          how many cut points follow: byte 1 % 16
    2 bytes each    the cut points, big-endian, each modulo len(stream) + 1
    the rest        the stream "from the broker", fed in pieces split at the cut points

The phases (``PHASES``) reuse the sessions of ``tests/amqp/test_protocol_fuzz.py``:

0. handshake: initiated, nothing received yet; the stream starts with
   connection.start. Between pieces the client takes its steps as soon as they are
   due: it opens channels 1 and 2 once the connection is open, and sends the requests
   of ``client_requests`` once both are open.
1. consuming: the handshake done, channels 1 and 2 open, ``client_requests`` sent and
   answered up to basic.get: consumer "ctag" runs on channel 1 (its basic.get awaits
   get-ok or get-empty), channel 2 is in confirm mode with publishes 1 to 3
   outstanding (2 is mandatory: exchange "", routing key "nowhere", body b"two").
2. mid-content: consuming, plus basic.deliver (delivery tag 1), its content header and
   the first of the body frames of ``MID_BODY`` on channel 1; the rest of the body is
   ``MID_REST``.
3. channel-closing: consuming, then the client closes channel 2.
4. connection-closing: consuming, then the client closes the connection.
"""

from __future__ import annotations

import itertools
import shlex
import struct
import sys
import types
import typing

if __name__ == "__main__":
    # Run as the fuzzer: instrument the core (and pamqp, its codec) for coverage
    # feedback before anything else imports them.
    import atheris

    with atheris.instrument_imports(include=["strictconsume", "pamqp"]):
        import pamqp.frame  # noqa: F401

        import strictconsume.amqp._protocol  # noqa: F401

from collections.abc import Callable
from typing import Any, Final

import attrs
import pytest
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from strictconsume.amqp._errors import (
    LocalProtocolError,
    RemoteProtocolError,
    UnsupportedSetting,
)
from strictconsume.amqp._protocol import ChannelState, ConnectionState, Event, ProtocolConnection
from tests.amqp.test_protocol import Props, parse, server
from tests.amqp.test_protocol_fuzz import (
    EVENT_TYPES,
    TRAFFIC,
    check_events,
    client_requests,
    fresh,
    ready_for_traffic,
)

_CUT: Final = struct.Struct(">H")
MAX_CUTS: Final = 16
# The longest frame the core may ever buffer (its limit before connection.tune).
PRE_TUNE_FRAME_LIMIT: Final = 131072

# The broker's answers to client_requests up to basic.get: qos-ok and consume-ok on
# channel 1, confirm.select-ok and queue.declare-ok on channel 2.
CONSUME_ANSWERS: Final = TRAFFIC[0] + TRAFFIC[1]
# The content the mid-content phase is in the middle of: 200 bytes in body frames of
# 64 bytes (a broker may send body frames smaller than frame_max).
MID_BODY: Final = bytes(range(200))
MID_CHUNK: Final = 64
MID_DELIVER: Final = commands.Basic.Deliver("ctag", 1, False, "ex", "rk")
MID_PROPERTIES: Final = Props(content_type="text/plain", headers={"n": 1})
MID_PREFIX: Final = server(
    1,
    MID_DELIVER,
    ContentHeader(0, len(MID_BODY), MID_PROPERTIES),
    ContentBody(MID_BODY[:MID_CHUNK]),
)
MID_REST: Final = [
    server(1, ContentBody(MID_BODY[i : i + MID_CHUNK]))
    for i in range(MID_CHUNK, len(MID_BODY), MID_CHUNK)
]


def _consuming() -> ProtocolConnection:
    conn = ready_for_traffic()
    events = conn.receive_data(CONSUME_ANSWERS)
    assert len(events) == 4, events
    conn.data_to_send()
    return conn


def _mid_content() -> ProtocolConnection:
    conn = _consuming()
    assert conn.receive_data(MID_PREFIX) == []
    return conn


def _channel_closing() -> ProtocolConnection:
    conn = _consuming()
    conn.close_channel(2, 200, "bye")
    conn.data_to_send()
    return conn


def _connection_closing() -> ProtocolConnection:
    conn = _consuming()
    conn.close(200, "bye")
    conn.data_to_send()
    return conn


@attrs.frozen
class Phase:
    """Where the connection is before the fuzzed stream starts."""

    name: str
    prepare: Callable[[], ProtocolConnection]
    client_steps: bool = False


PHASES: Final = (
    Phase("handshake", fresh, client_steps=True),
    Phase("consuming", _consuming),
    Phase("mid-content", _mid_content),
    Phase("channel-closing", _channel_closing),
    Phase("connection-closing", _connection_closing),
)
PHASE_INDEX: Final = {phase.name: i for i, phase in enumerate(PHASES)}


def encode_input(phase: str, stream: bytes, cuts: list[int] | tuple[int, ...] = ()) -> bytes:
    """A fuzz input that drives the connection to ``phase`` and feeds ``stream`` split
    at ``cuts`` (offsets into the stream)."""
    if len(cuts) >= MAX_CUTS:
        raise ValueError(f"at most {MAX_CUTS - 1} cuts")
    head = bytes([PHASE_INDEX[phase], len(cuts)])
    return head + b"".join(_CUT.pack(cut) for cut in cuts) + stream


def decode_input(data: bytes) -> tuple[Phase, list[bytes]]:
    """The phase and the stream's pieces an input describes (see the module notes)."""
    if not data:
        return PHASES[0], []
    phase = PHASES[data[0] % len(PHASES)]
    count = data[1] % MAX_CUTS if len(data) > 1 else 0
    stream_start = min(len(data), 2 + 2 * count)
    stream = data[stream_start:]
    points = {0, len(stream)}
    for offset in range(2, stream_start - 1, 2):
        points.add(_CUT.unpack_from(data, offset)[0] % (len(stream) + 1))
    ordered = sorted(points)
    return phase, [stream[a:b] for a, b in itertools.pairwise(ordered) if b > a]


@attrs.frozen
class Outcome:
    """What feeding one input gave: the events, and the error that ended it if any."""

    phase: Phase
    events: list[Event]
    error: RemoteProtocolError | LocalProtocolError | None


def check_buffer(conn: ProtocolConnection) -> None:
    """The core keeps at most the tail of one incomplete frame (never a whole frame,
    never more than the frame limit), or before the first frame fewer than 8 bytes."""
    buffer = bytes(conn._buffer)
    if conn.state is ConnectionState.CLOSED:
        assert not buffer, f"{len(buffer)} bytes buffered on a closed connection"
        return
    assert len(buffer) < PRE_TUNE_FRAME_LIMIT, f"{len(buffer)} bytes buffered"
    if not conn._seen_first_frame:
        # Not yet known to be a frame: at most the 8 bytes of a protocol header.
        assert len(buffer) < 8, f"{len(buffer)} bytes buffered before the first frame"
    elif len(buffer) >= 7:
        _, _, size = struct.unpack_from(">BHI", buffer)
        assert len(buffer) < size + 8 <= conn._frame_limit, (
            f"{len(buffer)} bytes buffered for a frame of {size + 8} bytes "
            f"(frame limit {conn._frame_limit})"
        )


def _conforms(value: object, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (the types events use)."""
    if hint is object or hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is types.UnionType or origin is typing.Union:
        return any(_conforms(value, arg) for arg in args)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    if origin is tuple:
        assert args[1:] == (...,), hint
        return isinstance(value, tuple) and all(_conforms(item, args[0]) for item in value)
    return isinstance(value, hint)


_EVENT_FIELDS: Final[dict[type, dict[str, Any]]] = {
    cls: typing.get_type_hints(cls) for cls in EVENT_TYPES
}


def check_event_fields(events: list[Event]) -> None:
    """Every field of every event has its annotated type (a str field never holds the
    bytes pamqp gives for a long string that is not UTF-8, an int is never None...)."""
    for event in events:
        for name, hint in _EVENT_FIELDS[type(event)].items():
            value = getattr(event, name)
            assert _conforms(value, hint), f"{type(event).__name__}.{name} = {value!r}: not {hint}"


def check_output(conn: ProtocolConnection) -> None:
    """Whatever the core queued in answer (start-ok, tune-ok, close-ok, flow-ok,
    cancel-ok, ...) is a sequence of well-formed frames."""
    parse(conn.data_to_send())


def check_content(conn: ProtocolConnection) -> None:
    """Content being assembled never exceeds what its content header announced."""
    for channel in conn._channels.values():
        received = sum(len(chunk) for chunk in channel.content_chunks)
        assert received == channel.content_received, (received, channel.content_received)
        if channel.content_properties is None:
            assert received == 0
        else:
            assert received < channel.content_size, (received, channel.content_size)


def check_failed(conn: ProtocolConnection, error: RemoteProtocolError | LocalProtocolError) -> None:
    """After an error the connection is CLOSED, holds nothing, and refuses more input."""
    assert conn.state is ConnectionState.CLOSED, conn.state
    check_buffer(conn)
    with pytest.raises(type(error), match="already failed"):
        conn.receive_data(b"\x08\x00\x00\x00\x00\x00\x00\xce")


class _ClientSteps:
    """The client's steps of the handshake phase, taken as soon as they are due (the
    same steps as ``drive`` in test_protocol_fuzz, between pieces instead of phases)."""

    def __init__(self) -> None:
        self.channels_requested = False
        self.requested = False

    def take(self, conn: ProtocolConnection) -> None:
        if conn.state is not ConnectionState.OPEN:
            return
        if not self.channels_requested:
            if conn.channel_max < 2:  # the broker allows fewer channels than we use
                return
            assert conn.open_channel() == 1
            assert conn.open_channel() == 2
            self.channels_requested = True
        elif (
            not self.requested
            and conn.channel_state(1) is ChannelState.OPEN
            and conn.channel_state(2) is ChannelState.OPEN
        ):
            client_requests(conn)
            self.requested = True


def run(data: bytes) -> Outcome:
    """Feed one fuzz input, checking the core after every piece.

    Returns:
        The events and the protocol error that ended the stream, if any.

    Raises:
        AssertionError: A check failed (a finding).
        Exception: Anything else the core raised (a finding).
    """
    phase, pieces = decode_input(data)
    conn = phase.prepare()
    steps = _ClientSteps() if phase.client_steps else None
    events: list[Event] = []
    try:
        for piece in pieces:
            new = conn.receive_data(piece)
            check_events(new)
            check_event_fields(new)
            events.extend(new)
            check_buffer(conn)
            check_content(conn)
            check_output(conn)
            if steps is not None:
                steps.take(conn)
                check_output(conn)
    except RemoteProtocolError as exc:
        check_failed(conn, exc)
        return Outcome(phase, events, exc)
    except LocalProtocolError as exc:
        # Documented: a connection.start that does not offer PLAIN, or from a broker
        # whose version refuses the frame_max asked for (UnsupportedSetting).
        documented = "authentication mechanism" in str(exc) or isinstance(exc, UnsupportedSetting)
        if not (phase.client_steps and documented):
            raise
        check_failed(conn, exc)
        return Outcome(phase, events, exc)
    return Outcome(phase, events, None)


def TestOneInput(data: bytes) -> None:
    """The fuzz target: feed ``data``; any exception but a protocol error is a finding."""
    run(data)


def main() -> None:
    argv = list(sys.argv)
    if __spec__ is not None:
        # Run with -m: libFuzzer starts itself again through the shell for -merge,
        # -minimize_crash, -fork and -jobs, by argv[0], which is this file's path (not
        # executable, and not importable as tests.fuzz...). Give it the command line
        # that started it (the shell splits it; the working directory is kept).
        argv[0] = f"{shlex.quote(sys.executable)} -m {__spec__.name}"
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
