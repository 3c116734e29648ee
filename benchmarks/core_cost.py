"""The sans-IO core's cost per message, without a socket or a broker.

usage: .venv/bin/python benchmarks/core_cost.py [--repeat 5] [--messages 20000]
                                                [--against OTHER/src] [--shapes]

Two figures, each the best of ``--repeat`` runs (the least disturbed by a noisy
neighbour on a shared machine), printed in nanoseconds of CPU time
(``time.process_time_ns``, which leaves out the time the process waited for a core)
per message:

- ``decode_cost_ns``: ``ProtocolConnection.receive_data`` per delivered 128-byte
  message (basic.deliver + content header + body, fed in 64 KiB reads), as
  ``client_throughput.py`` measures it;
- ``publish_cost_ns``: ``ProtocolConnection.publish`` of a 128-byte message with
  properties on a channel in confirm mode, ``data_to_send`` taken every 100 publishes.

``--shapes`` adds the decode cost of deliveries of other shapes, which the frame
loop's fast path for a whole delivery does not take or that carry more properties
(``SHAPES``): a body over three frames, every delivery split across 100-byte reads,
a header table of five entries.

``--against OTHER/src`` compares this tree's core with another's (``main``'s, say) in
one process: the other tree's ``strictconsume/amqp`` is copied to a temporary
directory and imported as a package of its own, and the two alternate, trial after
trial (``--repeat`` trials each, in turns), so that a busy neighbour weighs on both
alike. Then the best and the median of each side are printed.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from pamqp import body, commands, frame, header

import strictconsume.amqp._protocol
from client_throughput import BODY, decode_cost_ns


def publish_cost_ns(protocol: ModuleType, messages: int = 20000) -> float:
    """CPU nanoseconds of ProtocolConnection.publish per 128-byte message (confirm
    mode), of the core in ``protocol``."""
    core = protocol.ProtocolConnection(credentials=protocol.Credentials("guest", "guest"))
    core.initiate()
    core.receive_data(
        b"".join(
            [
                frame.marshal(
                    commands.Connection.Start(
                        mechanisms="PLAIN", locales="en_US", server_properties={}
                    ),
                    0,
                ),
                frame.marshal(commands.Connection.Tune(2047, 131072, 60), 0),
                frame.marshal(commands.Connection.OpenOk(), 0),
            ]
        )
    )
    channel = core.open_channel()
    core.receive_data(frame.marshal(commands.Channel.OpenOk(), channel))
    core.send_method(channel, commands.Confirm.Select())
    core.receive_data(frame.marshal(commands.Confirm.SelectOk(), channel))
    core.data_to_send()
    props = commands.Basic.Properties(delivery_mode=2, content_type="application/json")
    publish = core.publish
    start = time.process_time_ns()
    for n in range(messages):
        publish(channel, exchange="", routing_key="q", body=BODY, properties=props)
        if n % 100 == 99:
            core.data_to_send()
    elapsed = time.process_time_ns() - start
    return elapsed / messages


def _open_channel(protocol: ModuleType, frame_max: int) -> tuple[ModuleType, int]:
    """A core of ``protocol`` through the handshake (``frame_max``), one channel open."""
    core = protocol.ProtocolConnection(credentials=protocol.Credentials("guest", "guest"))
    core.initiate()
    core.data_to_send()
    core.receive_data(
        b"".join(
            [
                frame.marshal(
                    commands.Connection.Start(
                        mechanisms="PLAIN", locales="en_US", server_properties={}
                    ),
                    0,
                ),
                frame.marshal(commands.Connection.Tune(2047, frame_max, 60), 0),
                frame.marshal(commands.Connection.OpenOk(), 0),
            ]
        )
    )
    channel = core.open_channel()
    core.receive_data(frame.marshal(commands.Channel.OpenOk(), channel))
    return core, channel


# name: (body, properties, frame_max, bytes per read)
SHAPES: dict[str, tuple[bytes, commands.Basic.Properties, int, int]] = {
    "10 KB body in 3 frames (frame_max 4096), 64 KiB reads": (
        bytes(10240),
        commands.Basic.Properties(delivery_mode=2),
        4096,
        65536,
    ),
    "128 B, 100-byte reads (every delivery split)": (
        BODY,
        commands.Basic.Properties(delivery_mode=2, content_type="application/json"),
        131072,
        100,
    ),
    "128 B, 5 headers and a message_id, 64 KiB reads": (
        BODY,
        commands.Basic.Properties(
            delivery_mode=2,
            message_id="abc-123",
            headers={"a": 1, "b": "x", "c": True, "d": 2.5, "e": "yyyy"},
        ),
        131072,
        65536,
    ),
}


def shape_cost_ns(protocol: ModuleType, shape: str, messages: int) -> float:
    """CPU nanoseconds of ProtocolConnection.receive_data per delivery of ``shape``."""
    content, properties, frame_max, read = SHAPES[shape]
    core, channel = _open_channel(protocol, frame_max)
    chunk = frame_max - 8
    one = b"".join(
        [
            frame.marshal(commands.Basic.Deliver("ctag", 1, False, "", "q"), channel),
            frame.marshal(header.ContentHeader(0, len(content), properties), channel),
        ]
        + [
            frame.marshal(body.ContentBody(content[i : i + chunk]), channel)
            for i in range(0, len(content), chunk)
        ]
    )
    stream = one * messages
    chunks = [stream[i : i + read] for i in range(0, len(stream), read)]
    start = time.process_time_ns()
    got = 0
    for piece in chunks:
        got += len(core.receive_data(piece))
    elapsed = time.process_time_ns() - start
    assert got == messages, got
    return elapsed / messages


def shapes(sides: dict[str, ModuleType], repeat: int, messages: int) -> None:
    """Each shape's decode cost on each side, alternating, best and median."""
    for shape in SHAPES:
        print(shape)
        costs: dict[str, list[float]] = {name: [] for name in sides}
        for n in range(repeat):
            order = list(sides.items()) if n % 2 else list(reversed(sides.items()))
            for name, protocol in order:
                costs[name].append(shape_cost_ns(protocol, shape, messages // 4))
        for name, values in costs.items():
            print(
                f"  {name:9}  best {min(values):7.0f}  median {statistics.median(values):7.0f}"
                f"  ({len(values)} trials)"
            )


def trial(protocol: ModuleType, messages: int) -> tuple[float, float]:
    """One decode and one publish measurement of the core in ``protocol``."""
    return (
        decode_cost_ns(messages, time.process_time_ns, protocol),
        publish_cost_ns(protocol, messages),
    )


def other_core(src: Path, into: Path) -> ModuleType:
    """The ``_protocol`` module of the client under ``src``, imported as a package of
    its own (the client imports nothing of the framework, so it stands alone)."""
    shutil.copytree(src / "strictconsume" / "amqp", into / "other_amqp")
    sys.path.insert(0, str(into))
    return importlib.import_module("other_amqp._protocol")


def report(name: str, path: str | None, trials: list[tuple[float, float]]) -> None:
    decode = [d for d, _ in trials]
    publish = [p for _, p in trials]
    print(f"{name}: {path}")
    print(
        f"  decode_cost_ns  best {min(decode):7.0f}  median {statistics.median(decode):7.0f}"
        f"  ({len(trials)} trials)"
    )
    print(f"  publish_cost_ns best {min(publish):7.0f}  median {statistics.median(publish):7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--against", type=Path, help="another tree's src directory")
    parser.add_argument("--shapes", action="store_true", help="also other delivery shapes")
    ns = parser.parse_args()
    this = strictconsume.amqp._protocol
    if ns.against is None:
        report("this tree", this.__file__, [trial(this, ns.messages) for _ in range(ns.repeat)])
        if ns.shapes:
            shapes({"this tree": this}, ns.repeat, ns.messages)
        return
    with tempfile.TemporaryDirectory() as tmp:
        other = other_core(ns.against, Path(tmp))
        sides = {"this tree": (this, list[tuple[float, float]]()), "against": (other, [])}
        for n in range(ns.repeat):
            order = list(sides.values()) if n % 2 else list(reversed(sides.values()))
            for protocol, trials in order:
                trials.append(trial(protocol, ns.messages))
        for name, (protocol, trials) in sides.items():
            report(name, protocol.__file__, trials)
        if ns.shapes:
            protocols = {name: protocol for name, (protocol, _) in sides.items()}
            shapes(protocols, ns.repeat, ns.messages)


if __name__ == "__main__":
    main()
