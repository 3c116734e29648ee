"""Write the seed corpus of ``fuzz_frames``: valid broker byte streams for each phase.

Every frame is marshalled by pamqp (through the ``server`` helpers of
``tests/amqp/test_protocol.py``). The seeds are the files named ``seed-*`` in
``tests/fuzz/corpus``; this script owns them (it rewrites them and removes stale
ones) and leaves every other file there alone: those are inputs a fuzzing run added
(named by their SHA-1, as libFuzzer names them) and regression inputs.

usage, from the repository root::

    .venv/bin/python -m tests.fuzz.make_corpus           # (re)write the seeds
    .venv/bin/python -m tests.fuzz.make_corpus --check   # exit 1 unless up to date
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from pamqp import commands
from pamqp.body import ContentBody
from pamqp.heartbeat import Heartbeat

from tests.amqp.test_protocol import Props, server, server_content, start_frame, tune_frame
from tests.amqp.test_protocol_fuzz import CHANNELS, HANDSHAKE
from tests.fuzz.fuzz_frames import CONSUME_ANSWERS, MID_REST, encode_input

CORPUS: Final = Path(__file__).resolve().parent / "corpus"
SEED_PREFIX: Final = "seed-"

# Properties with every field set and headers of every field-table type.
RICH_PROPERTIES: Final = Props(
    content_type="application/json",
    content_encoding="utf-8",
    headers={
        "str": "text",
        "int": -7,
        "big": 2**40,
        "bool": True,
        "float": 1.5,
        "decimal": decimal.Decimal("3.14"),
        "when": datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC),
        "table": {"nested": {"deep": 1}},
        "array": [1, "two", False, {"k": "v"}],
        "bytes": bytearray(b"\x00\xff"),
        "void": None,
        "x-death": [{"count": 1, "queue": "q", "reason": "rejected"}],
    },
    delivery_mode=2,
    priority=5,
    correlation_id="corr-1",
    reply_to="amq.rabbitmq.reply-to",
    expiration="60000",
    message_id="msg-1",
    timestamp=datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC),
    message_type="order.created",
    user_id="guest",
    app_id="tests",
    cluster_id="",
)
RICH_SERVER_PROPERTIES: Final[dict[str, object]] = {
    "product": "RabbitMQ",
    "version": "3.10.8",
    "platform": "Erlang/OTP 25",
    "cluster_name": "rabbit@node",
    "copyright": "Copyright (c) 2007-2022 VMware, Inc. or its affiliates.",
    "information": "Licensed under the MPL 2.0.",
    "capabilities": {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "consumer_priorities": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "direct_reply_to": True,
    },
}


def deliver(
    tag: int, body: bytes, properties: Props | None = None, *, frame_max: int = 4096
) -> bytes:
    """A delivery to consumer "ctag" on channel 1."""
    method = commands.Basic.Deliver("ctag", tag, False, "orders", "order.created")
    return server_content(1, method, body, properties, frame_max=frame_max)


def cuts_everywhere(stream: bytes, step: int) -> list[int]:
    """Cut points every ``step`` bytes (at most 15, as the input layout allows)."""
    return list(range(step, len(stream), step))[:15]


def boundaries(*parts: bytes) -> tuple[bytes, list[int]]:
    """The parts joined, and cut points between them."""
    return b"".join(parts), list(itertools.accumulate(len(p) for p in parts[:-1]))


def _handshake_seeds() -> dict[str, bytes]:
    handshake = b"".join(HANDSHAKE)
    session, session_cuts = boundaries(
        handshake,
        b"".join(CHANNELS),
        CONSUME_ANSWERS + deliver(1, b"hello") + server(0, Heartbeat()),
    )
    return {
        "whole": encode_input("handshake", handshake),
        "split-inside-frames": encode_input("handshake", handshake, [1, 5, 8, 40, 200, 250]),
        "tune-zero": encode_input(
            "handshake",
            start_frame() + tune_frame(0, 0, 0) + server(0, commands.Connection.OpenOk()),
        ),
        "rich-server-properties": encode_input(
            "handshake",
            start_frame(server_properties=RICH_SERVER_PROPERTIES)
            + tune_frame(2047, 131072, 60)
            + server(0, commands.Connection.OpenOk()),
        ),
        "refused": encode_input(
            "handshake",
            start_frame()
            + server(
                0,
                commands.Connection.Close(
                    403,
                    "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
                    0,
                    0,
                ),
            ),
        ),
        "vhost-not-allowed": encode_input(
            "handshake",
            start_frame()
            + tune_frame()
            + server(
                0, commands.Connection.Close(530, "NOT_ALLOWED - vhost nope not found", 10, 40)
            ),
        ),
        "blocked-unblocked": encode_input(
            "handshake",
            handshake
            + server(
                0, commands.Connection.Blocked("low on disk"), commands.Connection.Unblocked()
            ),
        ),
        "heartbeats": encode_input(
            "handshake", handshake + server(0, Heartbeat(), Heartbeat(), Heartbeat())
        ),
        "session": encode_input("handshake", session, session_cuts),
    }


def _consuming_seeds() -> dict[str, bytes]:
    big = bytes(range(256)) * 2
    split_big = deliver(2, big, RICH_PROPERTIES, frame_max=100)
    mixed = (
        deliver(2, b"one")
        + server(2, commands.Basic.Ack(1))
        + deliver(3, b"two", Props(delivery_mode=2))
        + server(0, Heartbeat())
        + server(2, commands.Basic.Ack(3, multiple=True))
    )
    # A delivery in body frames of 56 bytes, with a nack of channel 2 after its first
    # body frame.
    split_small = deliver(4, b"x" * 150, frame_max=64)
    # (method, header and one body frame: as long as the whole of a 56-byte delivery)
    after_first_body = len(deliver(4, b"x" * 56))
    return {
        "delivery": encode_input(
            "consuming", deliver(2, b"hello", Props(content_type="text/plain"))
        ),
        "delivery-rich-properties-split-body": encode_input("consuming", split_big),
        "delivery-split-inside-frames": encode_input(
            "consuming", split_big, cuts_everywhere(split_big, 37)
        ),
        "delivery-empty-body": encode_input("consuming", deliver(2, b"")),
        "deliveries-and-confirms": encode_input("consuming", mixed),
        "confirm-inside-content": encode_input(
            "consuming",
            split_small[:after_first_body]
            + server(2, commands.Basic.Nack(2))
            + split_small[after_first_body:],
        ),
        "heartbeats": encode_input("consuming", server(0, Heartbeat(), Heartbeat())),
        "get-ok": encode_input(
            "consuming",
            server_content(1, commands.Basic.GetOk(7, True, "", "q", 5), b"got", Props(priority=1)),
        ),
        "get-empty": encode_input("consuming", server(1, commands.Basic.GetEmpty())),
        "acks-single": encode_input(
            "consuming",
            server(2, commands.Basic.Ack(2), commands.Basic.Ack(1), commands.Basic.Ack(3)),
        ),
        "ack-multiple": encode_input("consuming", server(2, commands.Basic.Ack(3, multiple=True))),
        "ack-all": encode_input("consuming", server(2, commands.Basic.Ack(0, multiple=True))),
        "nacks": encode_input(
            "consuming",
            server(2, commands.Basic.Nack(1), commands.Basic.Nack(3, multiple=True, requeue=False)),
        ),
        "return-then-ack": encode_input(
            "consuming",
            server_content(2, commands.Basic.Return(312, "NO_ROUTE", "", "nowhere"), b"two")
            + server(2, commands.Basic.Ack(2)),
        ),
        "return-unmatched": encode_input(
            "consuming",
            server_content(
                2, commands.Basic.Return(312, "NO_ROUTE", "", "elsewhere"), b"?", RICH_PROPERTIES
            ),
        ),
        "cancel": encode_input("consuming", server(1, commands.Basic.Cancel("ctag"))),
        "cancel-nowait": encode_input(
            "consuming", server(1, commands.Basic.Cancel("ctag", nowait=True))
        ),
        "flow": encode_input(
            "consuming",
            server(1, commands.Channel.Flow(active=False), commands.Channel.Flow(active=True)),
        ),
        "channel-close": encode_input(
            "consuming",
            server(
                2,
                commands.Channel.Close(406, "PRECONDITION_FAILED - unknown delivery tag 9", 60, 80),
            )
            + deliver(2, b"after"),
        ),
        "channel-close-consumer": encode_input(
            "consuming",
            server(1, commands.Channel.Close(404, "NOT_FOUND - no queue 'q' in vhost '/'", 60, 20)),
        ),
        "connection-close": encode_input(
            "consuming",
            deliver(2, b"last")
            + server(0, commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)),
        ),
        "blocked-unblocked": encode_input(
            "consuming",
            server(
                0, commands.Connection.Blocked("low on memory"), commands.Connection.Unblocked()
            ),
        ),
    }


def _mid_content_seeds() -> dict[str, bytes]:
    rest = b"".join(MID_REST)
    return {
        "rest": encode_input("mid-content", rest),
        "rest-split-inside-frames": encode_input("mid-content", rest, cuts_everywhere(rest, 11)),
        "rest-interleaved": encode_input(
            "mid-content",
            MID_REST[0]
            + server(2, commands.Basic.Ack(1))
            + server(0, Heartbeat())
            + b"".join(MID_REST[1:])
            + deliver(2, b"next"),
        ),
        "rest-then-connection-close": encode_input(
            "mid-content",
            rest + server(0, commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)),
        ),
        "connection-close-inside": encode_input(
            "mid-content",
            MID_REST[0]
            + server(0, commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)),
        ),
    }


def _channel_closing_seeds() -> dict[str, bytes]:
    return {
        "close-ok": encode_input("channel-closing", server(2, commands.Channel.CloseOk())),
        "dropped-then-close-ok": encode_input(
            "channel-closing",
            server(2, commands.Basic.Ack(1))
            + server_content(2, commands.Basic.Return(312, "NO_ROUTE", "", "nowhere"), b"two")
            + server(2, ContentBody(b"stray"))
            + server(2, commands.Channel.CloseOk())
            + deliver(2, b"channel 1 goes on"),
        ),
        "crossing-close": encode_input(
            "channel-closing",
            server(
                2,
                commands.Channel.Close(406, "PRECONDITION_FAILED - unknown delivery tag 9", 60, 80),
                commands.Basic.Ack(2),
                commands.Channel.CloseOk(),
            ),
        ),
    }


def _connection_closing_seeds() -> dict[str, bytes]:
    return {
        "close-ok": encode_input("connection-closing", server(0, commands.Connection.CloseOk())),
        "dropped-then-close-ok": encode_input(
            "connection-closing",
            deliver(2, b"dropped")
            + server(0, Heartbeat())
            + server(2, commands.Basic.Ack(1))
            + server(0, commands.Connection.Blocked("low on memory"))
            + server(0, commands.Connection.CloseOk()),
        ),
        "crossing-close": encode_input(
            "connection-closing",
            server(0, commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0)),
        ),
    }


def seeds() -> dict[str, bytes]:
    """Every seed by file name."""
    groups = {
        "handshake": _handshake_seeds(),
        "consuming": _consuming_seeds(),
        "mid-content": _mid_content_seeds(),
        "channel-closing": _channel_closing_seeds(),
        "connection-closing": _connection_closing_seeds(),
    }
    return {
        f"{SEED_PREFIX}{phase}-{name}": data
        for phase, group in groups.items()
        for name, data in group.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="only check that the committed seeds are current"
    )
    args = parser.parse_args(argv)
    wanted = seeds()
    present = {p.name: p for p in CORPUS.glob(f"{SEED_PREFIX}*")}
    stale = sorted(set(present) - set(wanted))
    changed = sorted(
        name
        for name, data in wanted.items()
        if name not in present or present[name].read_bytes() != data
    )
    if args.check:
        for name in stale:
            print(f"stale seed: {name}")
        for name in changed:
            print(f"missing or outdated seed: {name}")
        return 1 if stale or changed else 0
    CORPUS.mkdir(exist_ok=True)
    for name in stale:
        present[name].unlink()
    for name in changed:
        (CORPUS / name).write_bytes(wanted[name])
    print(f"{len(wanted)} seeds in {CORPUS}: {len(changed)} written, {len(stale)} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
